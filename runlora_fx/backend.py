"""The `runlora` torch.compile backend: find → choose → rewrite → tag → compile.

Each stage is a function below, named for what it does (`find`, `decide`, `rewrite`, the tag
pass, `compile_graph`); the stage's word is what the INFO lines, `GraphReport.stages` and the
debug dump use (`STAGES`). The backend holds no module state: every torch.compile call gets its
own `Backend` and its own reports. A failure inside runlora's own stages never stops training:
that graph is compiled as plain torch.compile would compile it, with one warning naming the
stage and the exception (option strict=True raises instead).
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch._functorch._aot_autograd.utils import make_boxed_func
from torch._inductor.compile_fx import compile_fx, compile_fx_inner

from runlora_fx import coverage
from runlora_fx.choice.budget import Budget
from runlora_fx.choice.chooser import Chooser
from runlora_fx.choice.criteria import CRITERIA, Decision
from runlora_fx.ir import operands as ops
from runlora_fx.ir.compat import check_torch, default_cache_dir
from runlora_fx.ir.execute import UnitCall
from runlora_fx.ir.program import program_for
from runlora_fx.ir.site import LoraSite, SiteGroup, SkippedSite
from runlora_fx.options import CRITERION_NAMES, INNER_COMPILERS, Options, parse_options
from runlora_fx.passes.find_sites import find_sites
from runlora_fx.passes.frozen_weights import MergeChecks, WeightSource
from runlora_fx.passes.graphs import GraphPart, graph_parts, node_order, working_copy
from runlora_fx.passes.group_sites import MatchedUnit, group_sites
from runlora_fx.passes.lora_modules import unrecognised
from runlora_fx.passes.recompute_tags import RecomputeTags, StageError
from runlora_fx.passes.rewrite import hold_buffer, rewrite_unit
from runlora_fx.report.debug import DebugOutput
from runlora_fx.report.graph_report import GraphReport
from runlora_fx.stack_refresh import HeldStack, refresh
from runlora_fx.weight_guard import Watched, guard

log = logging.getLogger("runlora_fx")

STAGES = ("find", "choose", "rewrite", "tag", "compile")


def eager_inner(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
    """Run the partitioned aten graph as it is, without Inductor codegen."""
    return make_boxed_func(gm.forward)


INNER = {"inductor": compile_fx_inner, "eager": eager_inner}
assert tuple(INNER) == INNER_COMPILERS, "options.INNER_COMPILERS names these compilers"
assert tuple(CRITERIA) == CRITERION_NAMES, "options.CRITERION_NAMES names these criteria"


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
    units: list[MatchedUnit] = field(default_factory=list)


@dataclass
class Chosen:
    """A unit as the choose stage settled it: the members one decision covers."""

    part: GraphPart
    unit: MatchedUnit
    decision: Decision
    weights: tuple[tuple[LoraSite, WeightSource], ...] = ()  # the checked W's its sites read
    # per operand name of a held site's W, A, B: (graph input index or None, read as `.t()`,
    # the real tensor) — what its persistent stacks are built from
    held: Mapping[str, tuple[int | None, bool, torch.Tensor]] = field(default_factory=dict)


# ---- the stages --------------------------------------------------------------------------------


def find(gm: fx.GraphModule, report: GraphReport, grouping: bool = True,
         sparse_dropout: bool = True, checks: MergeChecks | None = None,
         hold: bool = False) -> list[Found]:
    """Every site of `gm` and of its higher-order-op bodies, grouped into planning units; the
    skipped ones (with reasons) and the LoRA-like modules no site covers go to `report`.
    `sparse_dropout`: whether dropout branches may be grouped (their plans draw their own
    dropped positions); `checks`: the merge check each 16-bit site gets from its own W; `hold`:
    whether sites whose W, A and B it holds may keep GEMM stacks across steps (stacks.py)."""
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
        if checks is not None:
            matches = checks.check(matches, part)
            if hold:
                matches = checks.hold(matches, part)
        found.append(Found(part, group_sites(matches, sparse_dropout, grouping)))
    return found


def decide(
    found: list[Found], report: GraphReport, chooser: Chooser, budget: Budget | None
) -> list[Chosen]:
    """The choose stage: a decision per unit (or per member, where sharing GEMMs does not pay).
    Under a memory budget the top-level graph's sites are chosen together (budget.py), one by
    one; sites in checkpointed bodies are planned without it, since the region is recomputed
    and saves only its inputs."""
    chosen: list[Chosen] = []
    for item in found:
        chooser.measure_ahead([unit.group for unit in item.units])
        if budget is not None and not item.part.name:
            singles = [single for unit in item.units for single in unit.alone()]
            decisions, report.warnings = chooser.decide_within([u.group for u in singles],
                                                               budget)
            chosen += [Chosen(item.part, u, d) for u, d in zip(singles, decisions)]
            continue
        for unit in item.units:
            decisions = chooser.decide(unit.group, unit.n)
            if len(decisions) == 1:
                chosen.append(Chosen(item.part, unit, decisions[0]))
            else:  # the members planned one by one
                chosen += [Chosen(item.part, u, d) for u, d in zip(unit.alone(), decisions)]
    report.decisions = [c.decision for c in chosen]
    return chosen


def rewrite(chosen: list[Chosen]) -> list[HeldStack]:
    """Replace each chosen unit by its planned call, in the graph part it was found in; each
    persistent stack a plan reads becomes a buffer of that graph module (held sites are
    top-level), filled from the real tensors. Returns the stacks, for the refresh."""
    modules: dict[int, fx.GraphModule] = {}
    orders: dict[int, dict[fx.Node, int]] = {}
    counters = itertools.count()
    replaced: dict[fx.Node, fx.Node] = {}  # a site's result → its planned call's
    held: list[HeldStack] = []
    for item in chosen:
        name = f"runlora_{item.part.name + '_' if item.part.name else ''}{next(counters)}"
        planned = UnitCall(name, item.unit.group, item.decision.chosen.plan)
        graph = item.part.module.graph
        if id(graph) not in orders:  # the order before its first rewrite holds for its sites
            orders[id(graph)] = node_order(graph)
        attributes = {}
        for k, stack in enumerate(planned.program.stacks):
            one = HeldStack.build(stack, item.held, static_scales(item.unit.group))
            attributes[stack.name] = f"{name}_stack{k}"
            hold_buffer(item.part.module, attributes[stack.name], one.buffer)
            held.append(one)
        rewrite_unit(graph, item.unit, planned, replaced, orders[id(graph)], attributes)
        modules[id(item.part.module)] = item.part.module
    for module in modules.values():
        module.graph.lint()
        module.recompile()
    return held


def static_scales(unit: SiteGroup) -> tuple[float, ...]:
    """The unit's scales by index where static (a persistent stack is scaled by those only)."""
    return tuple(a.scale if a.scale is not None else math.nan
                 for site in unit.members for a in site.adapters)


