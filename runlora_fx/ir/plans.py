"""Candidate plans of a unit (a site, or sites reading the same x): one choice per contraction
order (docs/design.md, "Plans from contraction orders"), per dtype the LoRA products run in,
and per way of sharing a GEMM (sharing.SHARING).

A `Plan` is plain data, like an opt_einsum path: the enumerator proposes every combination,
`illegal_reason` says which are not equivalent for a given unit (precision.py adds the measured
rule for 16-bit plans), and `program.py` turns a legal plan into the ops that run. Choices that
do not matter for a unit are canonicalised to None / False so each computation appears once.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace

from runlora_fx.ir.sharing import SHARING, Sharing
from runlora_fx.ir.precision import Precision, precision_reason
from runlora_fx.ir.rounding import Rounding
from runlora_fx.ir.site import Base, LoraSite, SiteGroup, dtype_name


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


class Dropout(enum.Enum):
    """Where a dropout branch's D(x) comes from (dropout.py)."""

    GRAPH = "graph's dropout"  # the graph's own op: a dense N×d mask drawn, applied and kept
    SPARSE = "sparse dropout, positions kept"  # D(x) = (x − S)/q; the p·N·d positions kept
    SPARSE_REDRAWN = "sparse dropout, positions redrawn"  # only a seed kept; backward redraws

    @property
    def is_sparse(self) -> bool:
        return self is not Dropout.GRAPH


@dataclass(frozen=True)
class Plan:
    forward: Forward
    input_grad: InputGrad | None  # None: x does not require grad
    grad_a: GradA | None  # None: no A requires grad
    grad_b: GradB | None  # None: no B requires grad
    hidden: Hidden | None  # None: the backward does not read h
    branch: Precision | None = None  # None: the LoRA products run in the base dtype anyway
    rounding: Rounding | None = None  # None: nothing merged, or the base dtype is 32-bit
    dropout: Dropout | None = None  # None: no branch of the unit has an active dropout
    # GEMMs that share an operand, run as one (every output element is the same dot product);
    # one flag per row of sharing.SHARING:
    fold_x: bool = False  # x·[W; A]ᵀ → a member's base product and its h's
    fold_dy: bool = False  # dy·[W | s·B] → a member's dy·W (or dx) and its dh's
    group_h: bool = False  # x·[A_1; A_2; …]ᵀ → every h of the unit
    group_da: bool = False  # [dh_1 | dh_2 | …]ᵀ·x → every dA of the unit
    stack_w: bool = False  # x·[W_1; W_2; …]ᵀ → every member's base product

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
        if self.branch is not None:
            parts.append(self.branch.value)
        if self.rounding is not None:
            parts.append(f"W_eff rounded {self.rounding.value}")
        if self.dropout is not None:
            parts.append(self.dropout.value)
        parts += [way.text for way in self.sharing]
        return " · ".join(parts)

    @property
    def sharing(self) -> tuple[Sharing, ...]:
        """The ways this plan shares GEMMs (rows of sharing.SHARING)."""
        return tuple(way for way in SHARING if getattr(self, way.flag))

    @property
    def merges(self) -> bool:
        return self.forward is Forward.MERGED or self.reads_weff_in_backward

    @property
    def reads_weff_in_backward(self) -> bool:
        return self.input_grad in (InputGrad.MERGED_RECOMPUTE, InputGrad.MERGED_KEEP)

    @property
    def sparse_dropout(self) -> bool:
        """Its dropout branches read x, corrected at the dropped positions (dropout.py)."""
        return self.dropout is not None and self.dropout.is_sparse

    @property
    def groups_members(self) -> bool:
        """Shares a GEMM across sites (q/k/v), not only within one."""
        return any(way.across_members for way in self.sharing)

    def within_members(self) -> Plan:
        """The plan without its sharing across members (each member's own part of it)."""
        return replace(self, **{way.flag: False for way in SHARING if way.across_members})


def reference_plan(unit: SiteGroup) -> Plan:
    """What eager PEFT (and plain Inductor) computes: split everywhere, h saved, each product in
    the dtype the site runs it in."""
    return canonical(
        Plan(Forward.SPLIT, InputGrad.SPLIT, GradA.VIA_DH, GradB.VIA_H, Hidden.SAVE,
             Precision.SITE, dropout=Dropout.GRAPH),
        unit,
    )


