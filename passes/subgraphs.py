"""Rewrite LoRA sites inside higher-order-op bodies (the subgraph of each checkpointed layer).

Dynamo puts a `use_reentrant=False` checkpointed region into a GraphModule attribute called by
`torch.ops.higher_order.tag_activation_checkpoint`. AOTAutograd runs that body under
non-reentrant checkpointing, so a planned autograd.Function inside it is traced like any other op
of the region and recomputed in the backward with the rest of it (tests/test_checkpointing.py
checks parity with eager, and that the forward saves what plain torch.compile saves). Bodies of
other higher-order ops (cond, while_loop, invoke_subgraph, flex attention's score_mod, …) have
their own tracing rules, untested here: their sites are reported as skipped, with where they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch.fx as fx
from torch._ops import HigherOrderOperator

from passes.find_sites import SiteMatch, find_sites
from passes.rewrite import rewrite_site
from runlora_fx.choose import Decision
from runlora_fx.site import SkippedSite

# Higher-order ops whose bodies are rewritten: each one proven by tests/test_checkpointing.py.
REWRITABLE = frozenset({"tag_activation_checkpoint"})

Decide = Callable[[list[SiteMatch]], list[Decision]]


@dataclass(frozen=True)
class _BodyPlan:
    body: fx.GraphModule
    name: str  # unique per body: the planned calls are named f"{name}_{i}"
    matches: list[SiteMatch]
    decisions: list[Decision]


@dataclass
class SubgraphPlan:
    """The sites of a graph's higher-order-op bodies: decided, not yet rewritten (so a debug dump
    can show the bodies as captured, then as rewritten)."""

    decisions: list[Decision] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)
    bodies: list[_BodyPlan] = field(default_factory=list, repr=False)

    def rewrite(self) -> None:
        """Replace each decided site by its planned call, in place in its body."""
        for plan in self.bodies:
            for i, (match, decision) in enumerate(zip(plan.matches, plan.decisions)):
                rewrite_site(plan.body.graph, match, decision.chosen.plan, f"{plan.name}_{i}")
            plan.body.graph.lint()
            plan.body.recompile()
        self.bodies = []  # the matched nodes are gone: a second call has nothing to rewrite


def hop_bodies(gm: fx.GraphModule) -> Iterator[tuple[str, str, fx.GraphModule]]:
    """(op name, attribute name, body) of each GraphModule a higher-order op of `gm` calls; a body
    called by several ops comes once (it is rewritten once)."""
    seen: set[int] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, HigherOrderOperator):
            continue
        for arg in (*node.args, *node.kwargs.values()):
            if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
                continue
            body = getattr(gm, str(arg.target), None)
            if isinstance(body, fx.GraphModule) and id(body) not in seen:
                seen.add(id(body))
                yield node.target.name(), str(arg.target), body


def plan_subgraphs(gm: fx.GraphModule, decide: Decide, name_prefix: str) -> SubgraphPlan:
    """Find the sites in `gm`'s higher-order-op bodies (recursively) and decide the rewritable
    ones: those in checkpoint bodies with no other op around them. `decide` gets one body's
    matches and returns one Decision per match, in order. Every skipped reason starts with
    "inside the OP subgraph NAME: "."""
    plan = SubgraphPlan()
    _walk(gm, decide, name_prefix, None, plan)
    return plan


def rewrite_subgraphs(
    gm: fx.GraphModule, decide: Decide, name_prefix: str
) -> tuple[list[Decision], list[SkippedSite]]:
    """`plan_subgraphs` then rewrite: (decisions of the rewritten sites, skipped sites)."""
    plan = plan_subgraphs(gm, decide, name_prefix)
    plan.rewrite()
    return plan.decisions, plan.skipped


def _walk(
    gm: fx.GraphModule, decide: Decide, prefix: str, blocked_by: str | None, plan: SubgraphPlan
) -> None:
    """`blocked_by`: the outermost enclosing op whose bodies are not rewritten, if any (a
    checkpoint nested in a cond branch is traced by the cond's rules first)."""
    for hop, attr, body in hop_bodies(gm):
        where = f"inside the {hop} subgraph {attr}"
        blocker = blocked_by or (None if hop in REWRITABLE else hop)
        matches, inner = find_sites(body.graph)
        skipped = [SkippedSite(s.path, f"{where}: {s.reason}") for s in inner]
        if blocker is None:
            decisions = decide(matches)
            if len(decisions) != len(matches):
                raise ValueError(
                    f"decide() gave {len(decisions)} decisions for {len(matches)} sites"
                )
            plan.decisions += decisions
            if matches:
                plan.bodies.append(_BodyPlan(body, f"{prefix}_{attr}", matches, decisions))
        else:
            reason = (f"{where}: sites inside {blocker} subgraphs are not rewritten (only "
                      f"{', '.join(sorted(REWRITABLE))} bodies are)")
            skipped += [SkippedSite(m.site.path, reason) for m in matches]
        nested = SubgraphPlan()
        _walk(body, decide, f"{prefix}_{attr}", blocker, nested)
        plan.decisions += nested.decisions
        plan.bodies += nested.bodies
        skipped += [SkippedSite(s.path, f"{where}: {s.reason}") for s in nested.skipped]
        plan.skipped += skipped
