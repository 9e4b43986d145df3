"""What the backend decided for each Dynamo graph, as plain JSON data.

One document per compiled graph is written as `sites.json`; `report.md`, `print(explain(...))`
and `python -m runlora_fx.report` all render a document (render.py), so they always agree.
A document may hold several graphs (explain() on a model with graph breaks); every site and
skipped record names its graph by Dynamo's compile id (as in TORCH_LOGS, e.g. "0/0").

A document also carries the compiled model's accounting of its LoRA modules ("coverage": those
that ran outside every compiled graph, and why; coverage.py), which the "k of n LoRA modules"
line counts.

Costs are those the decisions carry (counted by `cost.cost_of`) for the LoRA linears alone (base
matmul included), not the whole graph. "before" is the order eager PEFT computes
(`Decision.reference`), "after" the chosen plans. Nothing here plans or costs: a document only
serialises the decisions and the live `GraphReport`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from runlora_fx.choice.criteria import Candidate, Decision
from runlora_fx.ir.site import LoraSite, SkippedSite, dtype_name
from runlora_fx.report.graph_report import GraphReport

SCHEMA_VERSION = 2
# LoraSite's dtype fields → the keys schema 2 writes them under
DTYPE_KEYS = {"dtype": "dtype", "base_dtype": "compute_dtype", "weight_dtype": "weight_dtype",
              "adapter_dtype": "adapter_dtype", "lora_dtype": "branch_dtype",
              "result_dtype": "out_dtype"}

Record = dict[str, Any]
COST_ROWS = (
    ("flops", "FLOPs"), ("bytes_moved", "bytes moved"), ("saved_bytes", "saved for backward")
)


# ---- records -----------------------------------------------------------------------------------


def plan_record(candidate: Candidate) -> Record:
    """A plan's choices (enum names, None where the site makes them irrelevant), its counted
    cost and, under "roofline" or "time", its predicted or measured fwd+bwd seconds."""
    plan = candidate.plan
    choices = {f.name: _enum_name(getattr(plan, f.name)) for f in dataclasses.fields(plan)}
    record = {"describe": plan.describe(), "plan": choices,
              "cost": dataclasses.asdict(candidate.cost)}
    if candidate.seconds is not None:
        record["seconds"] = candidate.seconds
    return record


def _enum_name(value: Any) -> str | bool | None:
    return value if value is None or isinstance(value, bool) else value.name


def site_fields(site: LoraSite) -> Record:
    """Shapes and flags of a site: N (the hint when symbolic), n_symbolic, d_in, d_out, adapters
    (r, dropout_p, scale, requires-grad flags each), dtypes (x as stored, and those that differ:
    the base product's, W's, the adapters', the LoRA products', the result's), the weight layout,
    the base (a linear, or an opaque quantized op), bias and training flags."""
    stated = site.stated_dtypes()
    record = {DTYPE_KEYS.get(key, key): dtype_name(stated[key]) if key in DTYPE_KEYS else value
              for key, value in dataclasses.asdict(site).items()
              if key not in DTYPE_KEYS or key in stated}
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
    cap = decision.memory_cap
    record = {
        "graph": graph,
        **unit_fields(decision),
        "criterion": decision.criterion,
        "chosen": plan_record(decision.chosen),
        "reference": plan_record(decision.reference),
        "candidates": [
            {
                **plan_record(c),
                "chosen": c == decision.chosen,
                "over_memory_cap": cap is not None and c.cost.kept_bytes > cap,
            }
            for c in decision.candidates
        ],
        "note": decision.note,
    }
    if decision.unit.n_symbolic is not None:
        assert decision.affine is not None, "a decision at a symbolic N carries its cost in N"
        record["symbolic"] = {
            "n": decision.unit.n_symbolic,
            "chosen_for_n": list(decision.n_range) if decision.n_range else None,
            "chosen_cost": decision.affine.describe("N"),
        }
    return record


def skipped_record(skipped: SkippedSite, graph: str) -> Record:
    return {"graph": graph, **dataclasses.asdict(skipped)}


def percent_change(before: int, after: int) -> float | None:
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
        "change_pct": {key: percent_change(before[key], after[key]) for key, _ in COST_ROWS},
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
                   "lora_modules": None if coverage is None else coverage["lora_modules"],
                   # held across steps, not per step: copies of frozen W's (stacks.py)
                   "stack_bytes": sum(report.stack_bytes for _, report in reports)},
    }


def graph_name(report: GraphReport) -> str:
    """The compile id when Dynamo is compiling, else the backend's own graph counter."""
    return compile_id() or str(report.graph_id)
