"""A group's choice: for sites reading one x (q/k/v, gate/up), the group's best GEMM-sharing plan
when it beats its members' own plans, else one plan per member."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from runlora_fx.choice.criteria import CRITERIA, Decision, SortKey, pick
from runlora_fx.ir.plans import sharing_across
from runlora_fx.ir.site import SiteGroup

if TYPE_CHECKING:
    from runlora_fx.choice.chooser import Chooser


def _total(keys: Sequence[SortKey]) -> SortKey:
    return tuple(sum(parts) for parts in zip(*keys))


def group_or_members(unit: SiteGroup, chooser: Chooser) -> list[Decision]:
    """The group's candidates are its first member's own best plan with each way of sharing
    GEMMs across the members (a handful, so that "time" measures few)."""
    members = [chooser.choose(single) for single in unit.alone()]
    if not chooser.fusions:  # sharing a GEMM is what a group plan is for
        return members
    shared = list(chooser.candidates(unit, sharing_across(members[0].chosen.plan, unit)))
    if not shared:
        return members
    group = pick(unit, chooser.criterion, shared)
    key = CRITERIA[chooser.criterion]
    if key(group.chosen) < _total([key(d.chosen) for d in members]):
        return [group]
    return members
