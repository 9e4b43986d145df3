"""The `runlora` torch.compile backend: find → choose → rewrite → tag → compile.

Each stage is a function below; its name is the word the INFO lines, `GraphReport.stages` and
the debug dump use. The backend holds no module state: every torch.compile call gets its own
`Backend` and its own reports. A failure inside runlora's own stages never stops training:
that graph is compiled as plain torch.compile would compile it, with one warning naming the
stage and the exception (option strict=True raises instead).
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch._functorch._aot_autograd.utils import make_boxed_func
from torch._inductor.compile_fx import compile_fx, compile_fx_inner

from runlora_fx import coverage
from runlora_fx.budget import Budget, choose_within
from runlora_fx.cache import default_cache_dir
from runlora_fx.choose import Chooser, Decision
from runlora_fx.compat import check_torch
from runlora_fx.debug import DebugOutput
from runlora_fx.options import INNER_COMPILERS, Options, parse_options
from runlora_fx.precision import Rounding
from runlora_fx.passes.find_sites import find_sites
from runlora_fx.passes.frozen_weights import WeightSource, check_units, input_sources
from runlora_fx.passes.graphs import GraphPart, graph_parts, working_copy
from runlora_fx.passes.group_sites import Unit, group_sites
from runlora_fx.passes.lora_modules import unrecognised
from runlora_fx.passes.recompute_tags import RecomputeTags, StageError
from runlora_fx.passes.rewrite import rewrite_unit
from runlora_fx.records import GraphReport
from runlora_fx.site import LoraSite, SiteGroup, SkippedSite
from runlora_fx.units import choose_unit
from runlora_fx.weight_guard import Watched, guard

log = logging.getLogger("runlora_fx")

STAGES = ("find", "choose", "rewrite", "tag", "compile")


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


@dataclass
class Found:
    """One graph part's planning units (groups of sites reading one x, or single sites)."""

    part: GraphPart
    units: list[Unit] = field(default_factory=list)


@dataclass
class Chosen:
    """A unit as the choose stage settled it: the members one decision covers."""

    part: GraphPart
    members: Unit
    decision: Decision
    weights: tuple[tuple[LoraSite, WeightSource], ...] = ()  # the checked W's its sites read


# ---- the stages --------------------------------------------------------------------------------


def find(gm: fx.GraphModule, report: GraphReport, grouping: bool = True,
         sparse_dropout: bool = True) -> list[Found]:
    """Every site of `gm` and of its higher-order-op bodies, grouped into planning units; the
    skipped ones (with reasons) and the LoRA-like modules no site covers go to `report`.
    `sparse_dropout`: whether dropout branches may be grouped (their plans draw their own
    dropped positions)."""
    parts = [(part, *find_sites(part.module.graph)) for part in graph_parts(gm)]
    # a module whose LoRA runs in a checkpoint body is covered there, not missed at the top
    covered = [x.site.path for _, matches, _ in parts for x in matches]
    covered += [s.path for _, _, skipped in parts for s in skipped]
    found = []
    for part, matches, skipped in parts:
        if part.blocked_by is None:  # a blocked body's LoRA modules are its caller's
            skipped += unrecognised(part.module.graph, covered)
        else:
            skipped += [SkippedSite(m.site.path, part.blocked_reason()) for m in matches]
            matches = []
        report.skipped += [SkippedSite(s.path, part.reason_prefix + s.reason) for s in skipped]
        units = group_sites(matches, sparse_dropout) if grouping else [(m,) for m in matches]
        found.append(Found(part, units))
    return found


