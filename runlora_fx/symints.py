"""A concrete value for a possibly symbolic size, without installing a guard."""

from __future__ import annotations

import torch


def size_hint(dim: int | torch.SymInt) -> int:
    """The size Dynamo traced with, for planning only (no guard). torch 2.13 names this
    `optimization_hint`; older releases (2.11, on the GPU image) read the shape env's hint."""
    if not isinstance(dim, torch.SymInt):
        return int(dim)
    try:
        from torch.fx.experimental.symbolic_shapes import optimization_hint
    except ImportError:
        node = dim.node
        return int(node.hint if node.hint is not None else node.shape_env.size_hint(node.expr))
    return int(optimization_hint(dim))
