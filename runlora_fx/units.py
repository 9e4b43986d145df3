"""The choice for one planning unit: a single site's plan, or for sites reading one x (q/k/v,
gate/up) the group's best GEMM-sharing plan when it beats its members' own plans, else one plan
per member. With N symbolic the choice is made for a range of N and guarded (dynamic.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from runlora_fx.choose import CRITERIA, Chooser, Decision, SortKey, best
from runlora_fx.dynamic import choose_over_n, guarded_range, with_n
from runlora_fx.plans import Plan
from runlora_fx.site import SiteGroup


def _total(keys: Sequence[SortKey]) -> SortKey:
    return tuple(sum(parts) for parts in zip(*keys))


def _without_sharing(plan: Plan) -> Plan:
    return replace(plan, stack_w=False, group_h=False, group_da=False)


def _group_or_members(unit: SiteGroup, chooser: Chooser) -> list[Decision]:
    """The group's candidates are its first member's own best plan with each way of sharing
    GEMMs across the members (a handful, so that "time" measures few)."""
    members = [chooser.choose(SiteGroup((site,))) for site in unit.members]
    template = _without_sharing(members[0].chosen.plan)

    def keep(plan: Plan) -> bool:
        return plan.groups_members and _without_sharing(plan) == template

    shared = list(chooser.candidates(unit, keep))
    if not shared:
        return members
    group = best(unit, chooser.criterion, shared)
    key = CRITERIA[chooser.criterion]
    if key(group.chosen) < _total([key(d.chosen) for d in members]):
        return [group]
    return members


def choose_unit(unit: SiteGroup, n: int | torch.SymInt, chooser: Chooser) -> list[Decision]:
    """The unit's decisions: one for a single site or a group plan, one per member otherwise."""
    if len(unit.members) == 1:
        return [choose_over_n(unit, n, chooser)]
    decisions = _group_or_members(unit, chooser)
    if not isinstance(n, torch.SymInt):
        return decisions
    if chooser.criterion == "time":  # a timing exists only for the N it was measured at
        note = f"N symbolic: timed at its hint {unit.n}, no guard"
        return [replace(d, note=note) for d in decisions]

    def signature(k: int) -> tuple[object, ...]:
        return tuple(d.chosen.plan for d in _group_or_members(with_n(unit, k), chooser))

    n_range, note = guarded_range(n, unit.members[0], signature)
    return [replace(d, n_range=n_range, note=note) for d in decisions]
