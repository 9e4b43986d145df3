"""Choosing a plan: a criterion is a sort key over a candidate's counted cost and, for the
"roofline" and "time" criteria, its predicted or measured seconds (opt_einsum-style registry).

`choose` is the pure per-unit choice for the counted criteria; `Chooser` adds the device
measurements the other two need, and `budget.py` the choice across units under a memory budget.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from runlora_fx.cache import MeasurementCache
from runlora_fx.cost import Cost, cost_of
from runlora_fx.measure import time_plans, unit_signature
from runlora_fx.plans import Plan, plans_for, reference_plan
from runlora_fx.precision import Rounding
from runlora_fx.roofline import device_model, plan_seconds
from runlora_fx.site import LoraSite, SiteGroup, as_group

log = logging.getLogger("runlora_fx")


@dataclass(frozen=True)
class Candidate:
    plan: Plan
    cost: Cost
    seconds: float | None = None  # fwd+bwd: predicted ("roofline") or measured ("time")


SortKey = tuple[float, ...]
CandidateKey = Callable[[Candidate], SortKey]

CRITERIA: dict[str, CandidateKey] = {
    # fewest FLOPs; ties go to fewer GEMM calls (each costs more than its FLOPs on a CPU),
    # then fewer random draws (a draw costs far more than a byte: a dense dropout mask is
    # slower than the r-wide GEMM that reads it, DESIGN.md §8), then fewer bytes moved (at
    # N = d_in a merged forward with h recomputed ties the split one in FLOPs but moves ~10%
    # more bytes), then to less saved memory
    "flops": lambda c: (c.cost.flops, c.cost.gemms, c.cost.draws, c.cost.bytes_moved,
                        c.cost.saved_bytes),
    # least saved-for-backward memory; ties go to fewer FLOPs
    "memory": lambda c: (c.cost.saved_bytes, c.cost.flops, c.cost.gemms, c.cost.draws,
                         c.cost.bytes_moved),
    # fastest by the roofline model (roofline.py); ties go to less saved memory
    "roofline": lambda c: (c.seconds, c.cost.saved_bytes),  # type: ignore[dict-item]
    # fastest as timed on the device (measure.py); ties go to less saved memory
    "time": lambda c: (c.seconds, c.cost.saved_bytes),  # type: ignore[dict-item]
}
COUNTED = ("flops", "memory")  # need no device: pure functions of the shapes


@dataclass(frozen=True)
class Decision:
    unit: SiteGroup
    criterion: str
    chosen: Candidate
    candidates: tuple[Candidate, ...]
    memory_cap: int | None  # per-unit cap (eager PEFT's saved bytes); None under a budget
    # symbolic N: the range of N the choice was proven for (guards keep N inside it)
    n_range: tuple[int, int] | None = None
    note: str | None = None  # how the choice was made when it is not the plain per-unit one

    @property
    def site(self) -> LoraSite:
        """The unit's first (for a single-site unit: only) site."""
        return self.unit.members[0]

    @property
    def sites(self) -> tuple[LoraSite, ...]:
        return self.unit.members


def counted_candidates(
    unit: LoraSite | SiteGroup, rounding: Rounding = Rounding.NEAREST, fusions: bool = True,
    sparse_dropout: bool = True,
) -> tuple[Candidate, ...]:
    return tuple(Candidate(plan, cost_of(plan, unit))
                 for plan in plans_for(unit, rounding, fusions, sparse_dropout))


def reference_saved_bytes(unit: LoraSite | SiteGroup) -> int:
    return cost_of(reference_plan(unit), unit).saved_bytes


def best(unit: LoraSite | SiteGroup, criterion: str, candidates: Sequence[Candidate]) -> Decision:
    """The best candidate by `criterion` among those saving no more than eager PEFT does.

    The memory cap keeps "flops" from trading a d_out×d_in W_eff per site for a few FLOPs.
    """
    key = CRITERIA[criterion]
    cap = reference_saved_bytes(unit)
    affordable = [c for c in candidates if c.cost.saved_bytes <= cap]
    # min() keeps the first of equals, and plans_for's order is stable: deterministic choice
    chosen = min(affordable, key=key)
    return Decision(as_group(unit), criterion, chosen, tuple(candidates), cap)


