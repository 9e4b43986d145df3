"""Choosing across sites under a memory budget: a small exact knapsack.

The budget covers the activations the plans decide about: each site's saved bytes beyond the
inputs eager PEFT saves there anyway (x, or D(x) under dropout, which every order that trains A
reads) — that is, h per adapter and any kept W_eff, plus x where a plan would save it and PEFT
does not. A fraction is of eager PEFT's own such bytes (its h's). Minimise Σ key(chosen plan)
(keys add element-wise and compare lexicographically) subject to Σ those bytes ≤ budget.
The dynamic programme keeps, after each site, the Pareto front of (total saved bytes, total
key) over partial choices; a site has a handful of distinct saved sizes (h saved or not, W_eff
kept or not), so the front stays small and the answer is exact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from runlora_fx.choice.criteria import CRITERIA, Candidate, Decision, SortKey
from runlora_fx.ir import operands as ops
from runlora_fx.ir.plans import reference_plan
from runlora_fx.ir.program import program_for
from runlora_fx.ir.site import SiteGroup

log = logging.getLogger("runlora_fx")

Budget = int | float  # bytes, or a fraction of eager PEFT's decided-about bytes at these sites


INPUTS = (ops.Role.X, ops.Role.LORA_INPUT)


def reference_input_bytes(unit: SiteGroup) -> int:
    """Bytes of the inputs (x, D(x)) eager PEFT saves at the unit: saved whatever we choose."""
    saved = set(program_for(reference_plan(unit), unit).saved)
    return sum(
        op.dtype.itemsize * op.shape[0] * op.shape[1]
        for op in ops.operands(unit) if op.role in INPUTS and op.name in saved
    )


def decided_bytes(candidate: Candidate, unit: SiteGroup) -> int:
    return candidate.cost.kept_bytes - reference_input_bytes(unit)


def budget_bytes(budget: Budget, reference_saved: int) -> int:
    if isinstance(budget, float):
        return int(budget * reference_saved)
    return budget


def _add(a: SortKey, b: SortKey) -> SortKey:
    return tuple(x + y for x, y in zip(a, b))


def knapsack(options: Sequence[Sequence[tuple[SortKey, int]]], budget: int) -> list[int] | None:
    """Per site the index of its chosen option (key, saved bytes), or None if infeasible."""
    zero: SortKey = tuple(0 for _ in options[0][0][0]) if options and options[0] else ()
    front: list[tuple[int, SortKey, tuple[int, ...]]] = [(0, zero, ())]
    for site_options in options:
        best_at: dict[int, tuple[SortKey, tuple[int, ...]]] = {}
        for saved, key, picks in front:
            for j, (opt_key, opt_saved) in enumerate(site_options):
                total = saved + opt_saved
                if total > budget:
                    continue
                new_key = _add(key, opt_key)
                if total not in best_at or new_key < best_at[total][0]:
                    best_at[total] = (new_key, (*picks, j))
        front = []
        for total in sorted(best_at):  # keep only what beats every cheaper-in-memory choice
            key, picks = best_at[total]
            if not front or key < front[-1][1]:
                front.append((total, key, picks))
        if not front:
            return None
    return list(min(front, key=lambda entry: entry[1])[2])


def fit_budget(
    sites: Sequence[tuple[Decision, Sequence[Candidate]]], budget: Budget
) -> tuple[list[Decision], str | None]:
    """Re-choose per-site decisions so that their saved bytes fit `budget` in total.

    `sites` pairs each site's unconstrained decision with all its candidates. Returns the new
    decisions and a warning when the budget cannot be met (then every site takes its
    least-memory plan).
    """
    if not sites:
        return [], None
    criterion = sites[0][0].criterion
    key = CRITERIA[criterion]
    inputs = [reference_input_bytes(d.unit) for d, _ in sites]  # once per unit, not candidate
    reference = sum((d.memory_cap or 0) - free for (d, _), free in zip(sites, inputs))
    limit = budget_bytes(budget, reference)
    options = [
        [(key(c), c.cost.kept_bytes - free) for c in cands]
        for (_, cands), free in zip(sites, inputs)
    ]
    picks = knapsack(options, limit)
    note = (f"memory budget {limit} B for h/W_eff over {len(sites)} sites "
            f"(eager PEFT keeps {reference} B)")
    warning = None
    if picks is None:
        least = sum(min(o[1] for o in site_options) for site_options in options)
        warning = (
            f"runlora: memory_budget={budget!r} ({limit} B) is below the least any plans save "
            f"at these {len(sites)} sites ({least} B); using the least-memory plans"
        )
        log.warning(warning)
        memory = CRITERIA["memory"]
        picks = [min(range(len(cands)), key=lambda j: memory(cands[j])) for _, cands in sites]
        note = f"{note}; infeasible, least-memory plans"
    decisions = [
        replace(d, chosen=cands[j], candidates=tuple(cands), memory_cap=None, note=note)
        for (d, cands), j in zip(sites, picks)
    ]
    return decisions, warning
