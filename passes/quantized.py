"""Opaque bases: quantized linears whose weight is not a tensor a plan can read or merge into.
Their result stays the graph's own op (and its own backward gives dx through it); a plan keeps
every LoRA-side choice (h saved or recomputed, dA/dB orders, the dtype the branch runs in).

Recognised: a bitsandbytes op (`torch.ops.bitsandbytes.gemm_4bit`, …: PEFT's QLoRA) and a custom
autograd.Function whose forward is a linear of its input (torchao's `linear_nf4` when x needs
grad: Dynamo traces it as `autograd_function_apply`), each possibly followed by dtype casts and
a clone (PEFT's `result.clone()`). Where x needs no grad, `linear_nf4` traces to
`linear(x, W.to(dtype))`: a linear with a computed weight, which the plans can read.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from runlora_fx.passes.patterns import LINEAR, cast_source, is_call, strip_casts

APPLY = "autograd_function_apply"


@dataclass(frozen=True)
class Opaque:
    node: fx.Node  # the base's result, as the sum reads it
    x: fx.Node  # the site's input: what the op reads, casts stripped
    op: str  # what the reports call it


def _clone_source(node: object) -> fx.Node | None:
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target == "clone" and (
            len(node.args) == 1 and not node.kwargs):
        return node.args[0]  # type: ignore[return-value]
    return None


def _bitsandbytes(node: fx.Node) -> Opaque | None:
    target = node.target
    namespace = getattr(target, "namespace", None) or getattr(
        getattr(target, "_schema", None), "name", "").split("::")[0]
    if node.op != "call_function" or namespace != "bitsandbytes" or not node.args:
        return None
    name = str(getattr(target, "__name__", target)).split(".")[0]
    return Opaque(node, strip_casts(node.args[0]), f"bitsandbytes.{name}")  # type: ignore[arg-type]


def _function_apply(node: fx.Node) -> Opaque | None:
    """`getitem(autograd_function_apply(fwd, bwd, *args), 0)` whose forward body returns
    `linear(arg_i, …)`: x is args[i]."""
    if not (is_call(node, (operator.getitem,)) and node.args[1] == 0):
        return None
    apply = node.args[0]
    if not (isinstance(apply, fx.Node) and apply.op == "call_function"
            and getattr(apply.target, "__name__", "") == APPLY):
        return None
    body_node = apply.args[0]
    gm = body_node.graph.owning_module if isinstance(body_node, fx.Node) else None
    body = getattr(gm, str(body_node.target), None) if gm is not None else None  # type: ignore[union-attr]
    if not isinstance(body, fx.GraphModule):
        return None
    inputs = [n for n in body.graph.nodes if n.op == "placeholder"]
    output = next(n for n in body.graph.nodes if n.op == "output").args[0]
    result = output[0] if isinstance(output, (tuple, list)) else output
    result = result[0] if isinstance(result, (tuple, list)) else result
    if not isinstance(result, fx.Node):
        return None
    inner = _bitsandbytes(result)
    if inner is not None:
        source, what = inner.x, inner.op
    elif is_call(result, LINEAR):
        source, what = strip_casts(result.args[0]), "a linear"
    else:
        return None
    if source not in inputs:
        return None
    x = apply.args[2 + inputs.index(source)]  # type: ignore[arg-type]
    if not isinstance(x, fx.Node):
        return None
    return Opaque(node, strip_casts(x), f"{APPLY} of {what} (bitsandbytes, torchao NF4, …)")  # type: ignore[arg-type]


def opaque_base(node: object) -> Opaque | None:
    """The opaque base whose result is `node` (after casts and a clone), or None."""
    core = node
    while (inner := cast_source(core) or _clone_source(core)) is not None:
        core = inner
    if not isinstance(core, fx.Node) or not isinstance(node, fx.Node):
        return None
    found = _bitsandbytes(core) or _function_apply(core)
    if found is None or not isinstance(core.meta.get("example_value"), torch.Tensor):
        return None
    return Opaque(node, found.x, found.op)
