"""A sites.json document (document.py) as people read it: the markdown table of `report.md` and
`print(explain(...))`, the INFO line per compiled graph and the DEBUG line per site."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from runlora_fx.report.document import COST_ROWS, Record, percent_change


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
    return f"{FORMAT[key](after)} ({pct(percent_change(before, after))})"


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
        f"vs the PEFT order, criterion {doc['criterion']}{_groups(total)}{_stacks(total)})"
    )


def _stacks(total: Mapping[str, Any]) -> str:
    held = total.get("stack_bytes", 0)
    return f", persistent stacks {held / 2**20:.1f} MiB" if held else ""


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

