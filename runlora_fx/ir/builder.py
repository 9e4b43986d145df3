"""What program.py builds a program with: a phase's steps, each name emitted once, with shapes
and dtypes tracked and casts inserted where an operand is stored in another dtype than the
product reads (`Builder`); and one member of the unit as a plan runs it (`Member`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runlora_fx.ir import operands as ops
from runlora_fx.ir.operands import Derived
from runlora_fx.ir.plans import Plan
from runlora_fx.ir.precision import Precision
from runlora_fx.ir.sharing import Gemm
from runlora_fx.ir.site import LoraSite, SiteGroup, WeightLayout
from runlora_fx.ir.steps import Meta, Step, infer


class Builder:
    """One phase's steps, each name emitted once, with shapes and dtypes tracked and casts
    inserted where an operand is stored in another dtype than the product reads."""

    def __init__(self, metas: dict[str, Meta], forward: Builder | None = None) -> None:
        self.metas = metas
        self.steps: list[Step] = []
        self.defined: set[str] = set()
        self.forward = forward  # the backward's: the forward it reads (it draws no new bits)

    @property
    def backward(self) -> bool:
        return self.forward is not None

    def emit(self, step: Step) -> str:
        if step.out not in self.defined:  # shared subexpression: computed once
            self.defined.add(step.out)
            self.metas[step.out] = infer(step, self.metas)
            self.steps.append(step)
        return step.out

    def cast(self, name: str, dtype: torch.dtype, recompute: bool = False) -> str:
        """`name` in `dtype`. Of x and its cast the backward keeps the narrower: it reads the
        forward's cast down (autocast's bf16 copy of fp32 x), and casts up again itself
        (PEFT's fp32 copy of bf16 x, whose forward cast is recomputed, not kept)."""
        if self.metas[name][1] == dtype:
            return name
        out = ops.derived(Derived.CAST, name, dtype)
        narrows = dtype.itemsize < self.metas[name][1].itemsize
        if self.forward is not None and narrows and out in self.forward.defined:
            return out
        widens_x = name == ops.X and not narrows and self.forward is None
        return self.emit(Step(out, "cast", (name,), dtype=dtype, recompute=recompute or widens_x))

    def mm(self, out: str, a: str, b: str, transpose: tuple[bool, bool] = (False, False),
           fusion: tuple[Gemm, int] | None = None, recompute: bool = False) -> str:
        return self.emit(Step(out, "mm", (a, b), transpose, recompute=recompute, fusion=fusion))


@dataclass(frozen=True)
class Member:
    """What one member's steps need: its site, index, dtypes under the plan, scale offset."""

    site: LoraSite
    m: int
    scale0: int  # index of its first adapter's scale in the unit's scales

    @property
    def base(self) -> torch.dtype:
        return self.site.base_dtype

    def lora(self, plan: Plan) -> torch.dtype:
        """The dtype its LoRA products run in under `plan`."""
        return self.site.base_dtype if plan.branch is Precision.BASE else self.site.lora_dtype

    def sparse_p(self, plan: Plan, k: int) -> float | None:
        """Adapter k's dropout p where the plan draws its dropped positions, else None."""
        p = self.site.adapters[k].dropout_p
        return p if p > 0.0 and plan.sparse_dropout else None

    def lora_input(self, plan: Plan, k: int) -> str:
        return ops.lora_input(self.site, self.m, k, graph_dropout=not plan.sparse_dropout)

    @property
    def w_transposed(self) -> bool:
        """Whether x·W needs W transposed (F.linear's out×in layout)."""
        return self.site.weight_layout is WeightLayout.OUT_IN

    @property
    def weff_dtype(self) -> torch.dtype:
        """W + sBA is summed in at least fp32, then rounded once to the base dtype."""
        site = self.site
        return torch.promote_types(torch.float32,
                                   torch.promote_types(site.weight_dtype, site.adapter_dtype))


def members(unit: SiteGroup) -> list[Member]:
    found, offset = [], 0
    for m, site in enumerate(unit.members):
        found.append(Member(site, m, offset))
        offset += len(site.adapters)
    return found
