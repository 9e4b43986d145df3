"""Which of a compiled model's LoRA modules appeared in no compiled graph at all; said once.

With graph breaks Dynamo compiles one graph per frame segment, lazily, and code it cannot trace
runs eagerly and never reaches a backend: a gradient-checkpointed layer whose body Dynamo
refuses runs whole in eager mode, LoRA and all. This module accounts for that.

- The model is what torch.compile was called on or with: the Python stack holds Dynamo's
  outermost compile entry (`compile_wrapper`), whose callable is a bound method of the module
  (`torch.compile(model)`, `model.compile()`) or a function given the module as an argument.
- A graph covers a LoRA module (the test of passes/lora_modules.py, on real modules) when it
  reads one of its LoRA parameters (the graph inputs are the real Parameter objects; a fake
  in their place, as DDP's graph splitter hands, is matched by its source path). Dynamo
  reuses a compiled graph for every module instance that runs the same code (the layers of a
  ModuleList, q/k/v of one shape) and only the first instance reaches the backend, so a
  parameter read at path `rel` under the frame's root module (its Dynamo source, e.g.
  `L['self']._modules['q_proj']…`) covers `rel` under every module of the root's type.
- The accounting needs every graph of the first step. It runs at the first backward of any of
  the model's graphs (AOTAutograd compiles a backward when it first runs: the forward is then
  complete), once per model, and logs one WARNING when modules ran outside; `explain()` runs
  it when its traced call returns. A model compiled for inference only is never accounted.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from runlora_fx.report.outside import Outside, causes, forward_spans
from runlora_fx.passes.lora_modules import is_lora_module, lora_parameters
from runlora_fx.report.graph_report import GraphReport

log = logging.getLogger("runlora_fx")

LEDGER = "_runlora_fx_coverage"  # the model's __dict__ key
ENTRY = ("compile_wrapper", os.path.join("_dynamo", "eval_frame.py"))
_SOURCE_ROOT = re.compile(r"[LG]\[['\"][^'\"]+['\"]\]")
_SOURCE_STEP = re.compile(
    r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]"
    r"|\.__dict__\[['\"]_modules['\"]\]\[['\"]([^'\"]+)['\"]\]"
    r"|\.([A-Za-z_]\w*)"
    r"|\[['\"]?([^'\"\]]+)['\"]?\]"
)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ---- the model ---------------------------------------------------------------------------------


def _modules_in(candidates: Iterable[object]) -> list[torch.nn.Module]:
    """The distinct modules among `candidates` (a compiled wrapper stands for its module), less
    those inside another one."""
    found: list[torch.nn.Module] = []
    for item in candidates:
        if isinstance(item, torch._dynamo.eval_frame.OptimizedModule):
            item = item._orig_mod
        if isinstance(item, torch.nn.Module) and not any(item is m for m in found):
            found.append(item)
    return [m for m in found
            if not any(o is not m and any(s is m for s in o.modules()) for o in found)]


def models_of(fn: object, args: Sequence[object], kwargs: Mapping[str, object]
              ) -> list[torch.nn.Module]:
    """The modules a compiled call runs: the one `fn` is bound to (or wraps), else its
    module arguments."""
    wrapped = getattr(fn, "__wrapped__", None)
    return _modules_in([getattr(fn, "__self__", None), wrapped, fn, *args, *kwargs.values()])


def compiled_models() -> list[torch.nn.Module]:
    """The models of the torch.compile call now running, from its entry frame on the stack."""
    frame, entry = sys._getframe(1), None
    while frame is not None:
        code = frame.f_code
        if code.co_name == ENTRY[0] and code.co_filename.endswith(ENTRY[1]):
            entry = frame  # keep walking: the outermost compiled call is the model's
        frame = frame.f_back
    if entry is None:
        return []
    local = entry.f_locals
    del entry
    return models_of(local.get("fn"), local.get("args") or (), local.get("kwargs") or {})


# ---- what a graph covers -----------------------------------------------------------------------


@dataclass(frozen=True)
class LoraIndex:
    """A model's LoRA modules (outermost LoRA-like, by path), the owner of each LoRA parameter,
    and its modules by type (for the graphs Dynamo reuses across instances)."""

    modules: tuple[str, ...]
    owner: Mapping[str, str]  # LoRA parameter path → LoRA module path
    kinds: Mapping[str, type]  # module path → type
    of_kind: Mapping[type, tuple[str, ...]]

    @classmethod
    def of(cls, model: torch.nn.Module) -> LoraIndex:
        lora: list[str] = []
        kinds: dict[str, type] = {}
        of_kind: dict[type, list[str]] = defaultdict(list)
        for path, module in model.named_modules():
            kinds[path] = type(module)
            of_kind[type(module)].append(path)
            inside = lora and (lora[-1] == "" or path.startswith(lora[-1] + "."))
            if not inside and is_lora_module(module):  # pre-order: a LoRA module's parts follow
                lora.append(path)
        owner = {_join(path, name): path
                 for path in lora for name in lora_parameters(model.get_submodule(path))}
        return cls(tuple(lora), owner, kinds, {k: tuple(v) for k, v in of_kind.items()})

    def holding(self, paths: Iterable[str]) -> set[type]:
        """Types of the modules that hold `paths` (their ancestors, the model included)."""
        found = set()
        for path in paths:
            parts = path.split(".") if path else []
            found |= {self.kinds[".".join(parts[:i])] for i in range(len(parts))}
        return found

    def marked(self, path: str, rel: str | None) -> set[str]:
        """The LoRA modules a read of parameter `path`, `rel` below its frame's root, covers."""
        if rel is None or not (path == rel or path.endswith("." + rel)):
            return {self.owner[path]}
        root = path[: len(path) - len(rel)].rstrip(".")
        same = self.of_kind.get(self.kinds[root], (root,)) if root in self.kinds else (root,)
        return {self.owner[p] for q in same if (p := _join(q, rel)) in self.owner}

    def read_at(self, rel: str) -> set[str]:
        """The LoRA modules whose LoRA parameter lies at `rel` below some module: for a read
        that is not the Parameter itself (Dynamo's DDP graph splitter hands fakes)."""
        return {m for p, m in self.owner.items() if p == rel or p.endswith("." + rel)}


