"""Symbolic N (dynamic shapes), all of it: choose once for a range of N, guard only at a
crossover, and say so in each decision.

Every plan's counted cost is affine in N, so a criterion's choice is piecewise constant in N
with a few crossovers. `stable_range` finds the widest range of N around the size hint over
which the choice is the one made at the hint; `over_n` then guards N to that range (one guard
per side that is not the plausible range's own end), so a run over varying lengths compiles
again only when N crosses a crossover, never per comparison. The "time" criterion and a memory
budget choose at the hint alone (`over_n`, `at_hint`). A decision at a symbolic N carries its
chosen plan's cost as a function of N (`AffineCost`), which the reports print.

Dynamo builds a graph's guards after the backend returns, from the shape environment; a
comparison of a SymInt evaluated here (`bool(n >= a)`) becomes one of them. So exactly the
guards `stable_range` asks for are installed — none where the choice holds over the plausible
range — instead of one per cost comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace

import sympy
import torch
from torch.utils._sympy.numbers import IntInfinity, NegativeIntInfinity

from runlora_fx.choice.criteria import Decision
from runlora_fx.cost.cost import AffineCost
from runlora_fx.ir.plans import Plan
from runlora_fx.ir.site import SiteGroup

# N outside this range is not planned for: past 2^20 tokens a step is long anyway, and a
# crossover there is not worth a guard (the choice made at the hint stays, correct as ever)
PLAUSIBLE_N = (1, 1 << 20)
GRID_POINTS = 48  # geometric probes per side before bisecting the first change

AffineOf = Callable[[Plan, SiteGroup], AffineCost]  # a plan's cost at the unit, in N


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
    n: torch.SymInt, unit: SiteGroup, decide: Callable[[int], Hashable]
) -> tuple[tuple[int, int], str]:
    """The widest range of N around the hint where `decide` gives what it gives at the hint,
    guarded at each end that is not the plausible range's own; and a note saying so."""
    lo, hi = plausible_range(n)
    hint = min(max(unit.n, lo), hi)
    a, b = stable_range(decide, hint, lo, hi)
    guards = []
    # bool() of a SymBool evaluates it at the hint and installs it as a guard
    if a > lo and bool(n >= a):
        guards.append(f"N >= {a}")
    if b < hi and bool(n <= b):
        guards.append(f"N <= {b}")
    note = f"N = {unit.n_symbolic} symbolic in [{lo}, {hi}]: chosen for N in [{a}, {b}]"
    note += f", guarded {' and '.join(guards)}" if guards else ", no guard needed"
    return (a, b), note


def over_n(unit: SiteGroup, decisions: list[Decision], n: int | torch.SymInt, criterion: str,
           decide: Callable[[int], Hashable], affine: AffineOf) -> list[Decision]:
    """The unit's decisions (made at N's hint); for a symbolic N made for the widest range of N
    around the hint where `decide` (what is chosen at an N) stays the same, and guarded there.
    A timing exists only for the N it was measured at: under "time" no guard, a note."""
    if not isinstance(n, torch.SymInt):
        return decisions
    if criterion == "time":
        note = f"N symbolic: timed at its hint {unit.n}, no guard"
        return [_in_n(replace(d, note=note), affine) for d in decisions]
    n_range, note = guarded_range(n, unit, decide)
    return [_in_n(replace(d, n_range=n_range, note=note), affine) for d in decisions]


def at_hint(decisions: Sequence[Decision], affine: AffineOf) -> list[Decision]:
    """Decisions made together at N's hint (a memory budget): a symbolic N is said, not
    guarded."""
    return [
        _in_n(replace(d, note=f"{d.note}; N symbolic, budget judged at its hint N={d.site.n}"),
              affine)
        if d.site.n_symbolic is not None else d
        for d in decisions
    ]


def _in_n(decision: Decision, affine: AffineOf) -> Decision:
    """The decision with its chosen plan's cost as a function of N, for the reports."""
    return replace(decision, affine=affine(decision.chosen.plan, decision.unit))
