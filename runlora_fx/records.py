"""What the backend decided for each Dynamo graph, as plain JSON data, and the table made of it.

One document per compiled graph is written as `sites.json`; `report.md`, `print(explain(...))`
and `python -m runlora_fx.report` all render a document with `render()`, so they always agree.
A document may hold several graphs (explain() on a model with graph breaks); every site and
skipped record names its graph by Dynamo's compile id (as in TORCH_LOGS, e.g. "0/0").

A document also carries the compiled model's accounting of its LoRA modules ("coverage": those
that ran outside every compiled graph, and why; coverage.py), which the "k of n LoRA modules"
line counts.

Costs are those of `cost.cost_of` for the LoRA linears alone (base matmul included), not the
whole graph. "before" is the order eager PEFT computes (`plans.reference_plan`), "after" the
chosen plans.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from runlora_fx.choose import Decision
from runlora_fx.cost import Cost, cost_of
from runlora_fx.dynamic import affine_cost, describe_affine
from runlora_fx.outside import Outside
from runlora_fx.plans import Plan, reference_plan
from runlora_fx.site import LoraSite, SkippedSite

SCHEMA_VERSION = 2


@dataclass
class GraphReport:
    """What happened to one compiled graph; the partitioned graphs arrive as they compile.

    `stages` lists the backend's stages (find, choose, rewrite, tag, compile) as they finished;
    `failure` names the stage and exception when a stage of runlora's own raised and the graph
    was compiled as plain torch.compile would compile it. `lora_modules` counts the compiled
    model's LoRA modules (None when the model was not found); `outside` is the model's
    accounting of those no compiled graph covered, shared by all its reports once settled
    (coverage.py)."""

    graph_id: int
    decisions: list[Decision] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. an infeasible memory budget
    lora_modules: int | None = None  # the compiled model's LoRA-like modules, all its graphs
    outside: Outside | None = None
    stages: list[str] = field(default_factory=list)
    failure: str | None = None
    parameter_inputs: tuple[bool, ...] = ()  # per graph input: is it an nn.Parameter
    # re-checks of a merged site's W that changed after compiling (weight_guard.py)
    merge_rechecks: list[str] = field(default_factory=list)
    forward: fx.GraphModule | None = None
    backward: fx.GraphModule | None = None
    # called as f("forward" | "backward", gm) when a partitioned graph arrives (the debug dump)
    on_partition: list[Callable[[str, fx.GraphModule], None]] = field(
        default_factory=list, repr=False, compare=False
    )
    # called as f(outside) when the model's accounting is settled (the debug dump)
    on_outside: list[Callable[[Outside], None]] = field(
        default_factory=list, repr=False, compare=False
    )

    @classmethod
    def for_inputs(cls, graph_id: int, example_inputs: Sequence[Any]) -> GraphReport:
        """A fresh report; parameters among the inputs are told apart for the saved-set checks."""
        return cls(
            graph_id=graph_id,
            parameter_inputs=tuple(isinstance(t, torch.nn.Parameter) for t in example_inputs),
        )

    @property
    def sites_rewritten(self) -> int:
        return sum(len(d.sites) for d in self.decisions)

    def settle(self, outside: Outside) -> None:
        self.outside = outside
        for listener in self.on_outside:
            listener(outside)

Record = dict[str, Any]
COST_ROWS = (
    ("flops", "FLOPs"), ("bytes_moved", "bytes moved"), ("saved_bytes", "saved for backward")
)


# ---- records -----------------------------------------------------------------------------------


def plan_record(plan: Plan, cost: Cost, seconds: float | None = None) -> Record:
    """A plan's choices (enum names, None where the site makes them irrelevant), its counted
    cost and, under "roofline" or "time", its predicted or measured fwd+bwd seconds."""
    choices = {f.name: _enum_name(getattr(plan, f.name)) for f in dataclasses.fields(plan)}
    record = {"describe": plan.describe(), "plan": choices, "cost": dataclasses.asdict(cost)}
    if seconds is not None:
        record["seconds"] = seconds
    return record


def _enum_name(value: Any) -> str | bool | None:
    return value if value is None or isinstance(value, bool) else value.name


def _dtype(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def site_fields(site: LoraSite) -> Record:
    """Shapes and flags of a site: N (the hint when symbolic), n_symbolic, d_in, d_out, adapters
    (r, dropout_p, scale, requires-grad flags each), dtypes (x as stored, and those that differ:
    the base product's, W's, the adapters', the LoRA products', the result's), the weight layout,
    the base (a linear, or an opaque quantized op), bias and training flags."""
    record = dataclasses.asdict(site)
    for key in ("dtype", "compute_dtype", "weight_dtype", "adapter_dtype", "branch_dtype",
                "out_dtype"):
        record[key] = _dtype(getattr(site, key))
        if record[key] is None and key != "dtype":
            del record[key]
    record["weight_layout"] = site.weight_layout.name
    record["base"] = site.base.name
    if site.base_op is None:
        del record["base_op"]
    if site.merge_check is None:  # not a 16-bit site whose merging depends on W
        del record["merge_check"]
    return record


def unit_fields(decision: Decision) -> Record:
    """A single site's fields; for a group, its members' fields under "members" and the shared
    ones (N, d_in; d_out and adapters summed over members) at the top."""
    sites = decision.sites
    if len(sites) == 1:
        return site_fields(sites[0])
    first = site_fields(sites[0])
    return {
        **first,
        "path": decision.unit.path,
        "d_out": sum(s.d_out for s in sites),
        "adapters": [a for s in sites for a in site_fields(s)["adapters"]],
        "members": [site_fields(s) for s in sites],
    }


def site_record(decision: Decision, graph: str) -> Record:
    unit = decision.unit
    reference = reference_plan(unit)
    cap = decision.memory_cap
    record = {
        "graph": graph,
        **unit_fields(decision),
        "criterion": decision.criterion,
        "chosen": plan_record(decision.chosen.plan, decision.chosen.cost, decision.chosen.seconds),
        "reference": plan_record(reference, cost_of(reference, unit)),
        "candidates": [
            {
                **plan_record(c.plan, c.cost, c.seconds),
                "chosen": c == decision.chosen,
                "over_memory_cap": cap is not None and c.cost.saved_bytes > cap,
            }
            for c in decision.candidates
        ],
        "note": decision.note,
    }
    site = decision.site
    if site.n_symbolic is not None:
        record["symbolic"] = {
            "n": site.n_symbolic,
            "chosen_for_n": list(decision.n_range) if decision.n_range else None,
            "chosen_cost": describe_affine(affine_cost(decision.chosen.plan, unit), "N"),
        }
    return record


def skipped_record(skipped: SkippedSite, graph: str) -> Record:
    return {"graph": graph, **dataclasses.asdict(skipped)}


def _percent(before: int, after: int) -> float | None:
    return None if before == 0 else round(100.0 * (after - before) / before, 2)


def totals(sites: Sequence[Record], skipped: Sequence[Record]) -> Record:
    """Sums of the reference ("before") and chosen ("after") costs over the rewritten sites."""
    before = {key: sum(s["reference"]["cost"][key] for s in sites) for key, _ in COST_ROWS}
    after = {key: sum(s["chosen"]["cost"][key] for s in sites) for key, _ in COST_ROWS}
    rewritten = sum(len(s.get("members", [s])) for s in sites)
    return {
        "sites_found": rewritten + len(skipped),
        "sites_rewritten": rewritten,
        "sites_skipped": len(skipped),
        "groups": sum("members" in s for s in sites),
        "before": before,
        "after": after,
        "change_pct": {key: _percent(before[key], after[key]) for key, _ in COST_ROWS},
    }


def compile_id() -> str | None:
    """Dynamo's id of the graph being compiled ("frame/recompile", as TORCH_LOGS prints it)."""
    current = torch._guards.CompileContext.current_compile_id()
    return None if current is None else str(current)


def _versions() -> Record:
    try:
        ours = importlib.metadata.version("runlora-fx")
    except importlib.metadata.PackageNotFoundError:
        ours = None
    return {"runlora_fx": ours, "torch": torch.__version__}


def coverage_record(reports: Sequence[GraphReport]) -> Record | None:
    """The compiled model's accounting (coverage.py): its LoRA modules, those that ran outside
    every compiled graph and the graph breaks that explain them; "outside" is None until it is
    settled (at the first backward). None when the model was not found."""
    for report in reports:
        if report.outside is not None:
            return report.outside.record()
    counts = [r.lora_modules for r in reports if r.lora_modules is not None]
    if not counts:
        return None
    return {"lora_modules": counts[0], "outside": None, "causes": [], "warning": None}


def document(reports: Iterable[tuple[str, GraphReport]], criterion: str) -> Record:
    """The sites.json document of one or more graphs, each given as (graph name, report)."""
    graphs, sites, skipped, warnings, failures = [], [], [], [], []
    reports = list(reports)
    for graph, report in reports:
        graphs.append(graph)
        sites += [site_record(d, graph) for d in report.decisions]
        skipped += [skipped_record(s, graph) for s in report.skipped]
        warnings += [{"graph": graph, "warning": w} for w in report.warnings]
        if report.failure is not None:
            failures.append({"graph": graph, "failure": report.failure})
    coverage = coverage_record([report for _, report in reports])
    return {
        "schema_version": SCHEMA_VERSION,
        "versions": _versions(),
        "criterion": criterion,
        "graphs": graphs,
        "sites": sites,
        "skipped": skipped,
        "warnings": warnings,
        "failures": failures,
        "coverage": coverage,
        "totals": {**totals(sites, skipped),
                   "lora_modules": None if coverage is None else coverage["lora_modules"]},
    }


def graph_name(report: GraphReport) -> str:
    """The compile id when Dynamo is compiling, else the backend's own graph counter."""
    return compile_id() or str(report.graph_id)


# ---- rendering ---------------------------------------------------------------------------------


def si(value: float, unit: str = "") -> str:
    """1234567 → '1.23 M' (FLOPs)."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:g} {unit}".rstrip()


def binary(value: float) -> str:
    """1536 → '1.5 KiB' (bytes)."""
    for factor, prefix in ((2**40, "Ti"), (2**30, "Gi"), (2**20, "Mi"), (2**10, "Ki")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}B"
    return f"{value:g} B"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}%"


FORMAT = {"flops": si, "bytes_moved": binary, "saved_bytes": binary}


def _cell(site: Record, key: str) -> str:
    before, after = site["reference"]["cost"][key], site["chosen"]["cost"][key]
    return f"{FORMAT[key](after)} ({pct(_percent(before, after))})"


def _n(site: Record) -> str:
    return str(site["n"]) if site["n_symbolic"] is None else f"{site['n']} ({site['n_symbolic']})"


def _adapters(site: Record, key: str) -> str:
    return "+".join(f"{a[key]:g}" for a in site["adapters"])


def _row(cells: Iterable[object]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    return [_row(header), _row("---" for _ in header), *(_row(r) for r in rows)]


def _d_out(site: Record) -> str:
    members = site.get("members")
    return "+".join(str(m["d_out"]) for m in members) if members else str(site["d_out"])


def _site_row(i: int, site: Record) -> list[object]:
    return [
        i, site["path"], _n(site), f"{site['d_in']}→{_d_out(site)}", _adapters(site, "r"),
        _adapters(site, "dropout_p"), site["chosen"]["describe"], _cell(site, "flops"),
        _cell(site, "saved_bytes"), len(site["candidates"]),
    ]


SITE_HEADER = ("#", "site", "N", "d_in→d_out", "r", "dropout", "chosen plan", "FLOPs",
               "saved for backward", "plans")


def render(doc: Mapping[str, Any], title: str | None = None) -> str:
    """The markdown table of a sites.json document: one row per site, skipped sites, totals.
    A graph column appears when the document holds several graphs."""
    many = len(doc["graphs"]) > 1

    def with_graph(record: Record, cells: list[object]) -> list[object]:
        return [*cells[:1], record["graph"], *cells[1:]] if many else cells

    total = doc["totals"]
    lines = [
        f"## {title or 'runlora'} — graph {', '.join(doc['graphs']) or 'none'}, "
        f"criterion `{doc['criterion']}`",
        "",
        f"{total['sites_found']} LoRA sites found: {total['sites_rewritten']} rewritten, "
        f"{total['sites_skipped']} skipped{_groups(total)}. Costs are the LoRA linears' (base "
        "matmul included), with the change against the order eager PEFT runs.",
    ]
    coverage = doc.get("coverage") or {}
    if coverage.get("warning"):
        lines += [f"\n**Warning:** {coverage['warning']}", "",
                  "Outside every compiled graph: "
                  + ", ".join(f"`{p}`" for p in coverage["outside"]) + "."]
    lines += [f"\n**Warning:** {w['warning']}" for w in doc.get("warnings", [])]
    lines += [f"\n**runlora failed, plain torch.compile used:** {f['failure']}"
              for f in doc.get("failures", [])]
    notes = sorted({s["note"] for s in doc["sites"] if s.get("note")})
    lines += ["", *(f"- {note}" for note in notes)] if notes else []
    if doc["sites"]:
        header = with_graph({"graph": "graph"}, list(SITE_HEADER))
        rows = [with_graph(s, _site_row(i, s)) for i, s in enumerate(doc["sites"])]
        lines += ["", *_table(header, rows)]
    lines += _merge_checks(doc["sites"])
    if doc["skipped"]:
        header = with_graph({"graph": "graph"}, ["#", "site", "reason"])
        rows = [with_graph(s, [i, s["path"], s["reason"]]) for i, s in enumerate(doc["skipped"])]
        lines += ["", "Left to plain Inductor:", "", *_table(header, rows)]
    totals_rows = [
        [label, FORMAT[key](total["before"][key]), FORMAT[key](total["after"][key]),
         pct(total["change_pct"][key])]
        for key, label in COST_ROWS
    ]
    lines += ["", "Totals over the rewritten sites:", ""]
    lines += _table(["", "PEFT order", "chosen", "change"], totals_rows)
    return "\n".join(lines) + "\n"


def _merge_checks(sites: Sequence[Record]) -> list[str]:
    """How many 16-bit sites the merge check of their own W let merge, and why it refused the
    others (merge_check.py)."""
    checked = [m for s in sites for m in s.get("members", [s]) if "merge_check" in m]
    if not checked:
        return []
    refused = [m for m in checked if not m["merge_check"]["legal"]]
    rounding = sorted({m["merge_check"]["rounding"] for m in checked})
    lines = ["", f"Merge check of the frozen W (merge_rounding {', '.join(rounding)}): "
             f"{len(checked) - len(refused)} of {len(checked)} 16-bit sites may merge."]
    if refused:
        rows = [[m["path"], m["merge_check"]["reason"]] for m in refused]
        lines += ["", *_table(["site", "why merging is refused"], rows)]
    return lines


def summary_line(doc: Mapping[str, Any]) -> str:
    """The one INFO line per compiled graph; n counts the model's LoRA modules, all its graphs
    (the graph's sites when they are more: hand-written sites in modules not named like LoRA)."""
    total = doc["totals"]
    change = total["change_pct"]
    modules = max(total.get("lora_modules") or 0, total["sites_found"])  # the model's, all graphs
    return (
        f"runlora graph {', '.join(doc['graphs'])}: {total['sites_rewritten']} of "
        f"{modules} LoRA modules rewritten ({total['sites_found']} LoRA sites "
        f"found, {total['sites_rewritten']} rewritten, {total['sites_skipped']} skipped; "
        f"FLOPs {pct(change['flops'])}, saved bytes {pct(change['saved_bytes'])} "
        f"vs the PEFT order, criterion {doc['criterion']}{_groups(total)})"
    )


def _groups(total: Mapping[str, Any]) -> str:
    groups = total.get("groups", 0)
    return f", {groups} group plan{'s' if groups != 1 else ''}" if groups else ""


def site_lines(doc: Mapping[str, Any]) -> list[str]:
    """The DEBUG lines: one per site and per skipped site."""
    lines = [
        f"runlora graph {s['graph']} site {s['path']}: N={_n(s)} {s['d_in']}→{s['d_out']} "
        f"r={_adapters(s, 'r')} p={_adapters(s, 'dropout_p')}: {s['chosen']['describe']} "
        f"(FLOPs {_cell(s, 'flops')}, saved {_cell(s, 'saved_bytes')}, "
        f"{len(s['candidates'])} candidates)"
        for s in doc["sites"]
    ]
    lines += [
        f"runlora graph {s['graph']} skipped {s['path']}: {s['reason']}" for s in doc["skipped"]
    ]
    return lines

