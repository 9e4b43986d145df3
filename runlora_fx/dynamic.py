"""Symbolic N (dynamic shapes): choose once for a range of N, guard only at a crossover.

Every plan's counted cost is affine in N, so a criterion's choice is piecewise constant in N
with a few crossovers. `stable_range` finds the widest range of N around the size hint over
which the choice is the one made at the hint; the backend then guards N to that range (one
guard per side that is not the plausible range's own end), so a run over varying lengths
compiles again only when N crosses a crossover, never per comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import replace

from runlora_fx.cost import Cost, cost_of
from runlora_fx.plans import Plan
from runlora_fx.site import LoraSite

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


def with_n(site: LoraSite, n: int) -> LoraSite:
    return replace(site, n=n)


def affine_cost(plan: Plan, site: LoraSite) -> dict[str, tuple[int, int]]:
    """Each cost as (per-token slope, constant): cost(N) = slope·N + constant, exactly."""
    at0, at1 = cost_of(plan, with_n(site, 0)), cost_of(plan, with_n(site, 1))
    return {
        name: (getattr(at1, name) - getattr(at0, name), getattr(at0, name))
        for name in Cost.__dataclass_fields__
    }


def describe_affine(cost: dict[str, tuple[int, int]], symbol: str) -> dict[str, str]:
    return {name: f"{slope}*({symbol}) + {const}" for name, (slope, const) in cost.items()}