def choose(
    found: list[Found], report: GraphReport, chooser: Chooser, budget: Budget | None
) -> list[Chosen]:
    """A decision per unit (or per member, where sharing GEMMs does not pay). Under a memory
    budget the top-level graph's sites are chosen together (budget.py), one by one; sites in
    checkpointed bodies are planned without it, since the region is recomputed and saves only
    its inputs."""
    chosen: list[Chosen] = []
    for item in found:
        units = item.units
        chooser.measure_ahead([SiteGroup(tuple(m.site for m in u)) for u in units])
        if budget is not None and not item.part.name:
            singles = [(m,) for unit in units for m in unit]
            decisions, report.warnings = _within_budget(singles, chooser, budget)
            chosen += [Chosen(item.part, u, d) for u, d in zip(singles, decisions)]
            continue
        for unit in units:
            decisions = choose_unit(SiteGroup(tuple(m.site for m in unit)), unit[0].n, chooser)
            if len(decisions) == 1:
                chosen.append(Chosen(item.part, unit, decisions[0]))
            else:  # the members planned one by one
                chosen += [Chosen(item.part, (m,), d) for m, d in zip(unit, decisions)]
    report.decisions = [c.decision for c in chosen]
    return chosen


def _within_budget(
    units: list[Unit], chooser: Chooser, budget: Budget
) -> tuple[list[Decision], list[str]]:
    pairs = [(d, d.candidates) for d in (chooser.choose(u[0].site) for u in units)]
    decisions, warning = choose_within(pairs, budget)
    decisions = [
        replace(d, note=f"{d.note}; N symbolic, budget judged at its hint N={d.site.n}")
        if d.site.n_symbolic is not None else d
        for d in decisions
    ]
    return decisions, [warning] if warning else []


def rewrite(chosen: list[Chosen]) -> None:
    """Replace each chosen unit by its planned call, in the graph part it was found in."""
    modules: dict[int, fx.GraphModule] = {}
    counters = itertools.count()
    replaced: dict[fx.Node, fx.Node] = {}  # a site's result → its planned call's
    for item in chosen:
        name = f"runlora_{item.part.name + '_' if item.part.name else ''}{next(counters)}"
        plan = item.decision.chosen.plan
        rewrite_unit(item.part.module.graph, item.members, plan, name, replaced)
        modules[id(item.part.module)] = item.part.module
    for module in modules.values():
        module.graph.lint()
        module.recompile()


def compile(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Options,
    mode: str | None,
    report: GraphReport,
    tag: bool = True,
) -> Callable:
    """Hand the graph to AOTAutograd and the inner compiler; `tag` installs the joint-graph pass
    that makes the partitioner recompute what the plans recompute."""
    config: dict[str, Any] = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    if tag:
        config["joint_custom_pre_pass"] = RecomputeTags()
    inner = record_partitions(INNER[options.inner], report)
    # The AOTAutograd cache would skip the joint pass and the recording on a hit.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=inner, config_patches=config)


# ---- the backend -------------------------------------------------------------------------------


def chooser_for(options: Options) -> Chooser:
    """The Chooser `options` ask for; reads $RUNLORA_CACHE_DIR and Inductor's fallback_random
    now, not at import."""
    cache_dir = options.cache_dir or default_cache_dir()
    sparse = options.sparse_dropout(torch._inductor.config.fallback_random)
    return Chooser(options.criterion, cache_dir, budgeted=options.memory_budget is not None,
                   rounding=options.rounding, fusions=options.fusions, sparse_dropout=sparse)


def check_merges(found: list[Found], gm: fx.GraphModule, example_inputs: Sequence[Any],
                 rounding: Rounding) -> dict[fx.Node, list[WeightSource]]:
    """Attach to each 16-bit site the merge check of its own frozen W (merge_check.py), part of
    the find stage; returns the W's read, by the site's result node."""
    sources = input_sources(gm, example_inputs)
    weights: dict[fx.Node, list[WeightSource]] = {}
    for item in found:
        item.units, read = check_units(item.units, item.part, sources, rounding)
        weights.update(read)
    return weights


