"""The grouping pass: sites that read the same x (q/k/v, gate/up) form one planning unit, so a
plan may share a GEMM across them (sharing.SHARING: stack_w, group_h, group_da). Legality only;
the choose stage compares the group's best plan with its members' own.

A group's call replaces its members' nodes at once, before the first member's result: so every
member's operands but x must be graph inputs (weights, not computed tensors), every branch must
read x itself (no dropout, or a dropout the plan draws itself: sparse dropout, which the
group's plans then use), and nothing may run in place between the first member's reads and the
last member's result.

Every unit, grouped or alone, comes out as a `MatchedUnit`: the matches the rewrite replaces,
the `SiteGroup` the choose stage plans, and N as the graph knows it, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from runlora_fx.ir.operands import Role
from runlora_fx.ir.site import Base, LoraSite, SiteGroup
from runlora_fx.passes.find_sites import SiteMatch, rows
from runlora_fx.passes.graphs import node_order
from runlora_fx.passes.patterns import mutation_between, tensor_value

INPUT_OPS = ("placeholder", "get_attr")


@dataclass(frozen=True, eq=False)
class MatchedUnit:
    """A planning unit as found: its sites' matches (in graph order), the group they form, and
    N, the rows of the x they read (a SymInt when the batch is dynamic; the group's sites hold
    its hint)."""

    matches: tuple[SiteMatch, ...]
    group: SiteGroup
    n: int | torch.SymInt

    @classmethod
    def of(cls, matches: tuple[SiteMatch, ...]) -> MatchedUnit:
        x = tensor_value(matches[0].x)
        assert x is not None, "a matched site's x has an example value"
        return cls(matches, SiteGroup(tuple(m.site for m in matches)), rows(x))

    def alone(self) -> list[MatchedUnit]:
        """Each member as a unit of its own."""
        return [MatchedUnit((match,), group, self.n)
                for match, group in zip(self.matches, self.group.alone())]


def _dtype_key(site: LoraSite) -> tuple[object, ...]:
    return (site.dtype, site.base_dtype, site.weight_dtype, site.adapter_dtype, site.lora_dtype,
            site.result_dtype, site.device, site.weight_layout)


def group_reason(members: tuple[SiteMatch, ...], order: dict[fx.Node, int],
                 sparse_dropout: bool = True) -> str | None:
    """Why these sites (reading one x) cannot be one unit, or None; `order`: their graph's
    node_order."""
    sites = [m.site for m in members]
    if any(s.base is not Base.LINEAR for s in sites):
        return "an opaque base"
    dropouts = [a for s in sites for a in s.adapters if not a.reads_base_input]
    if dropouts and not (sparse_dropout and all(a.own_dropout for a in dropouts)):
        return "a dropout branch read through the graph's dropout"
    if len({_dtype_key(s) for s in sites}) != 1:
        return "different dtypes or devices"
    for match in members:
        for (role, _), node in match.nodes.items():
            if role not in (Role.X, Role.LORA_INPUT) and node.op not in INPUT_OPS:
                return f"an operand computed in the graph ({node.name})"
    owned = {n for m in members for n in m.owned} | {n for m in members for n in m.dropout_nodes}
    first = min(owned, key=order.__getitem__)
    last = max((m.root for m in members), key=order.__getitem__)
    mutation = mutation_between(first, last, owned)
    if mutation is not None:
        return f"an in-place op ({mutation.name}) between the members"
    return None


def group_sites(matches: list[SiteMatch], sparse_dropout: bool = True,
                grouping: bool = True) -> list[MatchedUnit]:
    """The planning units of a graph's sites, in graph order: each legal group of ≥ 2 sites
    reading one x, and every other site alone (every site alone when not `grouping`)."""
    if not grouping or not matches:
        return [MatchedUnit.of((m,)) for m in matches]
    order = node_order(matches[0].root.graph)
    by_x: dict[fx.Node, list[SiteMatch]] = {}
    for match in matches:
        by_x.setdefault(match.x, []).append(match)
    units: list[MatchedUnit] = []
    for match in matches:
        members = tuple(by_x.get(match.x, ()))
        if match is not members[0]:
            continue
        if len(members) > 1 and group_reason(members, order, sparse_dropout) is None:
            units.append(MatchedUnit.of(members))
        else:
            units += [MatchedUnit.of((m,)) for m in members]
    return units
