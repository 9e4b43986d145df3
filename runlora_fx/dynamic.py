"""Symbolic N (dynamic shapes): choose once for a range of N, guard only at a crossover.

Every plan's counted cost is affine in N, so a criterion's choice is piecewise constant in N
with a few crossovers. `stable_range` finds the widest range of N around the size hint over
which the choice is the one made at the hint; `choose_over_n` then guards N to that range (one
guard per side that is not the plausible range's own end), so a run over varying lengths
compiles again only when N crosses a crossover, never per comparison.

Dynamo builds a graph's guards after the backend returns, from the shape environment; a
comparison of a SymInt evaluated here (`bool(n >= a)`) becomes one of them. So exactly the
guards `stable_range` asks for are installed — none where the choice holds over the plausible
range — instead of one per cost comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import replace

import sympy
import torch
from torch.utils._sympy.numbers import IntInfinity, NegativeIntInfinity

from runlora_fx.choose import Chooser, Decision
from runlora_fx.cost import Cost, cost_of
from runlora_fx.plans import Plan
from runlora_fx.site import LoraSite, SiteGroup, as_group

# N outside this range is not planned for: past 2^20 tokens a step is long anyway, and a
# crossover there is not worth a guard (the choice made at the hint stays, correct as ever)
PLAUSIBLE_N = (1, 1 << 20)
GRID_POINTS = 48  # geometric probes per side before bisecting the first change


def _probes(start: int, end: int) -> list[int]:
    """Geometric points from `start` (exclusive) to `end` (inclusive), either direction."""
    if start == end:
        return []
    points, ratio = [], (end / start) ** (1 / GRID_POINTS) if start > 0 else 2.0
    value = float(start)
    for _ in range(GRID_POINTS):
        value *= ratio
        n = int(round(value))
        n = min(n, end) if end > start else max(n, end)
        if (n - start) * (end - start) > 0 and n not in points:
            points.append(n)
    if not points or points[-1] != end:
        points.append(end)
    return points


def _first_change(decide: Callable[[int], Hashable], start: int, end: int) -> int | None:
    """The N nearest `start` (towards `end`) whose choice differs from start's, or None."""
    at_start = decide(start)
    previous = start
    for n in _probes(start, end):
        if decide(n) != at_start:
            same, other = previous, n  # bisect the integer boundary
            while abs(other - same) > 1:
                mid = (same + other) // 2
                if decide(mid) == at_start:
                    same = mid
                else:
                    other = mid
            return other
        previous = n
    return None


def stable_range(
    decide: Callable[[int], Hashable], hint: int, lo: int, hi: int
) -> tuple[int, int]:
    """The widest [a, b] ⊆ [lo, hi] containing `hint` where decide(n) == decide(hint), as far
    as a geometric probe plus bisection sees (a choice between probes may be missed: it only
    costs speed, never correctness, as every plan computes the same result)."""
    up = _first_change(decide, hint, hi)
    down = _first_change(decide, hint, lo)
    return (lo if down is None else down + 1, hi if up is None else up - 1)


def with_n(unit: LoraSite | SiteGroup, n: int) -> SiteGroup:
    return as_group(unit).with_n(n)


def affine_cost(plan: Plan, unit: LoraSite | SiteGroup) -> dict[str, tuple[int, int]]:
    """Each cost as (per-token slope, constant): cost(N) = slope·N + constant, exactly."""
    at0, at1 = cost_of(plan, with_n(unit, 0)), cost_of(plan, with_n(unit, 1))
    return {
        name: (getattr(at1, name) - getattr(at0, name), getattr(at0, name))
        for name in Cost.__dataclass_fields__
    }


def describe_affine(cost: dict[str, tuple[int, int]], symbol: str) -> dict[str, str]:
    return {name: f"{slope}*({symbol}) + {const}" for name, (slope, const) in cost.items()}


def plausible_range(n: torch.SymInt) -> tuple[int, int]:
    """The symbol's own value range (Dynamo knows sizes ≥ 2 etc.) within PLAUSIBLE_N."""
    bounds = n.node.shape_env.bound_sympy(n.node.expr)
    lo, hi = PLAUSIBLE_N
    lower, upper = _finite(bounds.lower), _finite(bounds.upper)
    if lower is not None:
        lo = max(lo, lower)
    if upper is not None:
        hi = min(hi, upper)
    return lo, max(lo, hi)


def _finite(bound: object) -> int | None:
    """A sympy bound as an int; None for ±∞ (sympy's and torch's int_oo alike)."""
    if isinstance(bound, (IntInfinity, NegativeIntInfinity)) or bound in (sympy.oo, -sympy.oo):
        return None
    return int(bound)  # type: ignore[call-overload]


def guarded_range(
    n: torch.SymInt, site: LoraSite, decide: Callable[[int], Hashable]
) -> tuple[tuple[int, int], str]:
    """The widest range of N around the hint where `decide` gives what it gives at the hint,
    guarded at each end that is not the plausible range's own; and a note saying so."""
    lo, hi = plausible_range(n)
    hint = min(max(site.n, lo), hi)
    a, b = stable_range(decide, hint, lo, hi)
    guards = []
    # bool() of a SymBool evaluates it at the hint and installs it as a guard
    if a > lo and bool(n >= a):
        guards.append(f"N >= {a}")
    if b < hi and bool(n <= b):
        guards.append(f"N <= {b}")
    note = f"N = {site.n_symbolic} symbolic in [{lo}, {hi}]: chosen for N in [{a}, {b}]"
    note += f", guarded {' and '.join(guards)}" if guards else ", no guard needed"
    return (a, b), note


def choose_over_n(unit: SiteGroup, n: int | torch.SymInt, chooser: Chooser) -> Decision:
    """The unit's decision; for a symbolic N, made for the widest range of N around its hint
    where it holds, and guarded there."""
    decision = chooser.choose(unit)
    if not isinstance(n, torch.SymInt):
        return decision
    site = unit.members[0]
    if chooser.criterion == "time":  # a timing exists only for the N it was measured at
        return replace(decision, note=f"N symbolic: timed at its hint {site.n}, no guard")
    n_range, note = guarded_range(
        n, site, lambda k: chooser.choose(with_n(unit, k)).chosen.plan)
    return replace(decision, n_range=n_range, note=note)
