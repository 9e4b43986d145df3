"""The ways a plan may share a GEMM: one table (`SHARING`) that the plans (a flag each, and its
text), the program builder and its fusion pass, and the choose stage (sharing across members
or not) all read; and the classes of GEMM a program tags for it (`Gemm`).

Adding a way to share is one row here, its flag on `Plan` (plans.py, with the values worth
trying) and the `Gemm` tags the builder puts on the products it joins (program.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Gemm(enum.Enum):
    """The class of a GEMM the builder emits: which operand it shares with which (fusion.py)."""

    XW = "xW"  # x·Wᵀ: the base product
    XA = "xA"  # x·Aᵀ: h
    DYW = "dyW"  # dy·W: dx's base part (or dy·W_eff)
    DYB = "dyB"  # dy·(s·B): dh
    DHX = "dhx"  # dhᵀ·x: dA


@dataclass(frozen=True)
class Sharing:
    """One way of sharing a GEMM: the Plan flag that turns it on, how `Plan.describe` says it,
    the two GEMM classes it joins, and whether it joins GEMMs of different members (q/k/v)."""

    flag: str
    text: str
    joins: tuple[Gemm, Gemm]
    across_members: bool


# In the order `Plan.describe` names them (its text is part of the timing cache's key).
SHARING = (
    Sharing("fold_x", "x·[W;A]ᵀ", (Gemm.XW, Gemm.XA), across_members=False),
    Sharing("fold_dy", "dy·[W|sB]", (Gemm.DYW, Gemm.DYB), across_members=False),
    Sharing("group_h", "x·[A…]ᵀ", (Gemm.XA, Gemm.XA), across_members=True),
    Sharing("group_da", "[dh…]ᵀx", (Gemm.DHX, Gemm.DHX), across_members=True),
    Sharing("stack_w", "x·[W…]ᵀ", (Gemm.XW, Gemm.XW), across_members=True),
)