def plan(gm: fx.GraphModule, report: GraphReport, options: Options, chooser: Chooser,
         example_inputs: Sequence[Any] = ()) -> list[Chosen]:
    """find then choose, into `report`: what the backend would rewrite (explain() stops here).
    `example_inputs` are the real tensors of gm's inputs, whose W's the merge check reads."""
    found = find(gm, report, grouping=options.fusions and options.memory_budget is None,
                 sparse_dropout=chooser.sparse_dropout)
    weights = check_merges(found, gm, example_inputs, options.rounding)
    report.stages.append("find")
    chosen = choose(found, report, chooser, options.memory_budget)
    report.stages.append("choose")
    return [replace(c, weights=tuple((m.site, w) for m in c.members
                                     for w in weights.get(m.root, ()))) for c in chosen]


def watched_weights(chosen: list[Chosen]) -> list[Watched]:
    """The checked W's of the sites whose chosen plan merges: their verdict must keep holding."""
    return [Watched.of(site, source.index, source.tensor) for c in chosen
            if c.decision.chosen.plan.merges for site, source in c.weights]


class Backend:
    """A `torch.compile` backend object; `reports` has one entry per graph it compiled."""

    def __init__(self, options: Mapping[str, Any] | None = None, mode: str | None = None):
        self.options = parse_options(options)  # reads $RUNLORA_STRICT now, not at import
        self.mode = None if mode in (None, "default") else mode
        self.reports: list[GraphReport] = []
        self._ids = itertools.count()
        self.debug = DebugOutput(self.options)  # reads RUNLORA_DEBUG_DIR now, not at import
        self.chooser = chooser_for(self.options)

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        check_torch(str(torch.__version__), bool(self.options.strict))  # once; strict raises
        report = GraphReport.for_inputs(next(self._ids), example_inputs)
        self.reports.append(report)
        if self.chooser.sparse_dropout != self.options.sparse_dropout(
                torch._inductor.config.fallback_random):  # flipped since: choose anew
            self.chooser = chooser_for(self.options)
        # the model's LoRA modules this graph covers; the rest is said once, at the first backward
        settle = coverage.watch(gm, example_inputs, report, self.options.strict)
        graph_debug = None
        try:
            work = working_copy(gm)  # `gm` stays as captured: the fallback compiles it
            chosen = plan(work, report, self.options, self.chooser, example_inputs)
            graph_debug = self.debug.start(report, work)  # log lines; sites.json, report.md
            rewrite(chosen)
            report.stages.append("rewrite")
            graph_debug.rewritten(work)
            compiled = compile(work, example_inputs, self.options, self.mode, report)
            report.stages += ["tag", "compile"]
            compiled = guard(compiled, watched_weights(chosen), self.options.rounding, report)
        except Exception as error:  # noqa: BLE001 — contained: plain compile takes over
            if self.options.strict:
                raise
            stage = STAGES[len(report.stages)]  # the first that did not finish
            if stage == "tag":  # the tag pass runs inside compile_fx: it names itself
                stage = error.stage if isinstance(error, StageError) else "compile"
            compiled = self._fall_back(gm, example_inputs, report, stage, error, graph_debug)
        if settle is not None:  # AOTAutograd compiles the backward when it first runs
            report.on_partition.append(settle)
        return compiled

    def _fall_back(self, gm: fx.GraphModule, example_inputs: Sequence[Any], report: GraphReport,
                   stage: str, error: Exception, graph_debug: Any) -> Callable:
        cause = error.__cause__ if isinstance(error, StageError) and error.__cause__ else error
        report.failure = f"{stage}: {type(cause).__name__}: {cause}"
        report.decisions = []  # nothing of runlora's runs in this graph
        message = (f"runlora: the {stage} stage raised {type(cause).__name__}: {cause}; this "
                   "graph is compiled as plain torch.compile would (options strict=True raises)")
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        report.forward = report.backward = None
        report.on_partition.clear()
        if graph_debug is None:
            graph_debug = self.debug.start(report, gm)
        else:
            graph_debug.planned(gm)  # the dump records the failure
        return compile(gm, example_inputs, self.options, self.mode, report, tag=False)


def runlora(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """Entry point of `torch.compile(model, backend="runlora", options=...)`."""
    return Backend(options, mode)(gm, example_inputs)
