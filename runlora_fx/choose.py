"""Choosing a plan: a criterion is a sort key over counted costs (opt_einsum-style registry)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from runlora_fx.cost import Cost, cost_of
from runlora_fx.plans import Plan, plans_for, reference_plan
from runlora_fx.site import LoraSite

CostKey = Callable[[Cost], tuple[int, ...]]

CRITERIA: dict[str, CostKey] = {
    # fewest FLOPs; ties go to fewer bytes moved (at N = d_in a merged forward with h recomputed
    # ties the split one in FLOPs but moves ~10% more bytes), then to less saved memory
    "flops": lambda c: (c.flops, c.bytes_moved, c.saved_bytes),
    # least saved-for-backward memory; ties go to fewer FLOPs
    "memory": lambda c: (c.saved_bytes, c.flops, c.bytes_moved),
}


@dataclass(frozen=True)
class Candidate:
    plan: Plan
    cost: Cost


@dataclass(frozen=True)
class Decision:
    site: LoraSite
    criterion: str
    chosen: Candidate
    candidates: tuple[Candidate, ...]
    memory_cap: int  # saved bytes of eager PEFT's plan: candidates above it were not eligible


def choose(site: LoraSite, criterion: str) -> Decision:
    """The best candidate by `criterion` among those saving no more than eager PEFT does.

    The memory cap keeps "flops" from trading a d_out×d_in W_eff per site for a few FLOPs.
    """
    key = CRITERIA[criterion]
    candidates = tuple(Candidate(plan, cost_of(plan, site)) for plan in plans_for(site))
    cap = cost_of(reference_plan(site), site).saved_bytes
    affordable = [c for c in candidates if c.cost.saved_bytes <= cap]
    # min() keeps the first of equals, and plans_for's order is stable: deterministic choice
    chosen = min(affordable, key=lambda c: key(c.cost))
    return Decision(site, criterion, chosen, candidates, cap)
