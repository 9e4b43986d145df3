"""The frozen W behind each site, for the merge check (runlora_fx/ir/merge_check.py): where the
real tensor comes from, and the check attached to each 16-bit site before plans are chosen.

Dynamo lifts a module's parameters to graph inputs, and the backend receives the real tensors
for them (`example_inputs`, in placeholder order); a checkpointed region's body reads them as
its own placeholders, fed by the outer graph's operands of `tag_activation_checkpoint`
(recursively). A parameter Dynamo kept as a constant (`get_attr`) is read from the graph
module. A W the graph computes (a cast, a view of something else) has no tensor to read:
merging stays illegal there, and the reason says so. What happens when W changes after
compiling: runlora_fx/weight_guard.py. The same sources tell which sites' W, A and B the
backend holds, for persistent stacks (`MergeChecks.hold`, runlora_fx/ir/stacks.py).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx

from runlora_fx.ir.merge_check import MergeCheck, check_site, not_run
from runlora_fx.ir.operands import Role
from runlora_fx.ir.precision import CHECKED_KINDS, kind
from runlora_fx.ir.rounding import Rounding
from runlora_fx.ir.site import Base, LoraSite
from runlora_fx.passes.find_sites import SiteMatch
from runlora_fx.passes.graphs import REWRITABLE, GraphPart, graph_parts


@dataclass(frozen=True)
class WeightSource:
    """Where a site's W comes from at run time."""

    index: int | None  # the top-level graph input it is passed as; None: a graph constant
    tensor: torch.Tensor  # the real tensor, as it was when the backend was called


Sources = list[WeightSource] | str  # the W's a node may be (a body has callers), or why none


def input_sources(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[fx.Node, Sources]:
    """For every placeholder of `gm` and of the rewritable bodies it calls: the real tensors it
    may hold at run time."""
    found: dict[fx.Node, Sources] = {}
    parts = graph_parts(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        value = example_inputs[i] if i < len(example_inputs) else None
        found[node] = ([WeightSource(i, value)] if isinstance(value, torch.Tensor)
                       else f"graph input {node.name} is not a tensor")
    for part in parts:  # parents come before their bodies
        for call in part.module.graph.nodes:
            if not (call.op == "call_function" and call.args
                    and isinstance(call.target, torch._ops.HigherOrderOperator)
                    and call.target.name() in REWRITABLE):
                continue
            body = _body(part.module, call.args[0])
            if body is None:
                continue
            inner = [n for n in body.graph.nodes if n.op == "placeholder"]
            for node, outer in zip(inner, call.args[1:]):
                _merge(found, node, resolve(outer, part.module, found))
    return found


def _body(module: fx.GraphModule, node: object) -> fx.GraphModule | None:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    body = getattr(module, str(node.target), None)
    return body if isinstance(body, fx.GraphModule) else None


def _merge(found: dict[fx.Node, Sources], node: fx.Node, more: Sources) -> None:
    """A body's placeholder fed by several calls holds each caller's tensor in turn."""
    old = found.get(node)
    if old is None or isinstance(more, str):
        found[node] = more if old is None or isinstance(old, list) else old
    elif isinstance(old, list):
        found[node] = old + [s for s in more if all(s.tensor is not o.tensor for o in old)]


def resolve(node: object, module: fx.GraphModule, found: dict[fx.Node, Sources]) -> Sources:
    """The real tensors behind `node` (a weight node of `module`'s graph), or why there are none."""
    if not isinstance(node, fx.Node):
        return "W is not a graph value"
    if node.op == "placeholder":
        return found.get(node, f"the graph input {node.name} has no known tensor")
    if node.op == "get_attr":
        try:
            value = operator.attrgetter(str(node.target))(module)
        except AttributeError:
            return f"the graph constant {node.target} cannot be read"
        if isinstance(value, torch.Tensor):
            return [WeightSource(None, value)]
        return f"the graph constant {node.target} is not a tensor"
    return f"W is computed in the graph ({node.name}), not read from a parameter"


def needs_check(site: LoraSite) -> bool:
    """A 16-bit site whose merged verdict depends on W (precision.CHECKED_KINDS): its W is a
    tensor a plan may add to (dropout branches too: sparse dropout merges)."""
    return site.base is Base.LINEAR and kind(site) in CHECKED_KINDS


def combined(checks: list[MergeCheck]) -> MergeCheck:
    """One verdict for a site whose body runs with several W's: each must pass."""
    refused = [c for c in checks if not c.legal]
    if not refused:
        return checks[0]
    first = refused[0]
    if len(checks) == 1:
        return first
    return replace(first, reason=f"{first.reason} (for {len(refused)} of the {len(checks)} "
                                 "weights this checkpointed region runs with)")


@dataclass
class MergeChecks:
    """The merge check of each 16-bit site's own W in one compiled graph: the real tensors its
    inputs hold, the rounding the check runs for, and the W's each checked site read (by the
    site's result node: a merged plan's W is watched after compiling, weight_guard.py)."""

    sources: dict[fx.Node, Sources]
    rounding: Rounding
    read: dict[fx.Node, list[WeightSource]] = field(default_factory=dict)
    # the real W, A, B tensors of each held site (by its result node, then (role, adapter)):
    # a persistent stack is built from them and refreshed when they change (stacks.py)
    held: dict[fx.Node, dict[tuple[Role, int | None], WeightSource]] = field(
        default_factory=dict)

    @classmethod
    def of(cls, gm: fx.GraphModule, example_inputs: Sequence[Any],
           rounding: Rounding) -> MergeChecks:
        return cls(input_sources(gm, example_inputs), rounding)

    def check(self, matches: list[SiteMatch], part: GraphPart) -> list[SiteMatch]:
        """The matches of `part`, each checked site with its verdict attached."""
        out = []
        for match in matches:
            site = match.site
            if needs_check(site):
                sources = resolve(match.nodes.get((Role.WEIGHT, None)), part.module,
                                  self.sources)
                if isinstance(sources, str):
                    verdict = not_run(self.rounding, sources)
                else:
                    verdict = combined([check_site(site, s.tensor, self.rounding)
                                        for s in sources])
                    self.read[match.root] = sources
                match = replace(match, site=replace(site, merge_check=verdict))
            out.append(match)
        return out

    def hold(self, matches: list[SiteMatch], part: GraphPart) -> list[SiteMatch]:
        """The matches of `part`, each marked `weights_held` where its W, A and B are each
        exactly one real tensor the backend receives: a top-level graph input or constant (a
        checkpointed body is recomputed from its own inputs, so its stacks stay cats)."""
        if part.name:
            return matches
        out = []
        for match in matches:
            tensors = {key: resolve(node, part.module, self.sources)
                       for key, node in match.nodes.items() if key[0] in HELD_ROLES}
            if match.site.base is Base.LINEAR and all(_plain(t) for t in tensors.values()):
                self.held[match.root] = {key: t[0] for key, t in tensors.items()}  # type: ignore[index]
                match = replace(match, site=replace(match.site, weights_held=True))
            out.append(match)
        return out


HELD_ROLES = (Role.WEIGHT, Role.LORA_A, Role.LORA_B)


def _plain(sources: Sources) -> bool:
    """One real tensor, not a fake or a subclass (a DTensor's shards are not the whole W)."""
    return (isinstance(sources, list) and len(sources) == 1
            and type(sources[0].tensor) in (torch.Tensor, torch.nn.Parameter)
            and sources[0].tensor.device.type != "meta")
