"""The shape matrix (issue 25): LoRA training steps at real decoder-layer widths, point by point.

A point is one model_exp.py run (its variants, compile timed apart, interleaved rounds, CSV) on a
one-decoder-layer config with a real model's widths and GQA head counts and a small vocabulary, so
the logits do not dominate (configs/llama3.2_1b_1layer.json, qwen2.5_0.5b_1layer.json,
llama3_8b_1layer.json), at N = n_batch·seq_len tokens, LoRA rank r and dropout p, all 7 target
modules. One layer each, not two: only so do 18 points at ≥ 8 rounds fit in the hour the issue
allows. The summary reads every point's CSV back: the paired ratios of runlora and of the floor to
PEFT + Inductor, overhead recovered, first-step (compile) seconds and bytes saved for backward.

Each point runs in its own process. An 8B-shaped layer is four ~0.9 GB fp32 copies (base, PEFT
model, one per LoRA variant) and its compiled graphs: a process frees all of it, where an in-process
loop keeps Dynamo's and Inductor's state and the allocator's high-water mark from point to point;
a crash or an out-of-memory kill costs one point, not the matrix; and model_exp's --time_limit
counts from its own start. The price is the imports (~10 s a point).

The points share --budget: each gets a share of what is left, in proportion to its estimated
cost and never below that estimate, as model_exp's --time_limit; its timed rounds fill what the
share leaves after compiling (at least --min_rounds). A point whose estimate no longer fits in
what is left does not start; the summary lists it.

    python experiments/shapes_exp.py -o experiments/results/shapes_cpu        # ≤ 57 min, 2 cores
    python experiments/shapes_exp.py --only 'llama3.2-1b_*' --criterions flops roofline
    python experiments/shapes_exp.py --device cuda --dtype bf16 --n_batch 4 --ranks 16 \
        --min_run_time 3 --budget 240 -o bench-out/shapes_cuda
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

STARTED = time.perf_counter()  # --budget counts from here, imports and argument checks included

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # model_exp, bench_lib, criteria_exp
import model_exp  # noqa: E402
from bench_lib import parse_device  # noqa: E402
from criteria_exp import device_title  # noqa: E402
from shapes_report import read_point, write_summary  # noqa: E402

from runlora_fx.options import Options  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL_EXP = REPO / "experiments" / "model_exp.py"
CONFIGS = REPO / "configs"
SEQ_LENS = (512, 2048)
RANKS = (16, 64)
DROPOUTS = (0.0, 0.05)
VARIANTS = ("peft+inductor", "runlora", "floor")
BUDGET_S = 3420.0  # the hour the issue allows, less 3 min for a last point that runs over
# The cost estimate (seconds) that splits the budget: process start, per variant a compile (a
# part per graph and a part per decoder layer in it), and the steps a point always runs (the
# first, 2 to warm up, 1 for memory, --min_rounds) at a FLOP rate (Point.step_flops). CPU: one
# eager PEFT step of the Llama-3.2-1B and Qwen2.5-0.5B layers at 512 tokens took 44–49 GFLOP/s
# of CPU time on one thread of the project's AMD EPYC: 90 GFLOP/s for two; a compile as the tiny
# model_exp test's (~15 s a graph) plus as much per layer at real width (runlora's trace of the
# Qwen layer, eager inner: 58 s under a load of 7). CUDA: guesses for an H100/H200 in bf16.
STARTUP_S = {"cpu": 15.0, "cuda": 10.0}
COMPILE_S = {"cpu": 15.0, "cuda": 5.0}
COMPILE_LAYER_S = {"cpu": 15.0, "cuda": 5.0}
# The floor's graph depends on neither r nor p: after the first point of a shape and N, Inductor's
# FX graph cache serves it and only Dynamo traces (a tiny floor here: 88 s cold, 13 s cached,
# under a load of 9 on the 2 cores)
CACHED_S = {"cpu": 5.0, "cuda": 3.0}
# A point runs past its limit by its last round and its exit: 5–8 s a point on the CPU (the
# first full matrix here left its 18th point out by 90 s for it), so each share leaves that out.
OVERRUN_S = {"cpu": 10.0, "cuda": 5.0}
FLOPS_PER_S = {"cpu": 9e10, "cuda": 2e14}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Shape:
    name: str
    config: Path
    # Llama-3-8B: only the smallest N and r (both p), the points, to fit in the hour
    smallest_only: bool = False

    def hf_config(self) -> dict:
        return json.loads(self.config.read_text())

    @property
    def layers(self) -> int:
        return int(self.hf_config()["num_hidden_layers"])


SHAPES = (  # Llama-3.2-1B first: the shape the issue measured
    Shape("llama3.2-1b", CONFIGS / "llama3.2_1b_1layer.json"),
    Shape("qwen2.5-0.5b", CONFIGS / "qwen2.5_0.5b_1layer.json"),
    Shape("llama3-8b", CONFIGS / "llama3_8b_1layer.json", smallest_only=True),
)


@dataclass(frozen=True)
class Point:
    shape: Shape
    n_batch: int
    seq_len: int
    r: int
    p: float

    @property
    def tokens(self) -> int:
        return self.n_batch * self.seq_len

    @property
    def name(self) -> str:
        return f"{self.shape.name}_N{self.tokens}_r{self.r}_p{self.p:g}"

    def _linears(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of a layer's 7 linears: q, k, v, o, gate, up, down."""
        c = self.shape.hf_config()
        h, heads, i = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"]
        head_dim = c.get("head_dim") or h // heads
        q, kv = heads * head_dim, c["num_key_value_heads"] * head_dim
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def step_flops(self) -> float:
        """Forward and input-grad GEMMs of the decoder layers and attention: the floor's step."""
        c = self.shape.hf_config()
        q = self._linears()[0][1]
        weights = sum(d_in * d_out for d_in, d_out in self._linears())
        attention = 6 * self.tokens * self.seq_len * q  # causal QKᵀ and PV, fwd and bwd
        return c["num_hidden_layers"] * (4 * self.tokens * weights + attention)

    def lora_flops(self) -> float:
        """The FLOPs of the LoRA GEMMs a step cannot do without (all 7 targets): x·Aᵀ and h·Bᵀ
        forward, dB, dh, dA and dh·A backward, 6·N·r·(d_in + d_out) a site. Merging or sharing
        a GEMM saves calls and bytes, not these FLOPs (merging adds a d_out×d_in product)."""
        sides = sum(d_in + d_out for d_in, d_out in self._linears())
        return self.shape.layers * 6 * self.tokens * self.r * sides


