"""Modules that look like LoRA, so that none is missed silently.

A module is LoRA-like when a class in its type's MRO is a LoRA layer by name (PEFT's
`LoraLayer`, loralib's `LoRALayer`, torchtune's `LoRALinear` / `DoRALinear`; not PEFT's
`LoraModel` wrapper), or when it holds a submodule or parameter
named lora_A / lora_B / lora_a / lora_b / lora_down / lora_up / lora_magnitude_vector. Every
such module that no site covers gets a skipped entry naming the ops seen there. The same test
on real modules (`is_lora_module`) tells which of a model's LoRA modules no compiled graph
covered at all (runlora_fx/coverage.py).
"""

from __future__ import annotations

import re
from collections import Counter

import torch
import torch.fx as fx

from runlora_fx.passes.paths import module_path, normalise_path
from runlora_fx.passes.patterns import MUL, is_call, term
from runlora_fx.ir.site import SkippedSite

LORA_PART = re.compile(r"^lora_(A|B|a|b|down|up|magnitude_vector)$")
LORA_PARAM = re.compile(r"(?:^|_)lora_(?:A|B|a|b|down|up|magnitude_vector)(?:_|$)")
DORA_PART = "lora_magnitude_vector"


LORA_CLASS = re.compile(r"(lora|dora)(layer|linear)", re.IGNORECASE)


def _lora_class(kind: object) -> bool:
    names = [c.__name__ for c in getattr(kind, "__mro__", ())] or [str(kind).rsplit(".", 1)[-1]]
    return any(LORA_CLASS.search(name) for name in names)


def is_lora_module(module: torch.nn.Module) -> bool:
    """The same test on a real module: a LoRA class in its MRO, or a child / own parameter named
    like a LoRA part."""
    return (_lora_class(type(module))
            or any(LORA_PART.match(name) for name, _ in module.named_children())
            or any(LORA_PARAM.search(name) for name, _ in module.named_parameters(recurse=False)))


def lora_parameters(module: torch.nn.Module) -> list[str]:
    """Names (relative to a LoRA-like `module`) of its LoRA parameters: those under a LoRA part or
    named like one; all of its parameters when none is (a LoRA class with other names)."""
    names = [name for name, _ in module.named_parameters()]
    lora = [n for n in names
            if LORA_PARAM.search(n) or any(LORA_PART.match(part) for part in n.split("."))]
    return lora or names


def _from_path(path: str) -> str | None:
    """The LoRA module of `…q_proj.lora_A.default`: `…q_proj`."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if LORA_PART.match(part):
            return ".".join(parts[:i])
    return None


def lora_modules(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """LoRA-like module path → the graph nodes that run inside it, for the modules whose LoRA
    part runs in this graph (a graph holding only a module's base linear — a DDP bucket or a
    graph break cut it — misses nothing)."""
    found: dict[str, list[fx.Node]] = {}
    runs_lora: set[str] = set()
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        paths: set[str] = set()
        for raw, kind in stack.values():
            path = normalise_path(raw)
            if _lora_class(kind):
                paths.add(path)
            elif (owner := _from_path(path)) is not None:
                paths.add(owner)
                runs_lora.add(owner)
        if node.op == "placeholder" and LORA_PARAM.search(node.name):
            users = {p for user in node.users if (p := module_path(user))}
            paths |= users
            runs_lora |= users
        for path in paths:
            found.setdefault(path, []).append(node)
    # keep the innermost: PEFT's ModuleDict keys and wrapping layers are not modules of their own
    return {p: nodes for p, nodes in found.items()
            if p in runs_lora and not any(q.startswith(p + ".") for q in found)}


def _covers(site: str, module: str) -> bool:
    return site == module or site.startswith(module + ".") or module.startswith(site + ".")


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return str(name).rsplit(".", 1)[-1]


def describe_ops(nodes: list[fx.Node]) -> str:
    ops = Counter(_op_name(n) for n in nodes if n.op in ("call_function", "call_method"))
    return ", ".join(f"{op} ×{k}" if k > 1 else op for op, k in ops.items()) or "no ops"


def is_dora(nodes: list[fx.Node]) -> bool:
    return any(DORA_PART in (module_path(n) or "") or DORA_PART in n.name for n in nodes)


def unrecognised(graph: fx.Graph, covered: list[str]) -> list[SkippedSite]:
    """A skipped entry per LoRA-like module no site path covers."""
    missed = dora_branches(graph)
    for path, nodes in lora_modules(graph).items():
        if any(_covers(site, path) for site in covered) or all(
                n.op in ("placeholder", "get_attr", "output") for n in nodes):
            continue  # covered, or only its weights pass through this graph
        if is_dora(nodes):
            reason = f"DoRA: not rewritten: {DORA_BREAK}; ops seen there: {describe_ops(nodes)}"
        elif any(_op_name(n) == "conv1d" for n in nodes):
            reason = ("not recognised: a LoRA whose B is a grouped conv1d with zero padding "
                      f"(loralib MergedLinear); ops seen there: {describe_ops(nodes)}")
        else:
            reason = f"not recognised: ops seen there: {describe_ops(nodes)}"
        missed.append(SkippedSite(path, reason))
    return missed


# ---- DoRA --------------------------------------------------------------------------------------

NORMS = ("linalg_norm", "linalg_vector_norm", "norm")
DORA_BREAK = (
    "peft's DoRA forward graph-breaks inside each module (dequantize_module_weight, "
    "peft/utils/integrations.py: `type(module.weight).__module__`), so no graph holds its base "
    "linear, weight norm and LoRA branch together"
)


def _from_norm(node: fx.Node, depth: int = 12) -> bool:
    """`node` is computed from a weight norm (DoRA's magnitude / ‖W + sBA‖ scale)."""
    seen, frontier = set(), [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if _op_name(n) in NORMS:
                return True
            nxt += [a for a in n.all_input_nodes if a not in seen]
            seen |= set(nxt)
        frontier = nxt
    return False


def dora_branches(graph: fx.Graph) -> list[SkippedSite]:
    """A LoRA branch `linear(linear(x, A), B)` scaled by a tensor computed from a weight norm:
    DoRA's. Reported once each, under its module path or, where the graph break left no module
    stack, the name of its lora_A weight."""
    found = []
    for node in graph.nodes:
        branch = term(node)
        if branch is None or branch.mul is not None:
            continue
        for user in node.users:
            others = [a for a in user.args if isinstance(a, fx.Node) and a is not node]
            if is_call(user, MUL) and others and _from_norm(others[0]):
                path = module_path(node) or f"DoRA branch of {branch.lora_a.weight.name}"
                found.append(SkippedSite(path, f"DoRA: not rewritten: {DORA_BREAK}"))
                break
    return found