def _reads_x(site: LoraSite, sparse_dropout: bool) -> int:
    """How many of the site's adapters run their products on x itself: those without dropout,
    and under sparse dropout every one (its correction reads the dropped positions only)."""
    return sum(a.reads_base_input or sparse_dropout for a in site.adapters)


def _has_dropout(members: tuple[LoraSite, ...]) -> bool:
    return any(not a.reads_base_input for s in members for a in s.adapters)


def canonical(plan: Plan, unit: SiteGroup) -> Plan:
    """Drop the choices the unit makes irrelevant (grads not required, h not read, a dtype
    that is already the base's, a GEMM with nothing to share)."""
    members = unit.members
    first = members[0]
    any_a = any(a.a_requires_grad for s in members for a in s.adapters)
    any_b = any(a.b_requires_grad for s in members for a in s.adapters)
    plan = replace(
        plan,
        input_grad=plan.input_grad if first.x_requires_grad else None,
        grad_a=plan.grad_a if any_a else None,
        grad_b=plan.grad_b if any_b else None,
        branch=plan.branch if first.lora_dtype != first.base_dtype else None,
        rounding=plan.rounding if plan.merges and first.is_low_precision else None,
        dropout=plan.dropout if _has_dropout(members) else None,
    )
    if plan.grad_b is not GradB.VIA_H:
        plan = replace(plan, hidden=None)
    h_in_forward = plan.forward is Forward.SPLIT or plan.hidden is Hidden.SAVE
    dh_in_backward = plan.grad_a is GradA.VIA_DH or plan.input_grad is InputGrad.SPLIT
    opaque = any(s.base is Base.OPAQUE for s in members)
    x_readers = sum(_reads_x(s, plan.sparse_dropout) for s in members)
    return replace(
        plan,
        fold_x=plan.fold_x and h_in_forward and not opaque and x_readers > 0,
        # (not with W_eff kept: the partitioner would save [W_eff | s·B] instead of W_eff)
        fold_dy=plan.fold_dy and plan.input_grad not in (None, InputGrad.MERGED_KEEP)
        and dh_in_backward and not opaque,
        group_h=plan.group_h and x_readers > 1 and (h_in_forward or plan.hidden is not None),
        group_da=plan.group_da and plan.grad_a is GradA.VIA_DH and x_readers > 1,
        stack_w=plan.stack_w and len(members) > 1 and not opaque,
    )


def illegal_reason(plan: Plan, unit: SiteGroup) -> str | None:
    """Why `plan` is not equivalent to the unit's math, or None when it is."""
    members = unit.members
    site = members[0]
    if plan.merges and any(s.base is Base.OPAQUE for s in members):
        return "merging W + sBA needs W as a tensor; this base is a quantized op"
    if plan.merges and _has_dropout(members) and not plan.sparse_dropout:
        return ("merging W + sBA needs every LoRA branch to read x itself: the graph's dropout "
                "feeds one (sparse dropout reads x)")
    if _has_dropout(members) and plan.dropout is None:
        return "a LoRA branch has an active dropout: say where its D(x) comes from"
    if plan.sparse_dropout:
        reason = _sparse_reason(members)
        if reason is not None:
            return reason
    elif len(members) > 1 and _has_dropout(members):
        return ("one call for the group cannot read each member's D(x) from the graph's "
                "dropout: only sparse dropout lets it replace them")
    if site.x_requires_grad and plan.input_grad is None:
        return "x requires grad but the plan computes no dx"
    if any(a.a_requires_grad for s in members for a in s.adapters) and plan.grad_a is None:
        return "A requires grad but the plan computes no dA"
    if any(a.b_requires_grad for s in members for a in s.adapters) and plan.grad_b is None:
        return "B requires grad but the plan computes no dB"
    if plan.grad_b is GradB.VIA_H and plan.hidden is None:
        return "dB = gᵀh needs h saved or recomputed"
    if site.lora_dtype != site.base_dtype and plan.branch is None:
        return "the site's LoRA products run in another dtype than its base: say which"
    if site.is_low_precision and plan.merges and plan.rounding is None:
        return "a 16-bit W_eff needs a rounding"
    lora_in_base = plan.branch is not Precision.SITE or site.lora_dtype == site.base_dtype
    if (plan.fold_x or plan.fold_dy) and not lora_in_base:
        return (f"one GEMM cannot run the base in {dtype_name(site.base_dtype)} and the LoRA "
                f"products in {dtype_name(site.lora_dtype)}")
    for s in members:
        reason = precision_reason(s, plan.merges, plan.rounding, plan.branch,
                                  sparse_dropout=plan.sparse_dropout)
        if reason is not None:
            return reason
    return None


