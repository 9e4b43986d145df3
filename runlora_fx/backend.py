"""The `runlora` torch.compile backend: find → plan → choose → rewrite → tag → compile.

Each stage is a named function; the stage names reappear in `GraphReport`. The backend holds no
module state: every torch.compile call gets its own `Backend` and its own reports.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch._functorch._aot_autograd.utils import make_boxed_func
from torch._inductor.compile_fx import compile_fx, compile_fx_inner

from passes.find_sites import SiteMatch, find_sites
from passes.recompute_tags import RecomputeTags
from passes.rewrite import rewrite_site
from passes.subgraphs import SubgraphPlan, plan_subgraphs
from runlora_fx.budget import Budget, choose_within
from runlora_fx.cache import default_cache_dir
from runlora_fx.choose import Chooser, Decision
from runlora_fx.guards import choose_over_n
from runlora_fx.debug import DebugOutput
from runlora_fx.options import INNER_COMPILERS, Options, parse_options
from runlora_fx.site import SkippedSite


@dataclass
class GraphReport:
    """What happened to one compiled graph; the partitioned graphs arrive as they compile."""

    graph_id: int
    decisions: list[Decision] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. an infeasible memory budget
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


def plan_sites(
    matches: list[SiteMatch], chooser: Chooser, budget: Budget | None = None
) -> tuple[list[Decision], list[str]]:
    """One decision per site, and the warnings to surface. Without a budget the choice is per
    site, for a symbolic N over a guarded range (guards.py); under a memory budget it is made
    across sites (budget.py), at N's size hint."""
    chooser.measure_ahead([m.site for m in matches])
    if budget is None:
        return [choose_over_n(match, chooser) for match in matches], []
    pairs = [(d, d.candidates) for d in (chooser.choose(m.site) for m in matches)]
    decisions, warning = choose_within(pairs, budget)
    symbolic = [m.site.n_symbolic is not None for m in matches]
    decisions = [
        replace(d, note=f"{d.note}; N symbolic, budget judged at its hint N={d.site.n}")
        if is_symbolic else d
        for d, is_symbolic in zip(decisions, symbolic)
    ]
    return decisions, [warning] if warning else []


def chooser_for(options: Options) -> Chooser:
    """The Chooser `options` ask for; reads $RUNLORA_CACHE_DIR now, not at import."""
    cache_dir = options.cache_dir or default_cache_dir()
    return Chooser(options.criterion, cache_dir, budgeted=options.memory_budget is not None)


def plan_graph(
    gm: fx.GraphModule, report: GraphReport, chooser: Chooser, budget: Budget | None
) -> tuple[list[SiteMatch], list[Decision], SubgraphPlan]:
    """Find and decide every site of `gm` and of its checkpoint bodies, into `report`; nothing
    is rewritten. Returns the top-level matches, their decisions and the bodies' plan."""
    matches, report.skipped = find_sites(gm.graph)
    decisions, report.warnings = plan_sites(matches, chooser, budget)
    # Sites in checkpointed regions (each layer's tag_activation_checkpoint body): planned
    # without the budget, since the region is recomputed and saves only its inputs.
    inner = plan_subgraphs(gm, lambda ms: plan_sites(ms, chooser)[0], "runlora_sub")
    report.decisions = decisions + inner.decisions
    report.skipped += inner.skipped
    return matches, decisions, inner


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
        self.chooser = chooser_for(self.options)

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        report = GraphReport.for_inputs(next(self._ids), example_inputs)
        self.reports.append(report)
        matches, decisions, inner = plan_graph(gm, report, self.chooser, self.options.memory_budget)
        graph_debug = self.debug.start(report, gm)  # log lines; dump sites.json, report.md
        rewrite_sites(gm, matches, decisions)
        inner.rewrite()
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
