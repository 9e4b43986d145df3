"""The steps of a plan's program: ops over named tensors, and the shape and dtype each result
has (`infer`) — what the builder (program.py), the GEMM-sharing pass (fusion.py), the cost model
and the executor all read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from runlora_fx.precision import Rounding

Op = Literal["mm", "scale", "add", "colsum", "cast", "round", "cat", "slice", "t", "copy"]
Shape = tuple[int, ...]
Meta = tuple[Shape, torch.dtype]


@dataclass(frozen=True)
class Step:
    """`out = op(args)`. mm: args[0]ᵀ? @ args[1]ᵀ? per `transpose`; scale: args[0]·scales[scale];
    add: Σ args (broadcasting the bias, promoting dtypes); colsum: Σ over rows; cast / round:
    to `dtype` (round: by `rounding`); cat: along `dim`; slice: [start, stop) along `dim`;
    t: the transposed view; copy: a contiguous copy with its own storage."""

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
    recompute: bool = False  # forward steps the partitioner must recompute, not save
    fusion: tuple[str, int] | None = None  # (GEMM class, member) for `fuse`



# ---- shapes and dtypes -------------------------------------------------------------------------


def mm_dims(step: Step, metas: dict[str, Meta]) -> tuple[int, int, int]:
    """(m, k, n) of `op(a) @ op(b)`."""
    (a, _), (b, _) = (metas[name] for name in step.args)
    m, k = (a[1], a[0]) if step.transpose[0] else a
    k2, n = (b[1], b[0]) if step.transpose[1] else b
    assert k == k2, f"{step}: inner dims {k} != {k2}"
    return m, k, n


def infer(step: Step, metas: dict[str, Meta]) -> Meta:
    """The shape and dtype of a step's result."""
    first_shape, first_dtype = metas[step.args[0]]
    if step.op == "mm":
        m, _, n = mm_dims(step, metas)
        dtypes = {metas[a][1] for a in step.args}
        assert len(dtypes) == 1, f"{step}: operands in {dtypes}"
        return (m, n), first_dtype
    if step.op == "colsum":
        return first_shape[1:], first_dtype
    if step.op in ("cast", "round"):
        assert step.dtype is not None
        return first_shape, step.dtype
    if step.op == "add":
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
    return first_shape, first_dtype  # scale
