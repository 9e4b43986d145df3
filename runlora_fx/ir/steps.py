"""The steps of a plan's program: ops over named tensors, and the shape and dtype each result
has (`infer`) — what the builder (program.py), the GEMM-sharing pass (fusion.py), the cost model
and the executor all read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from runlora_fx.ir.dropout import modelled_slots, position_dtype, wide_dtype
from runlora_fx.ir.rounding import Rounding
from runlora_fx.ir.sharing import Gemm

Op = Literal["mm", "add_mm", "scale", "add", "sub", "colsum", "cast", "round", "cat", "slice",
             "t", "copy", "seed", "positions", "s_times_at", "lt_times_s", "zero_at",
             "minus_dots_at", "refresh"]
GEMMS = ("mm", "add_mm")  # the steps that run a matrix product
Shape = tuple[int, ...]
Meta = tuple[Shape, torch.dtype]


@dataclass(frozen=True)
class Step:
    """`out = op(args)`. mm: args[0]ᵀ? @ args[1]ᵀ? per `transpose`; add_mm: args[0] + the mm
    of args[1:], in place on args[0] (a GEMM's fresh result nothing else reads); scale:
    args[0]·scales[scale] (none when `scale` < 0)·`factor`; add: Σ args (broadcasting the bias,
    promoting dtypes); sub: args[0] − args[1]; colsum: Σ over rows; cast / round: to `dtype`
    (round: by `rounding`); cat: along `dim`; slice: [start, stop) along `dim`; t: the
    transposed view; copy: a contiguous copy with its own storage.

    Sparse dropout (dropout.py), with P the dropped positions of a site's D(x) = (x − S)/q:
    seed: a seed from torch's generator of args[0]'s device; positions: P of a Bernoulli(`p`) mask over args[1]'s
    elements, from seed args[0]; s_times_at: S·Aᵀ of (x, P, A); lt_times_s: Lᵀ·S of (L, P, x);
    zero_at: args[0] with P zeroed; minus_dots_at: (dense, P, L, A) → dense − `factor`·(L·A)
    at P.

    refresh: a persistent stack's parts `args` rewritten in place between steps (stacks.py);
    never in a program, only in its costs (cost.step_costs)."""

    out: str
    op: Op
    args: tuple[str, ...]
    transpose: tuple[bool, bool] = (False, False)
    scale: int = -1
    dtype: torch.dtype | None = None
    rounding: Rounding | None = None
    dim: int = 0
    start: int = 0
    stop: int = 0
    factor: float = 1.0  # scale: a constant factor (1/q, −s/q) besides the scale value
    p: float = 0.0  # positions: the dropout probability
    recompute: bool = False  # forward steps the partitioner must recompute, not save
    fusion: tuple[Gemm, int] | None = None  # (GEMM class, member) for `fuse`


# ---- shapes and dtypes -------------------------------------------------------------------------


def mm_dims(step: Step, metas: dict[str, Meta]) -> tuple[int, int, int]:
    """(m, k, n) of `op(a) @ op(b)`: an mm's operands, an add_mm's last two."""
    (a, _), (b, _) = (metas[name] for name in step.args[-2:])
    m, k = (a[1], a[0]) if step.transpose[0] else a
    k2, n = (b[1], b[0]) if step.transpose[1] else b
    assert k == k2, f"{step}: inner dims {k} != {k2}"
    return m, k, n


def infer(step: Step, metas: dict[str, Meta]) -> Meta:
    """The shape and dtype of a step's result."""
    first_shape, first_dtype = metas[step.args[0]]
    if step.op == "seed":  # drawn on its argument's device
        return (), torch.int64
    if step.op == "positions":  # the buffer: its slots (bounded as the cost model counts them)
        n, d = metas[step.args[1]][0]
        return (modelled_slots(n, d, step.p) + 1,), position_dtype(n * d)
    if step.op == "s_times_at":  # (x, P, A) → N×r
        return (first_shape[0], metas[step.args[2]][0][0]), wide_dtype(first_dtype)
    if step.op == "lt_times_s":  # (L, P, x) → k×d
        return (first_shape[1], metas[step.args[2]][0][1]), wide_dtype(metas[step.args[2]][1])
    if step.op in GEMMS:
        m, _, n = mm_dims(step, metas)
        dtypes = {metas[a][1] for a in step.args}
        assert len(dtypes) == 1, f"{step}: operands in {dtypes}"
        return (m, n), first_dtype
    if step.op == "colsum":
        return first_shape[1:], first_dtype
    if step.op in ("cast", "round"):
        assert step.dtype is not None
        return first_shape, step.dtype
    if step.op in ("add", "sub"):
        dtype = first_dtype
        for name in step.args[1:]:
            dtype = torch.promote_types(dtype, metas[name][1])
        return first_shape, dtype
    if step.op == "cat":
        size = sum(metas[a][0][step.dim] for a in step.args)
        shape = list(first_shape)
        shape[step.dim] = size
        return tuple(shape), first_dtype
    if step.op == "slice":
        shape = list(first_shape)
        shape[step.dim] = step.stop - step.start
        return tuple(shape), first_dtype
    if step.op == "t":
        return first_shape[::-1], first_dtype
    return first_shape, first_dtype  # scale, zero_at, minus_dots_at