def matrix(shapes: Sequence[Shape], n_batch: int, seq_lens: Sequence[int], ranks: Sequence[int],
           dropouts: Sequence[float]) -> list[Point]:
    """N outermost: a budget that runs out drops the largest N first. A shape's points are
    adjacent, p innermost, so a point's floor often finds its graph in Inductor's cache."""
    points = []
    for seq_len in sorted(seq_lens):
        for shape in shapes:
            if shape.smallest_only and seq_len != min(seq_lens):
                continue
            for r in sorted(ranks)[:1] if shape.smallest_only else sorted(ranks):
                points += [Point(shape, n_batch, seq_len, r, p) for p in dropouts]
    return points


def estimate_s(point: Point, variants: int, cached: int, min_rounds: int, device: str) -> float:
    """Seconds for a point of `variants` variants, `cached` of them compiled at an earlier one."""
    steps = 1 + 2 + 1 + min_rounds
    step_s = point.step_flops() / FLOPS_PER_S[device]
    compile_s = COMPILE_S[device] + COMPILE_LAYER_S[device] * point.shape.layers
    return (STARTUP_S[device] + variants * steps * step_s + (variants - cached) * compile_s
            + cached * CACHED_S[device])


def estimates(points: Sequence[Point], variants: Sequence[str], min_rounds: int,
              device: str) -> list[float]:
    seen: set[tuple[Path, int]] = set()
    result = []
    for point in points:
        key = (point.shape.config, point.tokens)
        cached = int("floor" in variants and key in seen)
        seen.add(key)
        result.append(estimate_s(point, len(variants), cached, min_rounds, device))
    return result