def _sparse_reason(members: tuple[LoraSite, ...]) -> str | None:
    """Why the unit's dropout branches cannot draw their own positions, or None."""
    for s in members:
        for a in s.adapters:
            if a.reads_base_input:
                continue
            if not a.own_dropout:
                return ("the branch's dropout result is read elsewhere too: only the graph's "
                        "mask gives every reader the same D(x)")
            if a.dropout_p >= 1.0:
                return "dropout p = 1 drops every element: D(x) is 0, there is no x − S"
    return None


def sparse_where_legal(plans: Iterable[Plan], unit: SiteGroup) -> list[Plan]:
    """The plans a criterion chooses from: where sparse dropout is legal at the unit it is the
    rule (option dropout, docs/lora-forms.md), so the graph's-dropout plans go. They keep an
    N×d mask and a dropped copy of x, which no criterion should trade for a GEMM call."""
    plans = list(plans)
    if not _has_dropout(unit.members) or _sparse_reason(unit.members) is not None:
        return plans
    if not any(plan.sparse_dropout for plan in plans):  # option dropout="graph"
        return plans
    return [plan for plan in plans if plan.sparse_dropout]


def _choices(unit: SiteGroup, rounding: Rounding, fusions: bool,
             sparse_dropout: bool) -> dict[str, list]:
    """The values worth trying per Plan field: a choice the unit makes irrelevant gets one."""
    members = unit.members
    site = members[0]
    flag = [False, True] if fusions else [False]
    linear = all(s.base is Base.LINEAR for s in members)
    dropouts = [None]
    if _has_dropout(members):
        dropouts = [*Dropout] if sparse_dropout else [Dropout.GRAPH]
    x_readers = sum(_reads_x(s, sparse_dropout) for s in members)
    return {
        "forward": list(Forward) if linear else [Forward.SPLIT],
        "input_grad": [*InputGrad] if site.x_requires_grad else [None],
        "grad_a": [*GradA, None],
        "grad_b": [*GradB, None],
        "hidden": [*Hidden, None],
        "branch": [*Precision] if site.lora_dtype != site.base_dtype else [None],
        "rounding": [rounding] if site.is_low_precision and linear else [None],
        "dropout": dropouts,
        "fold_x": flag if linear and x_readers else [False],
        "fold_dy": flag if linear else [False],
        "group_h": flag if x_readers > 1 else [False],
        "group_da": flag if x_readers > 1 else [False],
        "stack_w": flag if len(members) > 1 and linear else [False],
    }


def plans_for(
    unit: SiteGroup, rounding: Rounding = Rounding.NEAREST, fusions: bool = True,
    sparse_dropout: bool = True,
) -> list[Plan]:
    """Every legal, distinct plan for the unit, in a stable order. `rounding` is the one a
    merged 16-bit W_eff uses (option merge_rounding); `fusions=False` leaves out the plans that
    share GEMMs; `sparse_dropout=False` keeps every graph's dropout (option dropout)."""
    choices = _choices(unit, rounding, fusions, sparse_dropout)
    assert list(choices) == [f.name for f in fields(Plan)], "one list of values per field"
    seen: dict[Plan, None] = {}
    for combo in itertools.product(*choices.values()):
        plan = canonical(Plan(*combo), unit)
        if plan not in seen and illegal_reason(plan, unit) is None:
            seen[plan] = None
    return list(seen)


def sharing_across(template: Plan, unit: SiteGroup) -> list[Plan]:
    """The unit's legal plans that run `template` (a member's own plan) in every member and
    share GEMMs across members, one per combination of those ways of sharing: the few plans a
    group is chosen among (plans_for would enumerate every other choice too)."""
    across = [way.flag for way in SHARING if way.across_members]
    found: dict[Plan, None] = {}
    for flags in itertools.product([False, True], repeat=len(across)):
        plan = canonical(replace(template, **dict(zip(across, flags))), unit)
        if (plan.groups_members and plan.within_members() == template
                and illegal_reason(plan, unit) is None):
            found[plan] = None
    return list(found)

