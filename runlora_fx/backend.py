"""The `runlora` torch.compile backend: find → plan → choose → rewrite → tag → compile.

Each stage is a named function; the stage names reappear in `GraphReport`. The backend holds no
module state: every torch.compile call gets its own `Backend` and its own reports.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._functorch._aot_autograd.utils import make_boxed_func
from torch._ops import HigherOrderOperator
from torch._inductor.compile_fx import compile_fx, compile_fx_inner

from passes.find_sites import SiteMatch, find_sites
from passes.recompute_tags import RecomputeTags
from passes.rewrite import rewrite_site
from runlora_fx.choose import Decision, choose
from runlora_fx.debug import DebugOutput
from runlora_fx.options import INNER_COMPILERS, Options, parse_options
from runlora_fx.site import SkippedSite


@dataclass
class GraphReport:
    """What happened to one compiled graph; the partitioned graphs arrive as they compile."""

    graph_id: int
    decisions: list[Decision] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)
    parameter_inputs: tuple[bool, ...] = ()  # per graph input: is it an nn.Parameter
    forward: fx.GraphModule | None = None
    backward: fx.GraphModule | None = None
    # called as f("forward" | "backward", gm) when a partitioned graph arrives (the debug dump)
    on_partition: list[Callable[[str, fx.GraphModule], None]] = field(
        default_factory=list, repr=False, compare=False
    )

    @classmethod
    def for_inputs(cls, graph_id: int, example_inputs: Sequence[Any]) -> GraphReport:
        """A fresh report; parameters among the inputs are told apart for the saved-set checks."""
        return cls(
            graph_id=graph_id,
            parameter_inputs=tuple(isinstance(t, torch.nn.Parameter) for t in example_inputs),
        )


def eager_inner(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
    """Run the partitioned aten graph as it is, without Inductor codegen."""
    return make_boxed_func(gm.forward)


INNER = {"inductor": compile_fx_inner, "eager": eager_inner}
assert tuple(INNER) == INNER_COMPILERS, "options.INNER_COMPILERS names these compilers"


def record_partitions(inner: Callable, report: GraphReport) -> Callable:
    """Wrap an inner compiler so the partitioned graphs that really run land in `report`."""

    def compile_partition(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
        part = "backward" if kwargs.get("is_backward") else "forward"
        setattr(report, part, gm)
        for listener in report.on_partition:
            listener(part, gm)
        return inner(gm, example_inputs, **kwargs)

    return compile_partition


def subgraph_sites(gm: fx.GraphModule) -> list[SkippedSite]:
    """LoRA sites inside higher-order-op bodies (e.g. the tag_activation_checkpoint subgraph of
    each gradient-checkpointed layer): not rewritten yet, so reported as skipped with where."""
    skipped: list[SkippedSite] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, HigherOrderOperator):
            continue
        for arg in node.args:
            if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
                continue
            body = getattr(gm, str(arg.target), None)
            if not isinstance(body, fx.GraphModule):
                continue
            where = f"inside the {node.target.name()} subgraph {arg.target}"
            matches, inner = find_sites(body.graph)
            skipped += [
                SkippedSite(m.site.path, f"{where}: subgraphs are not rewritten yet")
                for m in matches
            ]
            skipped += [SkippedSite(s.path, f"{where}: {s.reason}") for s in inner]
            skipped += subgraph_sites(body)
    return skipped


def plan_sites(matches: list[SiteMatch], criterion: str) -> list[Decision]:
    return [choose(match.site, criterion) for match in matches]


def rewrite_sites(gm: fx.GraphModule, matches: list[SiteMatch], decisions: list[Decision]) -> None:
    for i, (match, decision) in enumerate(zip(matches, decisions)):
        rewrite_site(gm.graph, match, decision.chosen.plan, f"runlora_site_{i}")
    gm.graph.lint()
    gm.recompile()


def compile_rewritten(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Options,
    mode: str | None,
    report: GraphReport,
) -> Callable:
    config: dict[str, Any] = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    config["joint_custom_pre_pass"] = RecomputeTags()
    inner = record_partitions(INNER[options.inner], report)
    # The AOTAutograd cache would skip the joint pass and the recording on a hit.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=inner, config_patches=config)


class Backend:
    """A `torch.compile` backend object; `reports` has one entry per graph it compiled."""

    def __init__(self, options: Mapping[str, Any] | None = None, mode: str | None = None):
        self.options = parse_options(options)
        self.mode = None if mode in (None, "default") else mode
        self.reports: list[GraphReport] = []
        self._ids = itertools.count()
        self.debug = DebugOutput(self.options)  # reads RUNLORA_DEBUG_DIR now, not at import

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        report = GraphReport.for_inputs(next(self._ids), example_inputs)
        self.reports.append(report)
        matches, report.skipped = find_sites(gm.graph)
        report.skipped += subgraph_sites(gm)
        report.decisions = plan_sites(matches, self.options.criterion)
        graph_debug = self.debug.start(report, gm)  # log lines; dump sites.json, report.md
        rewrite_sites(gm, matches, report.decisions)
        graph_debug.rewritten(gm)
        return compile_rewritten(gm, example_inputs, self.options, self.mode, report)


def runlora(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """Entry point of `torch.compile(model, backend="runlora", options=...)`."""
    return Backend(options, mode)(gm, example_inputs)