# ---------------------------------------------------------------- arguments


def bf16_native(device: torch.device) -> bool:
    """bf16 GEMMs in hardware: avx512_bf16 or amx_bf16 on CPU, Ampere or later on CUDA."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    return any(flag in flags for flag in BF16_FLAGS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run model_exp.py at real decoder-layer widths, point by point, and write "
        "one summary table.", formatter_class=model_exp._Defaults)
    add = parser.add_argument
    add("--only", nargs="+", default=None, metavar="PATTERN",
        help="run only the points whose name matches one of these shell patterns, e.g. "
             "'llama3.2-1b_N2048_*' (names: <shape>_N<tokens>_r<r>_p<p>; --dry_run lists them)")
    add("--configs", nargs="+", type=Path, default=None,
        help="config JSONs to use as the shapes instead of the three real ones (named by file)")
    add("--n_batch", type=int, default=1, help="batch size; N = n_batch·seq_len")
    add("--seq_lens", nargs="+", type=int, default=list(SEQ_LENS), help="sequence lengths")
    add("--ranks", nargs="+", type=int, default=list(RANKS), help="LoRA ranks")
    add("--dropouts", nargs="+", type=float, default=list(DROPOUTS), help="LoRA dropouts p")
    add("--dtype", default="fp32", choices=["fp32", "bf16"],
        help="fp32, or bf16 as PEFT's default (bf16 base, fp32 adapters)")
    add("--force", action="store_true",
        help="run --dtype bf16 where bf16 GEMMs are not native (emulated: times say little)")
    add("--variants", nargs="+", default=list(VARIANTS),
        help="model_exp's --variants; must include peft+inductor, the baseline of every ratio")
    add("--criterions", nargs="+", default=[Options().criterion],
        help="model_exp's --criterions (default: runlora's default criterion)")
    add("--options", default=None, metavar="JSON", help="model_exp's --options")
    add("--inner", default="inductor", choices=["inductor", "eager"], help="model_exp's --inner")
    add("--min_rounds", type=int, default=8, help="paired rounds a point runs at least")
    add("--min_run_time", type=float, default=None,
        help="seconds of timed rounds a point runs at most (default: what its share of the "
             "budget leaves after compiling)")
    add("--budget", type=float, default=BUDGET_S, help="seconds for the whole matrix")
    add("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    add("--dry_run", action="store_true",
        help="check every point's arguments, print the points and their commands, run nothing")
    add("-o", "--out", default=None,
        help="output folder (default: bench-out/shapes_<device>_<dtype>)")
    return parser


def model_exp_argv(args: argparse.Namespace, point: Point, limit_s: float) -> list[str]:
    """The point's model_exp.py arguments: its time limit is its share of the budget."""
    run_time = limit_s if args.min_run_time is None else min(args.min_run_time, limit_s)
    return [
        "-m", str(point.shape.config), "--n_batch", str(point.n_batch),
        "--seq_len", str(point.seq_len), "-r", str(point.r), "-d", f"{point.p:g}",
        "--dtype", args.dtype, "--variants", *args.variants, "--criterions", *args.criterions,
        "--inner", args.inner, *(["--options", args.options] if args.options else []),
        "--min_rounds", str(args.min_rounds), "--min_run_time", f"{run_time:.0f}",
        "--time_limit", f"{limit_s:.0f}", "--device", args.device, "--no-profile_memory",
        "-o", str(Path(args.out) / "points" / point.name),
    ]


