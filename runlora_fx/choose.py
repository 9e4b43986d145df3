"""Choosing a plan: a criterion is a sort key over a candidate's counted cost and, for the
"roofline" and "time" criteria, its predicted or measured seconds (opt_einsum-style registry).

`choose` is the pure per-site choice for the counted criteria; `Chooser` adds the device
measurements the other two need, and `budget.py` the choice across sites under a memory budget.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from runlora_fx.cache import MeasurementCache
from runlora_fx.cost import Cost, cost_of
from runlora_fx.measure import site_signature, time_plans
from runlora_fx.plans import Plan, plans_for, reference_plan
from runlora_fx.program import program_for
from runlora_fx.roofline import device_model, predicted_seconds
from runlora_fx.site import LoraSite

log = logging.getLogger("runlora_fx")


@dataclass(frozen=True)
class Candidate:
    plan: Plan
    cost: Cost
    seconds: float | None = None  # fwd+bwd: predicted ("roofline") or measured ("time")


SortKey = tuple[float, ...]
CandidateKey = Callable[[Candidate], SortKey]

CRITERIA: dict[str, CandidateKey] = {
    # fewest FLOPs; ties go to fewer bytes moved (at N = d_in a merged forward with h recomputed
    # ties the split one in FLOPs but moves ~10% more bytes), then to less saved memory
    "flops": lambda c: (c.cost.flops, c.cost.bytes_moved, c.cost.saved_bytes),
    # least saved-for-backward memory; ties go to fewer FLOPs
    "memory": lambda c: (c.cost.saved_bytes, c.cost.flops, c.cost.bytes_moved),
    # fastest by the roofline model (roofline.py); ties go to less saved memory
    "roofline": lambda c: (c.seconds, c.cost.saved_bytes),  # type: ignore[dict-item]
    # fastest as timed on the device (measure.py); ties go to less saved memory
    "time": lambda c: (c.seconds, c.cost.saved_bytes),  # type: ignore[dict-item]
}
COUNTED = ("flops", "memory")  # need no device: pure functions of the shapes


@dataclass(frozen=True)
class Decision:
    site: LoraSite
    criterion: str
    chosen: Candidate
    candidates: tuple[Candidate, ...]
    memory_cap: int | None  # per-site cap (eager PEFT's saved bytes); None under a budget
    # symbolic N: the range of N the choice was proven for (guards keep N inside it)
    n_range: tuple[int, int] | None = None
    note: str | None = None  # how the choice was made when it is not the plain per-site one


def counted_candidates(site: LoraSite) -> tuple[Candidate, ...]:
    return tuple(Candidate(plan, cost_of(plan, site)) for plan in plans_for(site))


def reference_saved_bytes(site: LoraSite) -> int:
    return cost_of(reference_plan(site), site).saved_bytes


def best(site: LoraSite, criterion: str, candidates: Sequence[Candidate]) -> Decision:
    """The best candidate by `criterion` among those saving no more than eager PEFT does.

    The memory cap keeps "flops" from trading a d_out×d_in W_eff per site for a few FLOPs.
    """
    key = CRITERIA[criterion]
    cap = reference_saved_bytes(site)
    affordable = [c for c in candidates if c.cost.saved_bytes <= cap]
    # min() keeps the first of equals, and plans_for's order is stable: deterministic choice
    chosen = min(affordable, key=key)
    return Decision(site, criterion, chosen, tuple(candidates), cap)


def choose(site: LoraSite, criterion: str) -> Decision:
    """The per-site choice of a counted criterion ("flops" or "memory")."""
    if criterion not in COUNTED:
        raise ValueError(f"criterion {criterion!r} needs measurements: use Chooser")
    return best(site, criterion, counted_candidates(site))


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
    ) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; choose one of {tuple(CRITERIA)}")
        self.criterion = criterion
        self.cache_root = cache_root
        # under a memory budget every candidate may be chosen; else only those within the cap
        self.budgeted = budgeted
        self._caches: dict[str, MeasurementCache] = {}
        self._timed: dict[str, dict[str, float]] = {}  # signature → plan → seconds, this process
        self._chosen: dict[LoraSite, Decision] = {}  # by site less its path: N probes repeat

    def cache(self, device: str) -> MeasurementCache:
        if device not in self._caches:
            self._caches[device] = MeasurementCache(self.cache_root, torch.device(device))
        return self._caches[device]

    def candidates(self, site: LoraSite) -> tuple[Candidate, ...]:
        counted = counted_candidates(site)
        if self.criterion == "roofline":
            model = device_model(torch.device(site.device), site.matmul_dtype,
                                 self.cache(site.device))
            return tuple(
                replace(c, seconds=predicted_seconds(program_for(c.plan, site), site, model))
                for c in counted
            )
        if self.criterion == "time":
            timed = self.timings(site, self.plans_to_time(site, counted))
            return tuple(replace(c, seconds=timed.get(c.plan.describe())) for c in counted)
        return counted

    def plans_to_time(self, site: LoraSite, counted: Sequence[Candidate]) -> list[Plan]:
        """The candidates that may be chosen: timing the others would only cost time."""
        cap = reference_saved_bytes(site)
        return [c.plan for c in counted if self.budgeted or c.cost.saved_bytes <= cap]

    def timings(
        self, site: LoraSite, plans: Sequence[Plan], progress: str = ""
    ) -> dict[str, float]:
        """Seconds per plan (by `describe()`), from this process, the disk cache or the device."""
        signature = site_signature(site)
        memo = repr(sorted(signature.items()))
        wanted = {plan.describe() for plan in plans}
        for source in (self._timed.get(memo), self.cache(site.device).get("timing", signature)):
            if isinstance(source, dict) and wanted <= set(source):
                self._timed[memo] = source
                return source
        log.info(
            "runlora: timing %d plans for N=%d d_in=%d d_out=%d r=%s %s%s (cached afterwards)",
            len(plans), site.n, site.d_in, site.d_out, [a.r for a in site.adapters],
            str(site.matmul_dtype).removeprefix("torch."), progress,
        )
        seconds = time_plans(site, plans, torch.device(site.device))
        measured = {plan.describe(): s for plan, s in seconds.items()}
        self.cache(site.device).put("timing", signature, measured)
        self._timed[memo] = measured
        return measured

    def choose(self, site: LoraSite) -> Decision:
        anonymous = replace(site, path="")
        if anonymous not in self._chosen:
            self._chosen[anonymous] = best(site, self.criterion, self.candidates(site))
        return replace(self._chosen[anonymous], site=site)

    def measure_ahead(self, sites: Sequence[LoraSite]) -> None:
        """Time each distinct site signature once, with progress, before choosing."""
        if self.criterion != "time":
            return
        distinct = {repr(sorted(site_signature(s).items())): s for s in sites}
        for i, site in enumerate(distinct.values(), 1):
            plans = self.plans_to_time(site, counted_candidates(site))
            self.timings(site, plans, progress=f" [signature {i}/{len(distinct)}]")
