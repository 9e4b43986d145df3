"""Criteria and decisions: a criterion is a sort key over a candidate's counted cost and, for
the "priced", "roofline" and "time" criteria, its predicted or measured seconds (opt_einsum-style
registry).

`pick` is the choice among a unit's candidates, `choose` the whole choice for the counted
criteria with no device and no cache; the backend chooses through a `Chooser` (chooser.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from runlora_fx.cost.cost import AffineCost, Cost, cost_of
from runlora_fx.cost.roofline import nominal_model, plan_seconds
from runlora_fx.ir.plans import Plan, plans_for, reference_plan, sparse_where_legal
from runlora_fx.ir.program import Program
from runlora_fx.ir.rounding import Rounding
from runlora_fx.ir.site import LoraSite, SiteGroup


@dataclass(frozen=True)
class Candidate:
    plan: Plan
    cost: Cost
    # fwd+bwd: predicted ("priced": nominal device, "roofline": calibrated) or measured ("time")
    seconds: float | None = None


SortKey = tuple[float, ...]
CandidateKey = Callable[[Candidate], SortKey]

# the names are options.CRITERION_NAMES (backend.py checks that they agree)
CRITERIA: dict[str, CandidateKey] = {
    # fewest FLOPs; ties go to fewer GEMM calls (each costs more than its FLOPs on a CPU),
    # then fewer random draws (a draw costs far more than a byte: a dense dropout mask is
    # slower than the r-wide GEMM that reads it, docs/design.md, "Sparse dropout"), then fewer
    # bytes moved (at N = d_in a merged forward with h recomputed ties the split one in FLOPs
    # but moves ~10% more bytes), then to less saved memory
    "flops": lambda c: (c.cost.flops, c.cost.gemms, c.cost.draws, c.cost.bytes_moved,
                        c.cost.saved_bytes),
    # fastest by the roofline's formula on a fixed device model of the site's
    # device kind (roofline.NOMINAL) — every FLOP, byte moved, GEMM call and random draw priced,
    # so a per-step copy of a large W into a GEMM stack costs what it moves; no measurement,
    # the same choice on every run; ties go to less saved memory
    "priced": lambda c: (c.seconds, c.cost.saved_bytes),  # type: ignore[dict-item]
    # least saved-for-backward memory; ties go to fewer FLOPs
    "memory": lambda c: (c.cost.saved_bytes, c.cost.flops, c.cost.gemms, c.cost.draws,
                         c.cost.bytes_moved),
    # fastest by the roofline model (roofline.py); ties go to less saved memory
    "roofline": lambda c: (c.seconds, c.cost.saved_bytes),  # type: ignore[dict-item]
    # fastest as timed on the device (measure.py); ties go to less saved memory
    "time": lambda c: (c.seconds, c.cost.saved_bytes),  # type: ignore[dict-item]
}
COUNTED = ("priced", "flops", "memory")  # need no device: pure functions of the shapes


@dataclass(frozen=True)
class Decision:
    """A unit's chosen plan among its candidates, and what the reports show of it: the order
    eager PEFT runs (`reference`, with its cost) and, with N symbolic, the chosen plan's cost
    as a function of N (`affine`)."""

    unit: SiteGroup
    criterion: str
    chosen: Candidate
    candidates: tuple[Candidate, ...]
    memory_cap: int | None  # per-unit cap (eager PEFT's saved bytes); None under a budget
    reference: Candidate  # eager PEFT's order (plans.reference_plan) at this unit
    # symbolic N: the range of N the choice was proven for (guards keep N inside it)
    n_range: tuple[int, int] | None = None
    note: str | None = None  # how the choice was made when it is not the plain per-unit one
    affine: AffineCost | None = None  # symbolic N: the chosen plan's cost in N (dynamic.py)

    @property
    def site(self) -> LoraSite:
        """The unit's first (for a single-site unit: only) site."""
        return self.unit.members[0]

    @property
    def sites(self) -> tuple[LoraSite, ...]:
        return self.unit.members


def reference(unit: SiteGroup) -> Candidate:
    """Eager PEFT's order at the unit, with its counted cost."""
    plan = reference_plan(unit)
    return Candidate(plan, cost_of(plan, unit))


def counted_candidates(
    unit: SiteGroup, rounding: Rounding = Rounding.NEAREST, fusions: bool = True,
    sparse_dropout: bool = True,
) -> tuple[Candidate, ...]:
    plans = sparse_where_legal(plans_for(unit, rounding, fusions, sparse_dropout), unit)
    return tuple(Candidate(plan, cost_of(plan, unit)) for plan in plans)


def priced(unit: SiteGroup, candidates: Sequence[Candidate],
           programs: Mapping[Plan, Program] | None = None) -> tuple[Candidate, ...]:
    """The candidates with their seconds on the unit's nominal device (the "priced"
    criterion); `programs`: the plans' programs where already built."""
    site = unit.members[0]
    model = nominal_model(site.device, site.base_dtype)
    programs = programs or {}
    return tuple(replace(c, seconds=plan_seconds(c.plan, unit, model, programs.get(c.plan)))
                 for c in candidates)


def pick(unit: SiteGroup, criterion: str, candidates: Sequence[Candidate]) -> Decision:
    """The best candidate by `criterion` among those keeping no more than eager PEFT saves.

    The memory cap keeps "flops" from trading a d_out×d_in W_eff per site for a few FLOPs, and
    any criterion from holding a copy of a large W in a persistent GEMM stack (stacks.py) to
    save a thin GEMM call: what a plan keeps is its saved activations plus its held stacks.
    """
    key = CRITERIA[criterion]
    peft = reference(unit)
    cap = peft.cost.saved_bytes
    affordable = [c for c in candidates if c.cost.kept_bytes <= cap]
    # min() keeps the first of equals, and plans_for's order is stable: deterministic choice
    chosen = min(affordable, key=key)
    return Decision(unit, criterion, chosen, tuple(candidates), cap, peft)


def choose(
    unit: SiteGroup,
    criterion: str,
    rounding: Rounding = Rounding.NEAREST,
    fusions: bool = True,
    sparse_dropout: bool = True,
) -> Decision:
    """The unit's choice by a counted criterion ("priced", "flops" or "memory"), each
    candidate's cost counted at the unit's N: no device, no cache (a `Chooser` chooses for the
    backend)."""
    if criterion not in COUNTED:
        raise ValueError(f"criterion {criterion!r} needs measurements: use Chooser")
    candidates = counted_candidates(unit, rounding, fusions, sparse_dropout)
    if criterion == "priced":
        candidates = priced(unit, candidates)
    return pick(unit, criterion, candidates)