def check_with_model_exp(argv: list[str], name: str, error: Callable[[str], NoReturn]) -> None:
    """model_exp's own checks (variants, criteria, options, config, targets), in this process:
    its message, prefixed by the point, instead of a failure per point after the first compile."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            model_exp.parse_args(argv)
    except SystemExit:
        why = captured.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        error(f"point {name}: {why}")


def check_args(args: argparse.Namespace, error: Callable[[str], NoReturn]) -> None:
    for flag, values in (("--n_batch", [args.n_batch]), ("--seq_lens", args.seq_lens),
                         ("--ranks", args.ranks), ("--min_rounds", [args.min_rounds])):
        bad = [v for v in values if v <= 0]
        if bad:
            error(f"{flag} must be positive integers, got {bad[0]}")
    if not all(0.0 <= p < 1.0 for p in args.dropouts):
        error(f"--dropouts must be in [0, 1), got {' '.join(f'{p:g}' for p in args.dropouts)}")
    if args.budget <= 0 or (args.min_run_time is not None and args.min_run_time < 0):
        error("--budget must be positive and --min_run_time not negative")
    if "peft+inductor" not in args.variants:
        error("--variants must include peft+inductor: every ratio in the table is to it")
    for path in args.configs or []:
        if not path.is_file():
            error(f"--configs {path}: no such file")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = parse_device(args.device, error)
    args.bf16_native = bf16_native(device)
    if args.dtype == "bf16" and not args.bf16_native and not args.force:
        error(f"--dtype bf16: {device_title(device)} has no bf16 GEMMs ({' or '.join(BF16_FLAGS)}"
              "), emulated bf16 times say nothing about bf16 training, so bf16 is not measured "
              "here; --force runs it anyway")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parsed and validated; every point's model_exp arguments checked before anything runs."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser.error)
    shapes = ([Shape(path.stem, path.resolve()) for path in args.configs] if args.configs
              else list(SHAPES))
    points = matrix(shapes, args.n_batch, args.seq_lens, args.ranks,
                    list(dict.fromkeys(args.dropouts)))
    for pattern in args.only or []:
        if not any(fnmatch.fnmatch(p.name, pattern) for p in points):
            parser.error(f"--only {pattern!r} matches no point; points: "
                         + " ".join(p.name for p in points))
    args.points = [p for p in points
                   if args.only is None or any(fnmatch.fnmatch(p.name, o) for o in args.only)]
    args.out = args.out or str(Path("bench-out") / f"shapes_{args.device.split(':')[0]}_"
                                                  f"{args.dtype}")
    device_type = torch.device(args.device).type
    args.expanded = model_exp.expand_variants(argparse.Namespace(
        variants=args.variants, criterions=args.criterions))
    args.estimates = estimates(args.points, args.expanded, args.min_rounds, device_type)
    for point, estimate in zip(args.points, args.estimates):
        check_with_model_exp(model_exp_argv(args, point, estimate), point.name, parser.error)
    return args


# ---------------------------------------------------------------- running


@dataclass
class Outcome:
    point: Point
    status: str  # "ok", "failed (exit N)", "timed out", "not run: budget spent"
    limit_s: float = float("nan")
    wall_s: float = float("nan")
    rows: list[dict] | None = None  # the point's model_exp CSV rows


def run_point(args: argparse.Namespace, point: Point, limit_s: float) -> Outcome:
    """One model_exp process; its output goes to points/<name>.log, its table to points/."""
    argv = model_exp_argv(args, point, limit_s)
    log = Path(args.out) / "points" / f"{point.name}.log"
    start = time.perf_counter()
    # a guard against a hang only: a slow point still finishes its --min_rounds past its limit
    guard_s = limit_s + max(limit_s, 300.0)
    with log.open("w") as handle:
        handle.write(shlex.join([sys.executable, str(MODEL_EXP), *argv]) + "\n")
        handle.flush()
        try:
            code = subprocess.run([sys.executable, str(MODEL_EXP), *argv], stdout=handle,
                                  stderr=subprocess.STDOUT, cwd=REPO, timeout=guard_s).returncode
        except subprocess.TimeoutExpired:
            code = None
    wall = time.perf_counter() - start
    csv_path = Path(args.out) / "points" / f"{point.name}.csv"
    if code == 0 and csv_path.exists():
        return Outcome(point, "ok", limit_s, wall, read_point(csv_path))
    status = "timed out" if code is None else f"failed (exit {code})"
    return Outcome(point, status, limit_s, wall)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run(args: argparse.Namespace, on_point: Callable[[list[Outcome]], None]) -> list[Outcome]:
    """The points in order, each with max(its share of what is left, its estimate) as its limit;
    a point whose estimate does not fit in what is left is not run."""
    deadline = STARTED + args.budget
    outcomes: list[Outcome] = []
    count = len(args.points)
    for i, (point, estimate) in enumerate(zip(args.points, args.estimates)):
        left = deadline - time.perf_counter()
        rest = sum(args.estimates[i:])
        if left < estimate:
            outcomes.append(Outcome(point, "not run: budget spent"))
            continue
        overrun = OVERRUN_S[torch.device(args.device).type] * (count - i)
        limit = max((left - overrun) * estimate / rest, estimate)
        # the rounds fill each share: the rest takes the budget left, or the estimates if longer
        print(f"[{i + 1}/{count}] {point.name}: limit {limit:.0f} s (estimate {estimate:.0f} s); "
              f"elapsed {minutes(time.perf_counter() - STARTED)}, about "
              f"{minutes(max(left, rest))} left for {count - i} point(s)", flush=True)
        outcome = run_point(args, point, limit)
        outcomes.append(outcome)
        print(f"    {outcome.status} in {outcome.wall_s:.0f} s", flush=True)
        on_point(outcomes)
    return outcomes


def header(args: argparse.Namespace, argv: Sequence[str], outcomes: Sequence[Outcome],
           elapsed_s: float) -> list[str]:
    import peft
    import transformers

    device = torch.device(args.device)
    if args.bf16_native:
        bf16 = "bf16 GEMMs native" + (" (avx512_bf16/amx_bf16)" if device.type == "cpu" else "")
    else:
        bf16 = (f"no bf16 GEMMs ({' and '.join(BF16_FLAGS)} absent): bf16, PEFT's default, "
                + ("run anyway (--force), emulated" if args.dtype == "bf16" else "not measured"))
    done = sum(o.status == "ok" for o in outcomes)
    return [
        f"# Shape matrix: {args.dtype} on {device_title(device)}", "",
        f"- {bf16}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, peft "
        f"{peft.__version__}; {model_exp.available_cores()} cores",
        f"- command: `{shlex.join(['python', 'experiments/shapes_exp.py', *argv])}`",
        f"- {done} of {len(args.points)} points measured in {minutes(elapsed_s)} (budget "
        f"{minutes(args.budget)}); ≥ {args.min_rounds} paired rounds a point; all 7 target "
        "modules; per point files in points/",
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    total = sum(args.estimates)
    print(f"# shape matrix: {len(args.points)} points, {args.dtype} on {args.device}, estimated "
          f"{minutes(total)} at {args.min_rounds} rounds a point, budget {minutes(args.budget)}",
          flush=True)
    if total > args.budget:
        print("WARNING: the estimate exceeds --budget: the last points may not run", flush=True)
    if args.dry_run:
        for point, estimate in zip(args.points, args.estimates):
            command = ["python", "experiments/model_exp.py", *model_exp_argv(args, point, estimate)]
            print(f"{point.name} (estimate {estimate:.0f} s): {shlex.join(command)}")
        return 0
    out = Path(args.out)
    (out / "points").mkdir(parents=True, exist_ok=True)

    def write(outcomes: list[Outcome]) -> None:  # after every point: a killed run keeps its table
        rest = [Outcome(p, "not run") for p in args.points[len(outcomes):]]
        lines = header(args, argv, outcomes, time.perf_counter() - STARTED)
        write_summary(out, lines, [*outcomes, *rest], args.dtype, args.expanded)

    write([])  # the table of points not run yet, in case the first point never ends
    outcomes = run(args, write)
    write(outcomes)
    print((out / "shapes_summary.md").read_text(), flush=True)
    print(f"wrote {out / 'shapes_summary.md'}, {out / 'shapes_summary.csv'}")
    # exit 1 when a point failed or hung; points the budget left out are in the table, not errors
    return 0 if all(o.status == "ok" or o.status.startswith("not run") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
