"""Candidate plans of a site: one choice per contraction order (DESIGN.md §1).

A `Plan` is plain data, like an opt_einsum path: the enumerator proposes every combination,
`illegal_reason` says which are not equivalent for a given site, and `program.py` turns a legal
plan into the ops that run. Choices that do not matter for a site are canonicalised to None so
that each distinct computation appears once.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, replace

from runlora_fx.site import LoraSite


class Forward(enum.Enum):
    SPLIT = "split"  # x Wᵀ + s (x Aᵀ) Bᵀ
    MERGED = "merged"  # x (W + s B A)ᵀ


class InputGrad(enum.Enum):
    SPLIT = "split"  # dy W + (g B) A
    MERGED_RECOMPUTE = "merged, W_eff recomputed"  # dy (W + s B A), W_eff rebuilt in backward
    MERGED_KEEP = "merged, W_eff kept"  # dy W_eff, W_eff saved from the forward


class GradA(enum.Enum):
    VIA_DH = "(gB)ᵀx"  # (s·dy B)ᵀ D(x)
    VIA_G = "Bᵀ(gᵀx)"  # s·Bᵀ (dyᵀ D(x)), the d_out×d_in product shared with dB


class GradB(enum.Enum):
    VIA_H = "gᵀh"  # s·dyᵀ h, h = D(x) Aᵀ
    VIA_G = "(gᵀx)Aᵀ"  # s·(dyᵀ D(x)) Aᵀ


class Hidden(enum.Enum):
    SAVE = "save h"
    RECOMPUTE = "recompute h"


@dataclass(frozen=True)
class Plan:
    forward: Forward
    input_grad: InputGrad | None  # None: x does not require grad
    grad_a: GradA | None  # None: no A requires grad
    grad_b: GradB | None  # None: no B requires grad
    hidden: Hidden | None  # None: the backward does not read h

    def describe(self) -> str:
        parts = [f"fwd {self.forward.value}"]
        if self.input_grad is not None:
            parts.append(f"dx {self.input_grad.value}")
        if self.grad_a is not None:
            parts.append(f"dA {self.grad_a.value}")
        if self.grad_b is not None:
            parts.append(f"dB {self.grad_b.value}")
        if self.hidden is not None:
            parts.append(self.hidden.value)
        return " · ".join(parts)

    @property
    def reads_weff_in_backward(self) -> bool:
        return self.input_grad in (InputGrad.MERGED_RECOMPUTE, InputGrad.MERGED_KEEP)


def reference_plan(site: LoraSite) -> Plan:
    """What eager PEFT (and plain Inductor) computes: split everywhere, h saved."""
    return canonical(
        Plan(Forward.SPLIT, InputGrad.SPLIT, GradA.VIA_DH, GradB.VIA_H, Hidden.SAVE), site
    )


def canonical(plan: Plan, site: LoraSite) -> Plan:
    """Drop the choices the site makes irrelevant (grads not required, h not read)."""
    any_a = any(a.a_requires_grad for a in site.adapters)
    any_b = any(a.b_requires_grad for a in site.adapters)
    plan = replace(
        plan,
        input_grad=plan.input_grad if site.x_requires_grad else None,
        grad_a=plan.grad_a if any_a else None,
        grad_b=plan.grad_b if any_b else None,
    )
    if plan.grad_b is not GradB.VIA_H:
        plan = replace(plan, hidden=None)
    return plan


def illegal_reason(plan: Plan, site: LoraSite) -> str | None:
    """Why `plan` is not equivalent to the site's math, or None when it is."""
    merged = plan.forward is Forward.MERGED or plan.reads_weff_in_backward
    if merged and not site.can_merge:
        return "merging W + sBA needs every LoRA branch to read x itself (dropout is active)"
    if merged and site.matmul_dtype.itemsize < 4:
        return (
            f"merging W + sBA in {str(site.matmul_dtype).removeprefix('torch.')} rounds away "
            "every update below half an ulp of W (tests/test_dtypes.py measures it)"
        )
    if site.x_requires_grad and plan.input_grad is None:
        return "x requires grad but the plan computes no dx"
    if any(a.a_requires_grad for a in site.adapters) and plan.grad_a is None:
        return "A requires grad but the plan computes no dA"
    if any(a.b_requires_grad for a in site.adapters) and plan.grad_b is None:
        return "B requires grad but the plan computes no dB"
    if plan.grad_b is GradB.VIA_H and plan.hidden is None:
        return "dB = gᵀh needs h saved or recomputed"
    return None


def plans_for(site: LoraSite) -> list[Plan]:
    """Every legal, distinct plan for the site, in a stable order."""
    choices = itertools.product(
        Forward, [*InputGrad, None], [*GradA, None], [*GradB, None], [*Hidden, None]
    )
    seen: dict[Plan, None] = {}
    for combo in choices:
        plan = canonical(Plan(*combo), site)
        if plan not in seen and illegal_reason(plan, site) is None:
            seen[plan] = None
    return list(seen)
