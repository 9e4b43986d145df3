"""Joint-graph pass: make the partitioner recompute what a plan says to recompute.

Joint-graph CSE merges a backward recompute of h = x Aᵀ (or of W + sBA) with the forward one, and
the min-cut partitioner never recomputes a matmul, so without tags "recompute" silently becomes
"save" (docs/design.md, "The partitioner decides what is saved"). Forward nodes traced under the
executor's annotation are tagged MUST_RECOMPUTE; forward means not reachable from any tangent.
"""

from __future__ import annotations

import functools

import networkx as nx
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.utils.checkpoint import CheckpointPolicy

from runlora_fx.ir import execute
from runlora_fx.ir.execute import RECOMPUTE_ANNOTATION


def dataflow(graph: fx.Graph) -> nx.DiGraph:
    flow = nx.DiGraph()
    flow.add_nodes_from(graph.nodes)
    flow.add_edges_from((node, user) for node in graph.nodes for user in node.users)
    return flow


def backward_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that depend on a tangent (the incoming gradient)."""
    flow = dataflow(graph)
    tangents = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")]
    reached: set[fx.Node] = set(tangents)
    for tangent in tangents:
        reached |= nx.descendants(flow, tangent)
    return reached


def tag_recompute(graph: fx.Graph) -> int:
    """Tag annotated forward nodes MUST_RECOMPUTE; returns how many were tagged."""
    backward = backward_nodes(graph)
    tagged = 0
    for node in graph.nodes:
        custom = node.meta.get("custom") or {}
        if RECOMPUTE_ANNOTATION in custom and node not in backward and node.op == "call_function":
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            tagged += 1
    return tagged


class StageError(Exception):
    """A runlora stage that runs inside torch's compile (the tag pass) raised; the backend
    falls back to plain compile and names the stage. The cause is `__cause__`."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage)
        self.stage = stage


class RecomputeTags(CustomGraphPass):
    def __call__(self, graph: fx.Graph) -> None:
        try:
            tag_recompute(graph)
        except Exception as error:
            raise StageError("tag") from error

    def uuid(self) -> bytes:
        return _source_hash()


@functools.cache
def _source_hash() -> bytes:
    """What Inductor's FX graph cache keys the pass by: its source and that of the annotation it
    reads (torch's advice for custom passes: `get_hash_for_files`), so a change to either
    misses the cache without a version to bump."""
    return get_hash_for_files((__file__, execute.__file__))
