"""Turning measured runners into the result table: rows, Markdown, CSV and a bar chart.

Speedups are paired ratios (per round variant / baseline, median over rounds, docs/benchmarks.md);
"LoRA overhead recovered" = (PEFT+Inductor − variant) / (PEFT+Inductor − floor), computed from
the paired ratios against PEFT+Inductor: (1 − ρ_variant) / (1 − ρ_floor).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench_lib import Runner, paired_ratio, quantile

MB = 2**20

TABLE_COLUMNS = (
    ("label", "Implementation"),
    ("median_ms", "F-B loop, ms (median)"),
    ("spread_ms", "Spread, ms (p25–p75)"),
    ("memory_mb", "Memory for F-B loop, MB"),
    ("speedup_vs_peft_pct", "Speedup vs PEFT, %"),
    ("speedup_vs_peft_inductor_pct", "Speedup vs PEFT+Inductor, %"),
    ("ratio_spread", "Paired ratio vs PEFT+Inductor (p25–p75)"),
    ("memory_saved_mb", "Memory saved, MB"),
    ("overhead_recovered_pct", "LoRA overhead recovered, %"),
    ("compile_s", "Compile + 1st step, s"),
)

CSV_COLUMNS = (
    "variant", "label", "median_ms", "p25_ms", "p75_ms", "min_ms", "mean_ms", "rounds",
    "steps_per_round", "compile_s", "first_loss", "memory_mb", "memory_kind",
    "saved_activations_mb", "profiler_peak_mb", "cuda_peak_mb", "memory_saved_mb",
    "ratio_vs_peft", "speedup_vs_peft_pct", "ratio_vs_peft_inductor",
    "speedup_vs_peft_inductor_pct", "ratio_vs_peft_inductor_p25", "ratio_vs_peft_inductor_p75",
    "overhead_recovered_pct", "sites_rewritten", "sites_skipped",
)


def _mb(nbytes: int | None) -> float:
    return float("nan") if nbytes is None else nbytes / MB


def memory_kind(device_type: str) -> str:
    if device_type == "cuda":
        return "peak allocated during the F-B loop, above the allocation before it"
    return "saved-for-backward activations per step (weights excluded)"


def _memory(runner: Runner, device_type: str) -> int | None:
    return runner.cuda_peak if device_type == "cuda" else runner.saved_bytes


def _ratio_to(runner: Runner, by_name: dict[str, Runner], baseline: str) -> float:
    base = by_name.get(baseline)
    return paired_ratio(runner.times, base.times) if base is not None else float("nan")


def _ratio_quartiles(runner: Runner, by_name: dict[str, Runner]) -> tuple[float, float]:
    """p25 and p75 over rounds of the per-round ratio to PEFT+Inductor (the ratio's spread)."""
    base = by_name.get("peft+inductor")
    if base is None:
        return float("nan"), float("nan")
    ratios = [t / b for t, b in zip(runner.times, base.times)]
    return quantile(ratios, 0.25), quantile(ratios, 0.75)


def rows_for(runners: Sequence[Runner], device_type: str) -> list[dict]:
    """One row per runner: time statistics, paired ratios, memory, and what runlora rewrote."""
    by_name = {r.variant.name: r for r in runners}
    floor = by_name.get("floor")
    floor_ratio = _ratio_to(floor, by_name, "peft+inductor") if floor else float("nan")
    peft = by_name.get("peft")
    rows = []
    for runner in runners:
        times_ms = [t * 1e3 for t in runner.times]
        memory = _memory(runner, device_type)
        peft_memory = _memory(peft, device_type) if peft else None
        vs_peft = _ratio_to(runner, by_name, "peft")
        vs_inductor = _ratio_to(runner, by_name, "peft+inductor")
        recovered = float("nan")
        if runner.variant.name not in ("floor", "peft+inductor") and floor_ratio < 1:
            recovered = (1 - vs_inductor) / (1 - floor_ratio) * 100
        ratio_p25, ratio_p75 = _ratio_quartiles(runner, by_name)
        reports = runner.backend.reports if runner.backend else []
        rows.append({
            "variant": runner.variant.name,
            "label": runner.variant.label,
            "median_ms": statistics.median(times_ms),
            "p25_ms": quantile(times_ms, 0.25),
            "p75_ms": quantile(times_ms, 0.75),
            "min_ms": min(times_ms),
            "mean_ms": statistics.fmean(times_ms),
            "rounds": len(times_ms),
            "steps_per_round": runner.reps,
            "compile_s": runner.compile_s,
            "first_loss": runner.first_loss,
            "memory_mb": _mb(memory),
            "memory_kind": memory_kind(device_type),
            "saved_activations_mb": _mb(runner.saved_bytes),
            "profiler_peak_mb": _mb(runner.profiler_peak),
            "cuda_peak_mb": _mb(runner.cuda_peak),
            "memory_saved_mb": _mb(peft_memory) - _mb(memory),
            "ratio_vs_peft": vs_peft,
            "speedup_vs_peft_pct": (1 - vs_peft) * 100,
            "ratio_vs_peft_inductor": vs_inductor,
            "speedup_vs_peft_inductor_pct": (1 - vs_inductor) * 100,
            "ratio_vs_peft_inductor_p25": ratio_p25,
            "ratio_vs_peft_inductor_p75": ratio_p75,
            "overhead_recovered_pct": recovered,
            "sites_rewritten": sum(r.sites_rewritten for r in reports) if runner.backend else "",
            "sites_skipped": sum(len(r.skipped) for r in reports) if runner.backend else "",
        })
    return rows


def _cell(row: dict, key: str) -> str:
    if key == "spread_ms":
        return f"{row['p25_ms']:.2f}–{row['p75_ms']:.2f}"
    if key == "ratio_spread":
        if math.isnan(row["ratio_vs_peft_inductor"]):
            return "-"
        return (f"{row['ratio_vs_peft_inductor']:.3f} "
                f"({row['ratio_vs_peft_inductor_p25']:.3f}–{row['ratio_vs_peft_inductor_p75']:.3f})")
    value = row[key]
    if isinstance(value, str):
        return value
    if math.isnan(value):
        return "-"
    if key in ("speedup_vs_peft_pct", "speedup_vs_peft_inductor_pct", "overhead_recovered_pct"):
        return f"{value:+.1f}"
    return f"{value:.2f}" if key != "compile_s" else f"{value:.1f}"


def markdown_table(rows: Sequence[dict]) -> str:
    header = "| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join(" :---: " for _ in TABLE_COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(row, key) for key, _ in TABLE_COLUMNS) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def plan_summary(runners: Sequence[Runner]) -> list[str]:
    """One line per runlora variant: sites rewritten, plans chosen, sites skipped and why."""
    lines = []
    for runner in runners:
        if runner.backend is None:
            continue
        decisions = [d for report in runner.backend.reports for d in report.decisions]
        skipped = [s for report in runner.backend.reports for s in report.skipped]
        plans = Counter(
            (f"{len(d.sites)} sites as one: " if len(d.sites) > 1 else "") + d.chosen.plan.describe()
            for d in decisions
        )
        chosen = "; ".join(f"{n}× {plan}" for plan, n in plans.most_common()) or "none"
        rewritten = sum(len(d.sites) for d in decisions)
        lines.append(f"- {runner.variant.label}: {rewritten} sites rewritten — {chosen}")
        for why in Counter(s.reason for s in skipped).most_common():
            lines.append(f"  - skipped {why[1]}×: {why[0]}")
    return lines


def markdown_report(title: str, rows: Sequence[dict], notes: Sequence[str]) -> str:
    return "\n".join([f"### {title}", "", markdown_table(rows), "", *notes, ""])


def write_csv(path: Path, rows: Sequence[dict], run: dict) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*CSV_COLUMNS, *run])
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: row[k] for k in CSV_COLUMNS}, **run})


def write_chart(path: Path, title: str, rows: Sequence[dict]) -> None:
    """Two bar panels: median step time with its p25–p75 spread, and memory per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["label"] for row in rows]
    medians = [row["median_ms"] for row in rows]
    errors = [
        [row["median_ms"] - row["p25_ms"] for row in rows],
        [row["p75_ms"] - row["median_ms"] for row in rows],
    ]
    memory = [0.0 if math.isnan(row["memory_mb"]) else row["memory_mb"] for row in rows]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_time.bar(labels, medians, yerr=errors, capsize=4, color="tab:blue")
    ax_time.set_ylabel("F-B loop, ms (median, p25–p75)")
    ax_mem.bar(labels, memory, color="tab:orange")
    ax_mem.set_ylabel("Memory for F-B loop, MB")
    for axis in (ax_time, ax_mem):
        axis.tick_params(axis="x", labelrotation=20)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
