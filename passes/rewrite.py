"""Replace a matched site's nodes with one call that runs its chosen plan."""

from __future__ import annotations

import torch.fx as fx

from passes.find_sites import SiteMatch
from runlora_fx.execute import PlannedLoraLinear
from runlora_fx.plans import Plan


def rewrite_site(graph: fx.Graph, match: SiteMatch, plan: Plan, name: str) -> fx.Node:
    """Execute `plan` for `match`: insert the planned call, reroute users, drop the old nodes."""
    planned = PlannedLoraLinear(name, match.site, plan)
    with graph.inserting_before(match.root):
        node = graph.call_function(
            planned,
            (
                match.x,
                match.weight,
                match.bias,
                match.lora_inputs,
                match.lora_a,
                match.lora_b,
                match.scales,
            ),
        )
    node.meta.update(match.root.meta)
    match.root.replace_all_uses_with(node)
    for old in reversed(match.owned):  # users before producers
        graph.erase_node(old)
    return node
