"""The per-site choice when N is symbolic: made for a range of N, held there by guards.

Dynamo builds a graph's guards after the backend returns, from the shape environment; a
comparison of a SymInt evaluated here (`bool(n >= a)`) becomes one of them. So the backend
installs exactly the guards `dynamic.stable_range` asks for — none where the choice holds over
the plausible range, one per crossover side otherwise — instead of one per cost comparison.
"""

from __future__ import annotations

import math
from dataclasses import replace

import sympy
import torch
from torch.utils._sympy.numbers import IntInfinity, NegativeIntInfinity

from passes.find_sites import SiteMatch
from runlora_fx.choose import Chooser, Decision
from runlora_fx.dynamic import PLAUSIBLE_N, stable_range, with_n


def symbolic_n(match: SiteMatch) -> torch.SymInt | None:
    """N = the product of x's leading dims, when any of them is symbolic."""
    value = match.x.meta.get("example_value", match.x.meta.get("val"))
    n = math.prod(value.shape[:-1])
    return n if isinstance(n, torch.SymInt) else None


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


def choose_over_n(match: SiteMatch, chooser: Chooser) -> Decision:
    decision = chooser.choose(match.site)
    n = symbolic_n(match)
    if n is None:
        return decision
    if chooser.criterion == "time":  # a timing exists only for the N it was measured at
        return replace(decision, note=f"N symbolic: timed at its hint {match.site.n}, no guard")
    lo, hi = plausible_range(n)
    site = match.site
    hint = min(max(site.n, lo), hi)
    a, b = stable_range(lambda k: chooser.choose(with_n(site, k)).chosen.plan, hint, lo, hi)
    guards = []
    # bool() of a SymBool evaluates it at the hint and installs it as a guard
    if a > lo and bool(n >= a):
        guards.append(f"N >= {a}")
    if b < hi and bool(n <= b):
        guards.append(f"N <= {b}")
    note = f"N = {site.n_symbolic} symbolic in [{lo}, {hi}]: chosen for N in [{a}, {b}]"
    note += f", guarded {' and '.join(guards)}" if guards else ", no guard needed"
    return replace(decision, n_range=(a, b), note=note)