def source_path(node: fx.Node) -> str | None:
    """`L['self']._modules['q_proj']._parameters['weight']` → `q_proj.weight`: the path from the
    frame's root local (or global) to what the placeholder reads; None when not a plain path."""
    source = getattr(node, "_dynamo_source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    root = _SOURCE_ROOT.match(name) if isinstance(name, str) else None
    if root is None:
        return None
    steps, at = [], root.end()
    while at < len(name):
        step = _SOURCE_STEP.match(name, at)
        if step is None:
            return None
        steps.append(next(g for g in step.groups() if g is not None))
        at = step.end()
    return ".".join(steps)


def covered(index: LoraIndex, model: torch.nn.Module, gm: fx.GraphModule,
            example_inputs: Sequence[Any]) -> set[str]:
    """The LoRA modules whose LoRA parameters `gm` reads (as inputs, or held as attributes): by
    identity, else (a fake in place of the Parameter) by the path its source reads."""
    path_of = {id(p): name for name, p in model.named_parameters()}  # now: FSDP swaps them
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    reads: list[tuple[fx.Node | None, Any]] = list(zip(inputs, example_inputs))
    reads += [(None, p) for p in gm.parameters()]
    found: set[str] = set()
    for node, value in reads:
        path = path_of.get(id(value))
        rel = source_path(node) if node is not None else None
        if path in index.owner:
            found |= index.marked(path, rel)
        elif path is None and rel:
            found |= index.read_at(rel)
    return found


# ---- once per model ----------------------------------------------------------------------------


def _no_ledger() -> None:
    return None


class Ledger:
    """What the graphs of one model covered so far, and the accounting once it is done.

    Kept on the model itself (`model.__dict__`): a model compiled again, or through
    `backend="runlora"` (a new Backend per graph), must be accounted once, and the backend holds
    no module state; it goes when the model goes. Copies and pickles of the model get none
    (`__reduce__`), so a copy is accounted on its own."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.index = LoraIndex.of(model)
        self.covered: set[str] = set()
        self.result: Outside | None = None
        self._waiting: list[GraphReport] = []

    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return _no_ledger, ()

    def record(self, model: torch.nn.Module, gm: fx.GraphModule,
               example_inputs: Sequence[Any], report: GraphReport) -> None:
        self.covered |= covered(self.index, model, gm, example_inputs)
        report.lora_modules = len(self.index.modules)
        if self.result is not None:
            report.settle(self.result)
        else:
            self._waiting.append(report)

    def account(self, reasons: Iterable[Any]) -> Outside:
        """Settle (the first time) which LoRA modules no graph covered, and why."""
        if self.result is None:
            paths = tuple(p for p in self.index.modules if p not in self.covered)
            own = forward_spans({self.index.kinds[p] for p in paths})
            holding = forward_spans(self.index.holding(paths))
            found = causes(reasons, own, holding) if paths else ()
            self.result = Outside(len(self.index.modules), paths, found)
            waiting, self._waiting = self._waiting, []
            for report in waiting:
                report.settle(self.result)
        return self.result


def ledger_of(model: torch.nn.Module) -> Ledger | None:
    """The model's ledger, made at its first graph; None (and nothing kept) without LoRA."""
    ledger = model.__dict__.get(LEDGER)
    if isinstance(ledger, Ledger):
        return ledger
    ledger = Ledger(model)
    if not ledger.index.modules:
        return None
    model.__dict__[LEDGER] = ledger
    return ledger


def untracked_ledgers(fn: object, args: Sequence[object], kwargs: Mapping[str, object]
                      ) -> list[tuple[torch.nn.Module, Ledger]]:
    """Ledgers for the models a call runs, kept off the models (explain() leaves no trace)."""
    return [(m, ledger) for m in models_of(fn, args, kwargs)
            if (ledger := Ledger(m)).index.modules]


def record(found: Sequence[tuple[torch.nn.Module, Ledger]], gm: fx.GraphModule,
           example_inputs: Sequence[Any], report: GraphReport) -> None:
    """What `gm` covers, into each model's ledger; a model without LoRA is settled at once."""
    if not found:
        report.lora_modules = 0
        report.settle(Outside(0))
    for model, ledger in found:
        ledger.record(model, gm, example_inputs, report)


def dynamo_break_reasons() -> list[Any]:
    """The graph breaks Dynamo recorded in this process (cleared by torch._dynamo.reset())."""
    return list(torch._dynamo.utils.graph_break_reasons)


def contained(strict: bool, what: str, error: Exception) -> None:
    if strict:
        raise error
    log.debug("runlora: accounting for LoRA outside the graphs failed (%s): %s: %s",
              what, type(error).__name__, error)


def watch(gm: fx.GraphModule, example_inputs: Sequence[Any], report: GraphReport,
          strict: bool) -> Callable[[str, fx.GraphModule], None] | None:
    """Record what `gm` covers in the ledger of the model being compiled. The listener returned
    (for `report.on_partition`) settles the accounting at the first backward and warns, once
    per model, when LoRA modules ran outside every compiled graph. Failures here never fail the
    compile: a DEBUG line (strict raises)."""
    try:
        models = compiled_models()
        if not models:
            return None
        found = [(m, ledger) for m in models if (ledger := ledger_of(m)) is not None]
        record(found, gm, example_inputs, report)
    except Exception as error:  # noqa: BLE001 — contained: the compile goes on
        contained(strict, "recording a graph", error)
        return None
    if not found:
        return None
    ledgers = [ledger for _, ledger in found]

    def settle(part: str, _gm: fx.GraphModule) -> None:
        # only a backward compiled while autograd runs it: the step's forward is then complete
        if part != "backward" or torch._C._current_graph_task_id() == -1:
            return
        try:
            for ledger in ledgers:
                if ledger.result is None:
                    message = ledger.account(dynamo_break_reasons()).message()
                    if message:
                        log.warning(message)
                        warnings.warn(message, RuntimeWarning, stacklevel=2)
        except Exception as error:  # noqa: BLE001 — contained: training goes on
            contained(strict, "settling", error)

    return settle
