"""Replace a matched unit's nodes with one call that runs its chosen plan."""

from __future__ import annotations

import operator
from collections.abc import Mapping

import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource

from runlora_fx.ir.execute import UnitCall
from runlora_fx.ir.operands import Role
from runlora_fx.passes.group_sites import MatchedUnit


def rewrite_unit(graph: fx.Graph, unit: MatchedUnit, planned: UnitCall,
                 replaced: dict[fx.Node, fx.Node], order: dict[fx.Node, int],
                 stacks: Mapping[str, str] | None = None) -> None:
    """Execute the planned call for the unit: insert it where its first member's result
    was, reroute each member's users to its result, drop the old nodes. `replaced` maps the
    results of units rewritten before to their new nodes (a site may read another's result),
    and gets this unit's; `order` is the graph's node_order from before the first rewrite;
    `stacks`: the attribute of the graph module that holds each persistent stack the plan
    reads (stack_refresh.py)."""
    members = unit.matches
    plan = planned.plan
    first = min((m.root for m in members), key=order.__getitem__)
    scales = tuple(s for m in members for s in m.scales)
    with graph.inserting_before(first):
        tensors = []
        for op in planned.operands:
            if op.role is Role.STACK:  # a buffer: AOTAutograd passes it like a parameter
                assert stacks is not None, "a persistent stack needs its buffer"
                tensors.append(graph.get_attr(stacks[op.name]))
                continue
            match = members[op.member]
            node = replaced.get(match.node_for(op), match.node_for(op))
            if (op.role, op.adapter) in match.transposed:  # stored in×out: read A.t(), a view
                node = graph.call_method("t", (node,))
            tensors.append(node)
        call = graph.call_function(planned, (tuple(tensors), scales))
        results = [call] if len(members) == 1 else [
            graph.call_function(operator.getitem, (call, i)) for i in range(len(members))
        ]
    for member, result in zip(members, results):
        result.meta.update(member.root.meta)
        member.root.replace_all_uses_with(result)
        replaced[member.root] = result
    if len(members) > 1:
        call.meta["example_value"] = tuple(m.root.meta.get("example_value") for m in members)
    doomed = {n for m in members for n in m.owned}
    if plan.sparse_dropout:  # the plan draws its own positions: the graph's dropouts go too
        doomed |= {n for m in members for n in m.dropout_nodes}
    for old in sorted(doomed, key=order.__getitem__, reverse=True):  # users before producers
        graph.erase_node(old)


def hold_buffer(gm: fx.GraphModule, attribute: str, tensor: torch.Tensor) -> None:
    """Register `tensor` as a buffer of `gm` (a persistent stack): AOTAutograd passes it to the
    compiled code before the graph's inputs, and wants a source for each such tensor of a
    Dynamo graph (its dedup guards); the graph module's map of them is shared with the graph
    as captured (the fallback compiles that one), so it gets a copy."""
    gm.register_buffer(attribute, tensor)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        gm._param_name_to_source = {**sources, attribute: ConstantSource(attribute)}
