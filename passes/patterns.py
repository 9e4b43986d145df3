"""Node-level forms the site matcher recognises: linear products (and which layout their weight
is stored in), dtype casts, dropouts, the LoRA term `s · linear(linear(D(x), A), B)`, and ops
that run in place.

Each recogniser takes a node and returns its parts, or None: no recogniser raises.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from runlora_fx.ir.site import WeightLayout

LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)
MATMUL = (operator.matmul, torch.matmul)
ADDMM = (torch.addmm, torch.Tensor.addmm)
ADD = (operator.add, torch.add, torch.Tensor.add)
IADD = (operator.iadd,)
MUL = (operator.mul, torch.mul, torch.Tensor.mul)
DROPOUT = (torch.nn.functional.dropout, torch.dropout)
IN_PLACE = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem)
CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
                "double": torch.float64}

Scale = float | fx.Node


def is_call(node: object, targets: tuple[object, ...]) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def value(node: object) -> object:
    return node.meta.get("example_value") if isinstance(node, fx.Node) else node


def tensor_value(node: object) -> torch.Tensor | None:
    found = value(node)
    return found if isinstance(found, torch.Tensor) else None


def is_scalar(found: object) -> bool:
    if isinstance(found, (int, float, torch.SymInt, torch.SymFloat)):
        return not isinstance(found, bool)
    return isinstance(found, torch.Tensor) and found.dim() == 0


# ---- casts and views ---------------------------------------------------------------------------


def cast_source(node: object) -> fx.Node | None:
    """`t` when `node` is a dtype-only cast of `t` (`t.to(dtype)`, `t.to(dtype=…)`,
    `t.float()`, …), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_method" or not node.args:
        return None
    source = node.args[0]
    if not isinstance(source, fx.Node):
        return None
    if node.target in CAST_METHODS and len(node.args) == 1 and not node.kwargs:
        return source
    if node.target != "to":
        return None
    rest, kwargs = node.args[1:], dict(node.kwargs)
    kwargs.pop("copy", None) if kwargs.get("copy") is False else None
    dtype_only = (
        (len(rest) == 1 and isinstance(rest[0], torch.dtype) and not kwargs)
        or (not rest and set(kwargs) == {"dtype"})
        or (not rest and set(kwargs) == {"device", "dtype"} and _same_device(node, source))
    )
    return source if dtype_only else None


def _same_device(node: fx.Node, source: fx.Node) -> bool:
    out, into = tensor_value(node), tensor_value(source)
    return out is not None and into is not None and out.device == into.device


def strip_casts(node: object) -> object:
    """Follow dtype casts back to their first source."""
    while (source := cast_source(node)) is not None:
        node = source
    return node


def transpose_source(node: object) -> fx.Node | None:
    """`M` when `node` is `M.T`, `M.mT`, `M.t()`, `M.transpose(0, 1)` or `M.permute(1, 0)` of a
    2-D `M`, else None."""
    if not isinstance(node, fx.Node) or node.kwargs or not node.args:
        return None
    source, rest = node.args[0], tuple(node.args[1:])
    if node.op == "call_function" and node.target is getattr:
        is_t = rest in (("T",), ("mT",))
    elif node.op == "call_method" and node.target == "t" or is_call(node, (torch.t,)):
        is_t = rest == ()
    elif node.op == "call_method" and node.target == "transpose" or is_call(
            node, (torch.transpose,)):
        is_t = len(rest) == 2 and all(isinstance(d, int) for d in rest) and {
            d % 2 for d in rest} == {0, 1}
    elif node.op == "call_method" and node.target == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        is_t = tuple(dims) in ((1, 0), (-1, -2), (1, -2), (-1, 0))
    else:
        return None
    found = tensor_value(source)
    if not is_t or found is None or found.dim() != 2:
        return None
    return source  # type: ignore[return-value]


def _flatten_source(node: object) -> fx.Node | None:
    """`x` when `node` is `x.view(-1, d)` / `x.reshape(-1, d)` of x (…, d), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_method"
            and node.target in ("view", "reshape") and node.args):
        return None
    source, out = node.args[0], tensor_value(node)
    into = tensor_value(source)
    if into is None or out is None or out.dim() != 2 or into.dim() < 2:
        return None
    return source if out.shape[-1] == into.shape[-1] else None  # type: ignore[return-value]


def _unflatten_source(node: object) -> fx.Node | None:
    """`y2d` when `node` is a view/reshape of a 2-D `y2d` back to (…, d_out), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_method"
            and node.target in ("view", "reshape") and node.args):
        return None
    source, out = node.args[0], tensor_value(node)
    into = tensor_value(source)
    if into is None or out is None or into.dim() != 2 or out.shape[-1] != into.shape[-1]:
        return None
    return source  # type: ignore[return-value]


# ---- linear products ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    """A product of x by a 2-D weight of known layout, plus an optional bias."""

    node: fx.Node  # its result (after the view back, for Conv1D)
    x: fx.Node
    weight: fx.Node  # as stored (W for OUT_IN: F.linear's; W for IN_OUT: x @ W)
    bias: fx.Node | None
    layout: WeightLayout
    inner: tuple[fx.Node, ...] = ()  # the views and products between x and `node`
    weight_view: fx.Node | None = None  # `M.T` of `x @ M.T`, read by this product alone


