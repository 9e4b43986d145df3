"""The Chooser: the one entry point of the choose stage. It scores a unit's candidates by one
criterion, measuring the device when the criterion needs it (`choose`); decides a unit found in
a graph — a group plan or one per member (units.py), over a range of a symbolic N (dynamic.py)
— (`decide`); and decides a graph's sites together under a memory budget (`decide_within`,
budget.py).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import replace

import torch

from runlora_fx.choice import dynamic, units
from runlora_fx.choice.budget import Budget, fit_budget
from runlora_fx.choice.criteria import (
    COUNTED, CRITERIA, Candidate, Decision, pick, priced, reference,
)
from runlora_fx.cost.cache import MeasurementCache
from runlora_fx.cost.cost import AffineCost, Cost, costs_at_0_and_1
from runlora_fx.cost.measure import time_plans, unit_signature
from runlora_fx.cost.roofline import DeviceModel, device_model, plan_seconds
from runlora_fx.ir.plans import Plan, plans_for, sparse_where_legal
from runlora_fx.ir.program import Program, program_for
from runlora_fx.ir.rounding import Rounding
from runlora_fx.ir.site import SiteGroup, dtype_name

log = logging.getLogger("runlora_fx")

# the plans per unit the "time" criterion measures: the roofline's fastest (plans_to_time), and
# only those it predicts within TIMED_WITHIN of its fastest: at real widths a plan predicted 30%
# slower does not win, and timing it costs a fwd+bwd of a large layer per round
TIMED_PER_UNIT = 6
TIMED_WITHIN = 1.3


def anonymous(unit: SiteGroup) -> SiteGroup:
    """The unit without its paths: what a choice depends on."""
    return SiteGroup(tuple(replace(site, path="") for site in unit.members))


class Chooser:
    """Scores candidates by one criterion, measuring the device when the criterion needs it.

    Calibrations and timings go through `MeasurementCache`, so a second process (or a second
    graph with the same site shapes) reuses them instead of measuring again.
    """

    def __init__(
        self,
        criterion: str,
        cache_root: str | os.PathLike[str] | None = None,
        budgeted: bool = False,
        rounding: Rounding = Rounding.NEAREST,
        fusions: bool = True,
        sparse_dropout: bool = True,
    ) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; choose one of {tuple(CRITERIA)}")
        self.criterion = criterion
        self.cache_root = cache_root
        # under a memory budget every candidate may be chosen; else only those within the cap
        self.budgeted = budgeted
        self.rounding = rounding
        self.fusions = fusions
        self.sparse_dropout = sparse_dropout  # plans may draw their own dropped positions
        self._caches: dict[str, MeasurementCache] = {}
        self._timed: dict[str, dict[str, float]] = {}  # signature → plan → seconds, this process
        self._chosen: dict[SiteGroup, Decision] = {}  # by anonymous unit: N probes repeat
        # by anonymous unit at N = 0: its legal plans, and each plan's cost at N = 0 and N = 1
        # (affine in N), worked out when first asked for: a group asks for a handful of its
        # plans (units.py), not for all of them
        self._plans: dict[SiteGroup, tuple[Plan, ...]] = {}
        self._affine: dict[SiteGroup, dict[Plan, tuple[Cost, Cost]]] = {}
        self._programs: dict[SiteGroup, dict[Plan, Program]] = {}  # a plan's steps: any N

    def cache(self, device: str) -> MeasurementCache:
        if device not in self._caches:
            self._caches[device] = MeasurementCache(self.cache_root, torch.device(device))
        return self._caches[device]

    def plans(self, unit: SiteGroup) -> tuple[Plan, ...]:
        """Every legal plan of the unit, enumerated once per shape."""
        key = anonymous(unit.with_n(0))
        if key not in self._plans:
            self._plans[key] = tuple(sparse_where_legal(
                plans_for(unit, self.rounding, self.fusions, self.sparse_dropout), unit))
        return self._plans[key]

    def _costs_in_n(self, unit: SiteGroup, plans: Sequence[Plan]) -> list[tuple[Cost, Cost]]:
        """Each plan's cost at N = 0 and N = 1, worked out once per plan and shape."""
        known = self._affine.setdefault(anonymous(unit.with_n(0)), {})
        programs = self.programs(unit, plans)
        for plan in plans:
            if plan not in known:
                known[plan] = costs_at_0_and_1(plan, unit, programs[plan])
        return [known[plan] for plan in plans]

    def programs(self, unit: SiteGroup, plans: Sequence[Plan]) -> dict[Plan, Program]:
        """The plans' programs, built once per plan and shape (their steps do not depend on
        N)."""
        known = self._programs.setdefault(anonymous(unit.with_n(0)), {})
        for plan in plans:
            if plan not in known:
                known[plan] = program_for(plan, unit)
        return known

    def counted(self, unit: SiteGroup, plans: Sequence[Plan] | None = None
                ) -> tuple[Candidate, ...]:
        """The unit's candidates (`plans`, default all of them) with counted costs, evaluated
        at the unit's N from their costs at N = 0 and 1 (every count is affine in N; probing a
        symbolic N asks for many)."""
        plans = self.plans(unit) if plans is None else tuple(plans)
        return tuple(Candidate(plan, at0.at(unit.n, at1))
                     for plan, (at0, at1) in zip(plans, self._costs_in_n(unit, plans)))

    def affine(self, plan: Plan, unit: SiteGroup) -> AffineCost:
        """One of the unit's candidate plans' counted cost as a function of N."""
        return AffineCost.between(*self._costs_in_n(unit, (plan,))[0])

    def candidates(
        self, unit: SiteGroup, plans: Sequence[Plan] | None = None
    ) -> tuple[Candidate, ...]:
        """The unit's candidates (`plans`, default all of them), scored as the criterion
        needs."""
        counted = self.counted(unit, plans)
        if self.criterion == "priced":
            return priced(unit, counted, self.programs(unit, [c.plan for c in counted]))
        if self.criterion in COUNTED:
            return counted
        site = unit.members[0]
        model = device_model(torch.device(site.device), site.base_dtype, self.cache(site.device))
        if self.criterion == "roofline":
            return tuple(
                replace(c, seconds=plan_seconds(c.plan, unit, model))
                for c in counted
            )
        # timed on warm operands, where a GEMM call is cheaper than inside a step: add the
        # difference per call (roofline.py), so fused GEMMs get their due; a plan not timed
        # (ranked low by the roofline, or over the memory cap) is never chosen
        timed = self.timings(unit, self.plans_to_time(unit, counted, model))
        return tuple(
            replace(c, seconds=timed[c.plan.describe()] + c.cost.gemms * model.gemm_call
                    if c.plan.describe() in timed else math.inf)
            for c in counted
        )

    def plans_to_time(self, unit: SiteGroup, counted: Sequence[Candidate],
                      model: DeviceModel) -> list[Plan]:
        """The candidates worth timing: those that may be chosen (within the memory cap unless
        budgeted), and of those the `TIMED_PER_UNIT` the roofline ranks fastest — a measured
        criterion only has to settle what the model cannot tell apart, and timing every plan
        of a unit (hundreds under dropout) costs minutes of compile."""
        cap = reference(unit).cost.saved_bytes
        eligible = [c.plan for c in counted if self.budgeted or c.cost.kept_bytes <= cap]
        predicted = sorted((plan_seconds(plan, unit, model), i, plan)
                           for i, plan in enumerate(eligible))
        if not predicted:
            return []
        fastest = predicted[0][0]
        return [plan for seconds, _, plan in predicted[:TIMED_PER_UNIT]
                if seconds <= TIMED_WITHIN * fastest]

    def timings(
        self, unit: SiteGroup, plans: Sequence[Plan], progress: str = ""
    ) -> dict[str, float]:
        """Seconds per plan (by `describe()`), from this process, the disk cache or the device."""
        site = unit.members[0]
        signature = unit_signature(unit)
        memo = repr(sorted(signature.items()))
        wanted = {plan.describe() for plan in plans}
        for source in (self._timed.get(memo), self.cache(site.device).get("timing", signature)):
            if isinstance(source, dict) and wanted <= set(source):
                self._timed[memo] = source
                return source
        log.info(
            "runlora: timing %d plans for N=%d d_in=%d d_out=%s r=%s %s%s (cached afterwards)",
            len(plans), site.n, site.d_in, "+".join(str(s.d_out) for s in unit.members),
            [a.r for s in unit.members for a in s.adapters],
            dtype_name(site.base_dtype), progress,
        )
        seconds = time_plans(unit, plans, torch.device(site.device))
        measured = {plan.describe(): s for plan, s in seconds.items()}
        self.cache(site.device).put("timing", signature, measured)
        self._timed[memo] = measured
        return measured

    def choose(self, unit: SiteGroup) -> Decision:
        """The unit's best plan by the criterion, as one call (a group's plans may share GEMMs
        across its members, or not)."""
        key = anonymous(unit)
        if key not in self._chosen:
            self._chosen[key] = pick(unit, self.criterion, self.candidates(unit))
        return replace(self._chosen[key], unit=unit)

    def decide(self, unit: SiteGroup, n: int | torch.SymInt) -> list[Decision]:
        """The decisions for a unit found in a graph, whose N is `n` (a SymInt when dynamic):
        one for a single site or a group plan, one per member where sharing GEMMs does not pay;
        with N symbolic, made for the widest range of N around its hint and guarded there."""
        if len(unit.members) == 1:
            decisions = [self.choose(unit)]

            def replan(k: int) -> object:
                return self.choose(unit.with_n(k)).chosen.plan
        else:
            decisions = units.group_or_members(unit, self)

            def replan(k: int) -> object:
                return tuple(d.chosen.plan for d in units.group_or_members(unit.with_n(k), self))
        return dynamic.over_n(unit, decisions, n, self.criterion, replan, self.affine)

    def decide_within(self, sites: Sequence[SiteGroup], budget: Budget
                      ) -> tuple[list[Decision], list[str]]:
        """Decisions for single sites chosen together, their saved bytes within `budget`
        (budget.py), and the warnings when it cannot be met."""
        decisions, warning = fit_budget([(d, d.candidates) for d in map(self.choose, sites)],
                                        budget)
        return dynamic.at_hint(decisions, self.affine), [warning] if warning else []

    def measure_ahead(self, groups: Sequence[SiteGroup]) -> None:
        """Time each distinct site signature once, with progress, before choosing (a group's
        few shared plans are timed when it is decided: they build on its members' choices)."""
        if self.criterion != "time":
            return
        singles = [single for unit in groups for single in unit.alone()]
        distinct = {repr(sorted(unit_signature(u).items())): u for u in singles}
        for i, unit in enumerate(distinct.values(), 1):
            site = unit.members[0]
            model = device_model(torch.device(site.device), site.base_dtype,
                                 self.cache(site.device))
            plans = self.plans_to_time(unit, self.counted(unit), model)
            self.timings(unit, plans, progress=f" [signature {i}/{len(distinct)}]")
