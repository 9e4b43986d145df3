"""The graphs of one compiled graph: the top level and the bodies of its higher-order ops.

Dynamo puts a `use_reentrant=False` checkpointed region into a GraphModule attribute called by
`torch.ops.higher_order.tag_activation_checkpoint`. AOTAutograd runs that body under
non-reentrant checkpointing, so a planned autograd.Function inside it is traced like any other op
of the region and recomputed in the backward with the rest of it (tests/test_checkpointing.py
checks parity with eager, and that the forward saves what plain torch.compile saves). Bodies of
other higher-order ops (cond, while_loop, invoke_subgraph, flex attention's score_mod, …) have
their own tracing rules, untested here: their sites are reported as skipped, with where they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch.fx as fx
from torch._ops import HigherOrderOperator

# Higher-order ops whose bodies are rewritten: each one proven by tests/test_checkpointing.py.
REWRITABLE = frozenset({"tag_activation_checkpoint"})


@dataclass(frozen=True)
class GraphPart:
    module: fx.GraphModule
    name: str  # "" for the top level, else the body's attribute path (unique names its calls)
    where: str | None  # "inside the OP subgraph NAME" for a body
    blocked_by: str | None  # the outermost enclosing op whose bodies are not rewritten

    @property
    def reason_prefix(self) -> str:
        return f"{self.where}: " if self.where else ""

    def blocked_reason(self) -> str:
        return (f"{self.reason_prefix}sites inside {self.blocked_by} subgraphs are not rewritten "
                f"(only {', '.join(sorted(REWRITABLE))} bodies are)")


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


def node_order(graph: fx.Graph) -> dict[fx.Node, int]:
    """Each node's position in the graph: the order the passes sort and compare nodes by."""
    return {node: i for i, node in enumerate(graph.nodes)}


def graph_parts(gm: fx.GraphModule) -> list[GraphPart]:
    """The top-level graph, then every body, depth first (a checkpoint nested in a cond branch
    is blocked by the cond: it is traced by the cond's rules first)."""
    parts = [GraphPart(gm, "", None, None)]
    _walk(parts[0], parts)
    return parts


def _walk(parent: GraphPart, parts: list[GraphPart]) -> None:
    for hop, attr, body in hop_bodies(parent.module):
        name = f"{parent.name}_{attr}" if parent.name else attr
        where = f"{parent.reason_prefix}inside the {hop} subgraph {attr}"
        blocker = parent.blocked_by or (None if hop in REWRITABLE else hop)
        part = GraphPart(body, name, where, blocker)
        parts.append(part)
        _walk(part, parts)


def working_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` and of every body it calls, to rewrite while `gm` stays as captured (the
    graph a failed rewrite falls back to). Nodes are new; their meta (fake values, SymInts,
    module stacks) is shared, so guards installed while planning the copy are Dynamo's."""
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    graph._codegen = gm.graph._codegen
    copies: dict[fx.Node, fx.Node] = {}
    output, old_output = graph.graph_copy(gm.graph, copies, return_output_node=True)  # type: ignore[misc]
    new_output = graph.output(output, type_expr=old_output.type)
    new_output.meta = dict(old_output.meta)
    for old, new in copies.items():  # Dynamo's own node attributes (`_dynamo_source`, …)
        for name, value in vars(old).items():
            if name not in vars(new):
                setattr(new, name, value)
    copy = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for name, value in vars(gm).items():  # `meta`, `_param_name_to_source`, …: AOTAutograd
        if name not in vars(copy):  # reads them to tell parameters from activations
            setattr(copy, name, value)
    copy.meta = dict(gm.meta)
    for _, attr, body in hop_bodies(gm):
        setattr(copy, attr, working_copy(body))
    return copy