def linear(node: object) -> Linear | None:
    """`F.linear(x, W, b)`; `x @ M.T` (M stored out×in); `x @ W` (W stored in×out); transformers'
    Conv1D `addmm(b, x.view(-1, d), W).view(…)` (W stored in×out)."""
    if not isinstance(node, fx.Node):
        return None
    if is_call(node, LINEAR):
        x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
        if isinstance(x, fx.Node) and isinstance(w, fx.Node):
            return Linear(node, x, w, b if isinstance(b, fx.Node) else None, WeightLayout.OUT_IN)
        return None
    if is_call(node, MATMUL) and len(node.args) == 2 and not node.kwargs:
        x, right = node.args
        if not isinstance(x, fx.Node) or not isinstance(right, fx.Node):
            return None
        source = transpose_source(right)
        if source is not None:
            return Linear(node, x, source, None, WeightLayout.OUT_IN, weight_view=right)
        weight = tensor_value(right)
        if weight is not None and weight.dim() == 2 and right.op in ("placeholder", "get_attr"):
            return Linear(node, x, right, None, WeightLayout.IN_OUT)
        return None
    flat = _unflatten_source(node)
    if is_call(flat, ADDMM) and not flat.kwargs and len(flat.args) == 3:  # type: ignore[union-attr]
        bias, x2d, w = flat.args  # type: ignore[union-attr]
        x = _flatten_source(x2d)
        if isinstance(x, fx.Node) and isinstance(w, fx.Node) and isinstance(bias, fx.Node):
            return Linear(node, x, w, bias, WeightLayout.IN_OUT, inner=(x2d, flat))
    return None


def with_bias(node: object) -> Linear | None:
    """A bias-free `x @ W` plus a 1-D bias of d_out elements (`x @ W + b`), else None."""
    if not (is_call(node, ADD) and len(node.args) == 2 and not node.kwargs):  # type: ignore[union-attr]
        return None
    for product, bias in (node.args, node.args[::-1]):  # type: ignore[union-attr]
        found = linear(product)
        b, out = tensor_value(bias), tensor_value(node)
        if (found is not None and found.bias is None and isinstance(bias, fx.Node)
                and bias.op in ("placeholder", "get_attr") and b is not None and b.dim() == 1
                and out is not None and b.shape[0] == out.shape[-1]):
            return Linear(node, found.x, found.weight, bias, found.layout,
                          (*found.inner, found.node), found.weight_view)
    return None


def base_linear(node: object) -> Linear | None:
    return linear(node) or with_bias(node)


# ---- the LoRA term -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """`s · linear(linear(S, A), B)` as nodes, maybe cast (PEFT's QLoRA casts the term to the
    base result's dtype); S is lora_A's input as read (a dropout, a cast, or x itself —
    resolved against the base's x by the matcher)."""

    mul: fx.Node | None
    lora_b: Linear
    lora_a: Linear
    scale: Scale
    cast: fx.Node | None = None

    @property
    def end(self) -> fx.Node:
        if self.cast is not None:
            return self.cast
        return self.mul if self.mul is not None else self.lora_b.node

    @property
    def product_end(self) -> fx.Node:
        """The term before its cast."""
        return self.mul if self.mul is not None else self.lora_b.node

    @property
    def lora_input(self) -> fx.Node:
        return self.lora_a.x


def term(node: object) -> Term | None:
    cast = None
    if (source := cast_source(node)) is not None:
        cast, node = node, source
    mul, outer, scale = None, node, 1.0
    if is_call(node, MUL) and len(node.args) == 2:  # type: ignore[union-attr]
        left, right = node.args  # type: ignore[union-attr]
        if linear(left) is not None and is_scalar(value(right)):
            mul, outer, scale = node, left, right
        elif linear(right) is not None and is_scalar(value(left)):
            mul, outer, scale = node, right, left
    lora_b = linear(outer)
    if lora_b is None or lora_b.inner:
        return None
    lora_a = linear(lora_b.x)
    if lora_a is None or lora_a.inner:
        return None
    return Term(mul, lora_b, lora_a, scale, cast)  # type: ignore[arg-type]


def dropout_source(node: object) -> fx.Node | None:
    """The input of a functional dropout, None if `node` is not one."""
    if not is_call(node, DROPOUT):
        return None
    source = arg(node, 0, "input")  # type: ignore[arg-type]
    return source if isinstance(source, fx.Node) else None


def dropout_p(node: fx.Node) -> float:
    """A functional dropout's effective p (0 in eval); ValueError when p or the training flag
    is not a constant, or it runs in place."""
    p, training = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
    inplace = arg(node, 3, "inplace", False)
    if not isinstance(p, (int, float)) or not isinstance(training, bool) or inplace is not False:
        raise ValueError("dropout with a non-constant p or training flag, or in place")
    return float(p) if training else 0.0


# ---- in-place ops ------------------------------------------------------------------------------


def mutates(node: fx.Node) -> bool:
    target = node.target
    if is_call(node, DROPOUT) and arg(node, 3, "inplace", False) is not False:
        return True
    if node.op == "call_method":
        return str(target).endswith("_") and not str(target).startswith("_")
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("_") or target in IN_PLACE


def mutation_between(first: fx.Node, last: fx.Node, allowed: set[fx.Node]) -> fx.Node | None:
    """An in-place op strictly between `first` and `last` in graph order that is not in
    `allowed`, if any. A rewrite reads its operands where it is inserted, not where the old
    nodes read them: a mutation in between — of x through a view, `x[...] = v`, a hook — would
    change what the rewritten call sees."""
    node = first.next
    while node is not last and node.op != "root":
        if mutates(node) and node not in allowed:
            return node
        node = node.next
    return None
