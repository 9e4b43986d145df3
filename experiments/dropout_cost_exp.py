"""What LoRA dropout costs runlora: its step at each --ps against its own step at p 0, through
the frozen floor, in one process (issue "Dropout that costs nothing").

One base model; runlora compiled once per p (the same weights, adapters and batch), and the
floor (the base with no adapters, docs/benchmarks.md). Rounds run every variant in turn, the
order rotated each round; per round each runlora step is divided by that round's floor step.
The dropout's extra cost at p is the median over rounds of (step_p − step_0)/floor — a paired
difference, so the VM's slow drifts cancel — with its standard error (1.2533·sd/√rounds).

    python experiments/dropout_cost_exp.py -m configs/llama_20m.json --n_batch 4 --seq_len 256 -r 8
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_lib

from bench_lib import (  # noqa: E402
    LoraSpec,
    Runner,
    Variant,
    add_lora,
    build_base,
    compile_variant,
    fb_step,
    interleaved_rounds,
    make_batch,
    make_floor,
    quantile,
    state_storages,
    steps_per_round,
    warm_up,
)

ALL_TARGETS = ("q_proj", "v_proj", "k_proj", "o_proj", "up_proj", "down_proj", "gate_proj")
CPU = torch.device("cpu")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("-m", "--model_config", type=Path, required=True, help="a transformers config json")
    add("--layers", type=int, default=0, help="decoder layers (0: the config's)")
    add("--n_batch", type=int, default=4)
    add("--seq_len", type=int, default=256)
    add("-r", "--rank", type=int, default=8)
    add("--ps", default="0,0.05,0.1", help="lora_dropout values, the first one 0")
    add("--criterion", default="priced", help="runlora's criterion")
    add("--min_rounds", type=int, default=20)
    add("--min_run_time", type=float, default=120.0, help="seconds of rounds at least")
    add("-o", "--out", type=Path, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    args.p_values = [float(p) for p in args.ps.split(",")]
    if args.p_values[0] != 0.0 or any(not 0.0 <= p < 1.0 for p in args.p_values):
        parser.error(f"--ps {args.ps!r}: give 0 first, then dropout values in [0, 1)")
    return args


def standard_error_of_median(values: list[float]) -> float:
    return 1.2533 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def summarise(runners: dict[str, Runner], p_values: list[float]) -> list[dict]:
    floor = runners["floor"].times
    base = runners[f"p{p_values[0]}"].times
    rows = []
    for p in p_values:
        times = runners[f"p{p}"].times
        ratio = [t / f for t, f in zip(times, floor)]
        extra = [(t - b) / f for t, b, f in zip(times, base, floor)]
        rows.append({"p": p, "runlora_over_floor": statistics.median(ratio),
                     "ratio_p25": quantile(ratio, 0.25), "ratio_p75": quantile(ratio, 0.75),
                     "extra_of_floor": statistics.median(extra),
                     "extra_se": standard_error_of_median(extra),
                     "step_ms": 1e3 * statistics.median(times),
                     "compile_s": runners[f"p{p}"].compile_s})
    return rows


def markdown(args: argparse.Namespace, rows: list[dict], rounds: int, floor_ms: float) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown CPU") if Path(
        "/proc/cpuinfo").exists() else "unknown CPU"
    lines = [f"# Dropout's cost: {args.model_config.name}, b {args.n_batch} s {args.seq_len} "
             f"r {args.rank}, runlora:{args.criterion}, fp32",
             "", f"{cpu}, {torch.get_num_threads()} threads, {rounds} rounds, floor step "
             f"{floor_ms:.1f} ms", "",
             "| p | runlora / floor (p25–p75) | extra cost vs p 0, % of floor ± SE | step ms | "
             "compile s |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['p']:g} | {row['runlora_over_floor']:.3f} "
                     f"({row['ratio_p25']:.3f}–{row['ratio_p75']:.3f}) | "
                     f"{100 * row['extra_of_floor']:+.2f} ± {100 * row['extra_se']:.2f} | "
                     f"{row['step_ms']:.1f} | {row['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model_config)
    if args.layers:
        config.num_hidden_layers = args.layers
    base = build_base(config, torch.float32, CPU, seed=0)
    batch = make_batch(config.vocab_size, args.n_batch, args.seq_len, CPU, seed=0)
    variant = Variant(f"runlora:{args.criterion}")
    runners: dict[str, Runner] = {}
    for p in args.p_values:
        model = add_lora(base, LoraSpec(r=args.rank, alpha=16, dropout=p,
                                        target_modules=ALL_TARGETS,
                                        adapter_dtype=torch.float32), seed=0)
        compiled, backend = compile_variant(variant, model, "inductor")
        runners[f"p{p}"] = Runner(variant, fb_step(compiled, batch), state_storages(model),
                                  backend)
    floor = make_floor(base, ALL_TARGETS)
    compiled, _ = compile_variant(Variant("floor"), floor, "inductor")
    runners["floor"] = Runner(Variant("floor"), fb_step(compiled, batch), state_storages(floor))
    for name, runner in runners.items():
        warm_up(runner, CPU)
        print(f"{name}: compiled in {runner.compile_s:.1f} s, step {runner.warm_step_s:.3f} s",
              flush=True)
    reps = steps_per_round(list(runners.values()), 0.2)
    rounds = interleaved_rounds(list(runners.values()), CPU, args.min_run_time, args.min_rounds,
                                reps)
    rows = summarise(runners, args.p_values)
    text = markdown(args, rows, rounds, 1e3 * statistics.median(runners["floor"].times))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # appended, not with_suffix: a name like llama3.2-1b_N512 has a dot of its own
        args.out.with_name(args.out.name + ".md").write_text(text)
        args.out.with_name(args.out.name + ".json").write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds,
             "rows": rows, "times": {k: r.times for k, r in runners.items()}}, indent=1))


if __name__ == "__main__":
    main()