def choose(
    unit: LoraSite | SiteGroup,
    criterion: str,
    rounding: Rounding = Rounding.NEAREST,
    fusions: bool = True,
    sparse_dropout: bool = True,
) -> Decision:
    """The per-unit choice of a counted criterion ("flops" or "memory")."""
    if criterion not in COUNTED:
        raise ValueError(f"criterion {criterion!r} needs measurements: use Chooser")
    return best(unit, criterion, counted_candidates(unit, rounding, fusions, sparse_dropout))


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
        # by anonymous unit at N = 0: each plan's cost at N = 0 and N = 1 (affine in N)
        self._affine: dict[SiteGroup, list[tuple[Plan, Cost, Cost]]] = {}

    def cache(self, device: str) -> MeasurementCache:
        if device not in self._caches:
            self._caches[device] = MeasurementCache(self.cache_root, torch.device(device))
        return self._caches[device]

    def counted(self, unit: SiteGroup) -> tuple[Candidate, ...]:
        """The unit's candidates with counted costs; plans and costs are worked out once per
        shape, then evaluated at the unit's N (probing a symbolic N asks for many)."""
        key = anonymous(unit.with_n(0))
        if key not in self._affine:
            plans = plans_for(unit, self.rounding, self.fusions, self.sparse_dropout)
            self._affine[key] = [
                (plan, cost_of(plan, unit.with_n(0)), cost_of(plan, unit.with_n(1)))
                for plan in plans
            ]
        return tuple(Candidate(plan, at0.at(unit.n, at1)) for plan, at0, at1 in self._affine[key])

    def candidates(
        self, unit: LoraSite | SiteGroup, keep: Callable[[Plan], bool] | None = None
    ) -> tuple[Candidate, ...]:
        """The unit's candidates (those `keep` accepts), scored as the criterion needs."""
        unit = as_group(unit)
        counted = tuple(c for c in self.counted(unit) if keep is None or keep(c.plan))
        if self.criterion in COUNTED:
            return counted
        site = unit.members[0]
        model = device_model(torch.device(site.device), site.matmul_dtype, self.cache(site.device))
        if self.criterion == "roofline":
            return tuple(
                replace(c, seconds=plan_seconds(c.plan, unit, model))
                for c in counted
            )
        # timed on warm operands, where a GEMM call is cheaper than inside a step: add the
        # difference per call (roofline.py), so fused GEMMs get their due
        timed = self.timings(unit, self.plans_to_time(unit, counted))
        return tuple(
            replace(c, seconds=timed[c.plan.describe()] + c.cost.gemms * model.gemm_call)
            if c.plan.describe() in timed else c
            for c in counted
        )

    def plans_to_time(self, unit: SiteGroup, counted: Sequence[Candidate]) -> list[Plan]:
        """The candidates that may be chosen: timing the others would only cost time."""
        cap = reference_saved_bytes(unit)
        return [c.plan for c in counted if self.budgeted or c.cost.saved_bytes <= cap]

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
            str(site.matmul_dtype).removeprefix("torch."), progress,
        )
        seconds = time_plans(unit, plans, torch.device(site.device))
        measured = {plan.describe(): s for plan, s in seconds.items()}
        self.cache(site.device).put("timing", signature, measured)
        self._timed[memo] = measured
        return measured

    def choose(self, unit: LoraSite | SiteGroup) -> Decision:
        unit = as_group(unit)
        key = anonymous(unit)
        if key not in self._chosen:
            self._chosen[key] = best(unit, self.criterion, self.candidates(unit))
        return replace(self._chosen[key], unit=unit)

    def measure_ahead(self, units: Sequence[LoraSite | SiteGroup]) -> None:
        """Time each distinct unit signature once, with progress, before choosing."""
        if self.criterion != "time":
            return
        groups = [as_group(u) for u in units]
        distinct = {repr(sorted(unit_signature(u).items())): u for u in groups}
        for i, unit in enumerate(distinct.values(), 1):
            plans = self.plans_to_time(unit, self.counted(unit))
            self.timings(unit, plans, progress=f" [signature {i}/{len(distinct)}]")