def compile_graph(
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


def find_and_decide(gm: fx.GraphModule, report: GraphReport, options: Options, chooser: Chooser,
                    example_inputs: Sequence[Any] = ()) -> list[Chosen]:
    """find then choose, into `report`: what the backend would rewrite (explain() stops here).
    `example_inputs` are the real tensors of gm's inputs, whose W's the merge check reads."""
    checks = MergeChecks.of(gm, example_inputs, options.rounding)
    # a held stack keeps a W-sized copy: only a memory budget says how much memory may buy
    # speed (without one, no plan keeps more than eager PEFT saves, and a stack copies W as
    # a cat each step, as it always has)
    found = find(gm, report, grouping=options.fusions and options.memory_budget is None,
                 sparse_dropout=chooser.sparse_dropout, checks=checks,
                 hold=options.memory_budget is not None)
    report.stages.append("find")
    chosen = decide(found, report, chooser, options.memory_budget)
    report.stages.append("choose")
    chosen = [replace(c, weights=tuple((m.site, w) for m in c.unit.matches
                                       for w in checks.read.get(m.root, ())),
                      held=held_operands(c.unit, checks)) for c in chosen]
    report.stack_bytes = sum(s.meta[1].itemsize * math.prod(s.meta[0]) for c in chosen
                             for s in program_for(c.decision.chosen.plan, c.unit.group).stacks)
    return chosen


def held_operands(unit: MatchedUnit, checks: MergeChecks
                  ) -> dict[str, tuple[int | None, bool, torch.Tensor]]:
    """The real tensor behind each W, A, B operand of the unit's held sites (Chosen.held)."""
    found = {}
    for op in ops.operands(unit.group):
        match = unit.matches[op.member]
        source = checks.held.get(match.root, {}).get((op.role, op.adapter))
        if source is not None:
            found[op.name] = (source.index, (op.role, op.adapter) in match.transposed,
                              source.tensor)
    return found


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
        # reads RUNLORA_DEBUG_DIR now, not at import
        self.debug = DebugOutput(self.options.debug_dir, self.options.criterion)
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
            chosen = find_and_decide(work, report, self.options, self.chooser, example_inputs)
            graph_debug = self.debug.start(report, work)  # log lines; sites.json, report.md
            held = rewrite(chosen)
            report.stages.append("rewrite")
            graph_debug.rewritten(work)
            compiled = compile_graph(work, example_inputs, self.options, self.mode, report)
            report.stages += ["tag", "compile"]
            # AOTAutograd passes the module's buffers (the stacks) before the graph's inputs
            report.parameter_inputs = (True,) * len(held) + report.parameter_inputs
            compiled = guard(refresh(compiled, held), watched_weights(chosen),
                             self.options.rounding, report)
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
        return compile_graph(gm, example_inputs, self.options, self.mode, report, tag=False)


def runlora(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """Entry point of `torch.compile(model, backend="runlora", options=...)`."""
    return Backend(options, mode)(gm, example_inputs)
