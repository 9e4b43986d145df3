"""The shape matrix's summary: each point's model_exp CSV read back into one table (Markdown, CSV).

The ratios, their quartiles, overhead recovered, compile seconds and saved bytes are model_exp's
own columns (experiments/bench_report.py), one summary row per point and runlora variant. One
figure is added: the FLOP ceiling, the floor's ratio grown by the LoRA GEMMs no plan can skip
(`Point.lora_flops`, as a share of the floor step's `Point.step_flops`, at the floor's FLOP rate).
Below it no rewrite can go; where thin r-wide GEMMs run slower than the layer's, the true ceiling
is higher still, so the share of the reachable gap recovered is an underestimate.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shapes_exp import Outcome

SUMMARY_COLUMNS = (
    "point", "shape", "layers", "n_batch", "seq_len", "tokens", "r", "p", "dtype", "variant",
    "status", "rounds", "floor_ratio", "ratio", "ratio_p25", "ratio_p75",
    "overhead_recovered_pct", "lora_flops_pct", "ceiling_ratio", "reachable_recovered_pct",
    "compile_s_peft_inductor", "compile_s_variant", "compile_ratio",
    "saved_mb_peft_inductor", "saved_mb_variant", "saved_mb_floor", "memory_mb_peft_inductor",
    "memory_mb_variant", "memory_kind", "limit_s", "wall_s",
)
TABLE_HEADER = (
    "| point | layers | N | r | p | variant | floor | runlora (p25–p75) | overhead recovered | "
    "LoRA FLOPs, % of floor | FLOP ceiling | reachable gap recovered | "
    "1st step (compile), s: PEFT+Ind → runlora (×) | saved for backward, MB: PEFT+Ind → "
    "runlora (floor) | rounds | note |"
)


def read_point(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _number(row: dict | None, key: str) -> float:
    if row is None or row.get(key) in (None, ""):
        return math.nan
    return float(row[key])


def summary_rows(outcome: Outcome, dtype: str) -> list[dict]:
    """One row per runlora variant of the point (one row with its status when it did not run)."""
    point = outcome.point
    common = {
        "point": point.name, "shape": point.shape.name, "layers": point.shape.layers,
        "n_batch": point.n_batch, "seq_len": point.seq_len, "tokens": point.tokens, "r": point.r,
        "p": point.p, "dtype": dtype, "status": outcome.status, "limit_s": outcome.limit_s,
        "wall_s": outcome.wall_s,
    }
    by_variant = {row["variant"]: row for row in outcome.rows or []}
    baseline, floor = by_variant.get("peft+inductor"), by_variant.get("floor")
    runloras = [row for name, row in by_variant.items() if name.startswith("runlora")]
    lora_share = point.lora_flops() / point.step_flops()
    floor_ratio = _number(floor, "ratio_vs_peft_inductor")
    ceiling = floor_ratio * (1 + lora_share)
    rows = []
    for variant in runloras or [None]:
        ratio = _number(variant, "ratio_vs_peft_inductor")
        compile_base = _number(baseline, "compile_s")
        compile_variant = _number(variant, "compile_s")
        rows.append({
            **common,
            "variant": variant["variant"] if variant else "",
            "rounds": int(baseline["rounds"]) if baseline else "",
            "floor_ratio": floor_ratio,
            "ratio": ratio,
            "ratio_p25": _number(variant, "ratio_vs_peft_inductor_p25"),
            "ratio_p75": _number(variant, "ratio_vs_peft_inductor_p75"),
            "overhead_recovered_pct": _number(variant, "overhead_recovered_pct"),
            "lora_flops_pct": 100 * lora_share,
            "ceiling_ratio": ceiling,
            "reachable_recovered_pct": (100 * (1 - ratio) / (1 - ceiling) if ceiling < 1
                                        else math.nan),
            "compile_s_peft_inductor": compile_base,
            "compile_s_variant": compile_variant,
            "compile_ratio": compile_variant / compile_base,
            "saved_mb_peft_inductor": _number(baseline, "saved_activations_mb"),
            "saved_mb_variant": _number(variant, "saved_activations_mb"),
            "saved_mb_floor": _number(floor, "saved_activations_mb"),
            "memory_mb_peft_inductor": _number(baseline, "memory_mb"),
            "memory_mb_variant": _number(variant, "memory_mb"),
            "memory_kind": baseline["memory_kind"] if baseline else "",
        })
    return rows


def _f(value: float, spec: str) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else format(value, spec)


def _note(row: dict, outcome: Outcome, variants: Sequence[str]) -> str:
    if row["status"] != "ok":
        return row["status"]
    ran = {r["variant"] for r in outcome.rows or []}
    missing = [v for v in variants if v not in ran]
    return f"{' '.join(missing)} skipped (time limit)" if missing else ""


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}%"


def markdown_line(row: dict, outcome: Outcome, variants: Sequence[str]) -> str:
    variant = row["variant"].removeprefix("runlora:") or "-"
    ratio = (f"**{_f(row['ratio'], '.3f')}** ({_f(row['ratio_p25'], '.3f')}–"
             f"{_f(row['ratio_p75'], '.3f')})") if not math.isnan(row["ratio"]) else "-"
    compile_s = (f"{_f(row['compile_s_peft_inductor'], '.1f')} → "
                 f"{_f(row['compile_s_variant'], '.1f')} ({_f(row['compile_ratio'], '.2f')}×)")
    saved = (f"{_f(row['saved_mb_peft_inductor'], '.2f')} → {_f(row['saved_mb_variant'], '.2f')} "
             f"({_f(row['saved_mb_floor'], '.2f')})")
    cells = [row["point"], row["layers"], f"{row['n_batch']}×{row['seq_len']}", row["r"],
             f"{row['p']:g}", variant, _f(row["floor_ratio"], ".3f"), ratio,
             _percent(row["overhead_recovered_pct"]), f"{row['lora_flops_pct']:.1f}",
             _f(row["ceiling_ratio"], ".3f"), _percent(row["reachable_recovered_pct"]),
             compile_s, saved,
             row["rounds"] or "-", _note(row, outcome, variants)]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_summary(out: Path, header: Sequence[str], outcomes: Sequence[Outcome], dtype: str,
                  variants: Sequence[str]) -> None:
    """out/shapes_summary.md (header, table, how to read it) and out/shapes_summary.csv.

    `variants`: the variants every point should have run (model_exp's expanded --variants)."""
    pairs = [(row, o) for o in outcomes for row in summary_rows(o, dtype)]
    rule = "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"
    legend = (
        "Ratios are paired, to PEFT + Inductor (plain `torch.compile`) at the same point: per "
        "round variant / PEFT+Inductor, median over the rounds (p25–p75); lower is faster. "
        "Overhead recovered = (PEFT+Ind − runlora) / (PEFT+Ind − floor) from those ratios. "
        "FLOP ceiling = floor × (1 + the LoRA GEMMs' FLOPs no plan can skip, 6·N·r·(d_in + d_out) "
        "a site, over the floor step's GEMM FLOPs): no rewrite gets below it (at the floor's "
        "FLOP rate; thin r-wide GEMMs are slower, so the true ceiling is higher). Reachable gap "
        "recovered = (PEFT+Ind − runlora) / (PEFT+Ind − FLOP ceiling). "
        "1st step = compile + one step, model_exp's *Compile + 1st step*. Saved for backward: "
        "bytes saved for backward per step, weights excluded. N = n_batch × seq_len tokens."
    )
    body = [markdown_line(row, outcome, variants) for row, outcome in pairs]
    lines = [*header, "", TABLE_HEADER, rule, *body, "", legend, ""]
    (out / "shapes_summary.md").write_text("\n".join(lines))
    with (out / "shapes_summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row, _ in pairs:
            writer.writerow(row)
