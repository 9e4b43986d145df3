"""The grouping pass: sites that read the same x (q/k/v, gate/up) form one planning unit, so a
plan may share a GEMM across them (plans.py: stack_w, group_h, group_da). Legality only; the
choose stage compares the group's best plan with its members' own.

A group's call replaces its members' nodes at once, before the first member's result: so every
member's operands but x must be graph inputs (weights, not computed tensors), every branch must
read x itself (no dropout, or a dropout the plan draws itself: sparse dropout, which the
group's plans then use), and nothing may run in place between the first member's reads and the
last member's result.
"""

from __future__ import annotations

import torch.fx as fx

from runlora_fx.passes.find_sites import SiteMatch, mutates
from runlora_fx.operands import Role
from runlora_fx.site import Base, LoraSite

Unit = tuple[SiteMatch, ...]
INPUT_OPS = ("placeholder", "get_attr")


def _dtype_key(site: LoraSite) -> tuple[object, ...]:
    return (site.dtype, site.base_dtype, site.w_dtype, site.a_dtype, site.lora_dtype,
            site.result_dtype, site.device, site.weight_layout)


def group_reason(members: Unit, sparse_dropout: bool = True) -> str | None:
    """Why these sites (reading one x) cannot be one unit, or None."""
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
    order = {node: i for i, node in enumerate(members[0].root.graph.nodes)}
    owned = {n for m in members for n in m.owned} | {n for m in members for n in m.dropout_nodes}
    first = min(owned, key=order.__getitem__)
    last = max((m.root for m in members), key=order.__getitem__)
    node = first.next
    while node is not last:
        if mutates(node) and node not in owned:
            return f"an in-place op ({node.name}) between the members"
        node = node.next
    return None


def group_sites(matches: list[SiteMatch], sparse_dropout: bool = True) -> list[Unit]:
    """The planning units of a graph's sites, in graph order: each legal group of ≥ 2 sites
    reading one x, and every other site alone."""
    by_x: dict[fx.Node, list[SiteMatch]] = {}
    for match in matches:
        by_x.setdefault(match.x, []).append(match)
    units: list[Unit] = []
    for match in matches:
        members = tuple(by_x.get(match.x, ()))
        if match is not members[0]:
            continue
        if len(members) > 1 and group_reason(members, sparse_dropout) is None:
            units.append(members)
        else:
            units += [(m,) for m in members]
    return units
