"""Validate the choice criteria against measured truth (issue 5, item 5).

For each LoRA site of a grid of shapes (one adapter, no bias, x, A and B requiring grad,
training), every eligible plan is timed (the truth: fwd+bwd, interleaved rounds, median), each
criterion is asked for its pick, and the summary says how often the pick is within 3% of the
measured best and how much slower it is when it is not. Eligible = the candidates that save no
more than eager PEFT does, the set every criterion chooses from. By default the truth is measured
twice, and the second measurement's best plan is scored like a criterion ('truth-again'): a
criterion cannot be judged more finely than the truth agrees with itself.

    python experiments/criteria_exp.py                              # CPU fp32, --max_mnk 2**31
    python experiments/criteria_exp.py --device cuda --dtypes fp32 bf16
    python experiments/criteria_exp.py --quick --truth_budget 0.02   # 4 tiny points (tests)
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_lib
from bench_lib import TimeLimit, parse_device  # noqa: E402
from runlora_fx.choice.chooser import Chooser
from runlora_fx.choice.criteria import CRITERIA, Candidate, Decision
from runlora_fx.cost.measure import BUDGET_S, MAX_ROUNDS, MIN_ROUNDS, SESSIONS, time_plans
from runlora_fx.ir.plans import Plan, reference_plan
from runlora_fx.ir.site import Adapter, LoraSite, SiteGroup

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
N_VALUES = (256, 1024, 4096, 16384)
DIMS = ((256, 256), (1024, 1024), (2048, 2048), (4096, 4096), (1024, 4096), (4096, 1024))
RANKS = (4, 16, 64, 256)
# --quick: four tiny points (N ≤ 256, d ≤ 128, r ≤ 8): square and both rectangles, in seconds
QUICK = ((64, 64, 64, 4), (256, 128, 128, 8), (128, 64, 128, 4), (256, 128, 64, 8))
CPU_MAX_MNK = 2**31  # 2 CPU cores: a 1024³ point already takes ~30 s of timing
REFERENCE = "reference"  # eager PEFT's plan: not a criterion, the baseline a criterion must beat
# The best plan of a second, independent measurement of the truth, scored like a criterion: how
# often the truth agrees with itself is the ceiling of any criterion's score on the machine.
TRUTH_AGAIN = "truth-again"


@dataclass(frozen=True)
class Point:
    n: int
    d_in: int
    d_out: int
    r: int
    dtype: str

    @property
    def mnk(self) -> int:
        return self.n * self.d_in * self.d_out

    @property
    def label(self) -> str:
        return f"N{self.n}_d{self.d_in}x{self.d_out}_r{self.r}_{self.dtype}"


@dataclass
class PointResult:
    point: Point
    eligible: tuple[Candidate, ...]
    truth: dict[Plan, float]  # median seconds of fwd+bwd per eligible plan
    truth_again: dict[Plan, float] | None  # the same, measured again after it (--truth_repeats 2)
    picks: dict[str, Plan]  # criterion (and REFERENCE, TRUTH_AGAIN) → its plan
    decisions: dict[str, Decision]

    @property
    def best(self) -> Plan:
        return min(self.truth, key=self.truth.__getitem__)

    def slowdown(self, name: str) -> float:
        return self.truth[self.picks[name]] / self.truth[self.best] - 1.0


# ---------------------------------------------------------------- arguments


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type: a positive int or float (NaN refused), else a usage error (exit 2)."""
    def parse(text: str) -> float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" errors
    return parse


def dims(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: write d_in x d_out as two positive "
                                         "integers, e.g. 1024x4096")
    return int(parts[0]), int(parts[1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time every eligible plan of a grid of LoRA sites and score each criterion's "
        "pick against the measured best.", formatter_class=_Defaults)
    add = parser.add_argument
    add("--device", default="cpu", help="cpu or cuda[:i]")
    add("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES), help="site dtypes")
    add("--criterions", nargs="+", default=list(CRITERIA), choices=list(CRITERIA),
        help="criteria to score")
    add("--n", nargs="+", type=positive(int), default=list(N_VALUES), help="N (batch·seq)")
    add("--dims", nargs="+", type=dims, default=None,
        help="d_in x d_out pairs (default: " + " ".join(f"{a}x{b}" for a, b in DIMS) + ")")
    add("--ranks", nargs="+", type=positive(int), default=list(RANKS),
        help="LoRA ranks; only r < min(d_in, d_out) is kept")
    add("--quick", action="store_true", help="four tiny points instead of the grid (tests)")
    add("--max_mnk", type=positive(int), default=None,
        help="skip points with N·d_in·d_out above this (default: 2**31 on cpu, no cap on cuda)")
    add("--dropout", type=float, default=0.0,
        help="LoRA dropout p; p > 0 makes the merged plans illegal")
    add("--truth_budget", type=positive(float), default=1.0,
        help="seconds of interleaved rounds timing a point's eligible plans, per session of "
             "the truth")
    add("--truth_sessions", type=positive(int), default=SESSIONS,
        help="sessions of fresh tensors; the truth is the median over them")
    add("--truth_min_rounds", type=positive(int), default=MIN_ROUNDS,
        help=f"at least this many rounds (at most {MAX_ROUNDS}: time_plans stops there)")
    add("--truth_repeats", type=int, default=2, choices=(1, 2),
        help="2: measure the truth a second time, after the first, and score that second "
        f"measurement's best plan like a criterion ('{TRUTH_AGAIN}'): the ceiling of any "
        "criterion's score against a truth that noisy")
    add("--within", type=positive(float), default=0.03,
        help="a pick is right when its time is at most (1 + this) × the best time")
    add("--time_limit", type=positive(float), default=None,
        help="seconds for the whole run: the grid stops before a point that would not fit (one "
             "as long as the longest so far); the summary covers the points done and says so")
    add("--cache_dir", default=None,
        help="measurement cache of the criteria (default: a fresh temporary one, so 'time' "
             "measures on its own, independently of the truth)")
    add("--threads", type=positive(int), default=torch.get_num_threads(), help="torch CPU threads")
    add("-o", "--out", default=None, help="output folder (default: bench-out/criteria_<device>)")
    return parser


def dtype_runs(dtype: torch.dtype, device: torch.device) -> bool:
    """A tiny matmul decides; CUDA's bf16 emulation on pre-Ampere cards does not count."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(
            including_emulation=False):
        return False
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        (a @ a).sum().item()
    except RuntimeError:
        return False
    return True


def allocator_env() -> list[str]:
    """glibc malloc settings the run was started with: they change how large allocations are
    served (mmap and page faults per call, or the heap), which moves plan timings on CPU."""
    return [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]


def check_args(args: argparse.Namespace, error: Callable[[str], NoReturn]) -> torch.device:
    if args.truth_min_rounds > MAX_ROUNDS:  # time_plans stops at MAX_ROUNDS regardless
        error(f"--truth_min_rounds must be at most {MAX_ROUNDS}, got {args.truth_min_rounds}")
    if not 0.0 <= args.dropout < 1.0:
        error(f"--dropout must be in [0, 1), got {args.dropout:g}")
    device = parse_device(args.device, error)
    for name in args.dtypes:
        if not dtype_runs(DTYPES[name], device):
            error(f"--dtypes {name}: {device} cannot run {name} matmuls")
    return device


def grid(args: argparse.Namespace) -> tuple[list[Point], int]:
    """The kept points and how many --max_mnk skipped. Dtypes vary fastest, so the machine's
    drift over the run hits every dtype alike."""
    shapes = list(QUICK) if args.quick else [
        (n, d_in, d_out, r) for n in args.n for d_in, d_out in args.dims for r in args.ranks
        if r < min(d_in, d_out)]
    points = [Point(*shape, dtype) for shape in shapes for dtype in args.dtypes]
    kept = [p for p in points if args.max_mnk is None or p.mnk <= args.max_mnk]
    return kept, len(points) - len(kept)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parsed and validated arguments; every error exits with code 2 before anything is timed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = check_args(args, parser.error)
    args.device = str(device)
    args.dims = args.dims or list(DIMS)
    if args.max_mnk is None and device.type == "cpu":
        args.max_mnk = CPU_MAX_MNK
    args.points, args.skipped = grid(args)
    if not args.points:
        parser.error(f"--max_mnk {args.max_mnk} leaves no grid point; raise it or use --quick")
    args.out = args.out or str(Path("bench-out") / f"criteria_{device.type}")
    return args


# ---------------------------------------------------------------- measuring


def site_for(point: Point, dropout: float, device: str) -> SiteGroup:
    """The grid point's site, as the planning unit it is alone."""
    adapter = Adapter(r=point.r, dropout_p=dropout, scale=2.0, a_requires_grad=True,
                      b_requires_grad=True)
    return SiteGroup((LoraSite(
        path=f"grid/{point.label}", n=point.n, d_in=point.d_in, d_out=point.d_out,
        adapters=(adapter,), dtype=DTYPES[point.dtype], has_bias=False, bias_requires_grad=False,
        x_requires_grad=True, training=True, device=device),))


def measure_point(point: Point, choosers: dict[str, Chooser],
                  args: argparse.Namespace) -> PointResult:
    site = site_for(point, args.dropout, args.device)
    # Criteria first: "time" runs its own rounds (at measure.BUDGET_S) before and apart from the
    # truth's, so a lucky or unlucky stretch of the machine is not shared by both; and its
    # warm-up gets no help from the truth having run the same kernels just before.
    decisions = {name: chooser.choose(site) for name, chooser in choosers.items()}
    first = next(iter(decisions.values()))
    assert first.memory_cap is not None  # per-site choice: eager PEFT's saved bytes
    eligible = tuple(c for c in first.candidates if c.cost.saved_bytes <= first.memory_cap)
    picks = {name: d.chosen.plan for name, d in decisions.items()}
    picks[REFERENCE] = reference_plan(site)
    truths = [time_plans(site, [c.plan for c in eligible], torch.device(args.device),
                         budget_s=args.truth_budget, min_rounds=args.truth_min_rounds,
                         sessions=args.truth_sessions) for _ in range(args.truth_repeats)]
    truth, again = truths[0], (truths[1] if len(truths) > 1 else None)
    if again is not None:
        picks[TRUTH_AGAIN] = min(again, key=again.__getitem__)
    stray = {n: p.describe() for n, p in picks.items() if p not in truth}
    if stray:  # a criterion chose outside the eligible set: a bug in the chooser, not a result
        raise RuntimeError(f"{point.label}: picks not among the eligible plans: {stray}")
    return PointResult(point, eligible, truth, again, picks, decisions)


def run(args: argparse.Namespace, limit: TimeLimit) -> list[PointResult]:
    """Every point of the grid in order, or the first ones that fit in `limit`."""
    from tqdm import tqdm

    results: list[PointResult] = []
    longest = 0.0
    with tempfile.TemporaryDirectory(prefix="runlora-criteria-") as fresh:
        root = Path(args.cache_dir) if args.cache_dir else Path(fresh)
        # one Chooser per criterion for the whole run: roofline calibrates once per dtype
        choosers = {name: Chooser(name, root) for name in args.criterions}
        with tqdm(args.points, unit="point", file=sys.stderr) as bar:
            for point in bar:
                if results and limit.left() < longest:
                    print(f"# --time_limit {args.time_limit:g} s: stopping after "
                          f"{len(results)} of {len(args.points)} points", flush=True)
                    break
                bar.set_postfix_str(point.label)
                started = time.perf_counter()
                results.append(measure_point(point, choosers, args))
                longest = max(longest, time.perf_counter() - started)
    return results


# ---------------------------------------------------------------- reporting


CODES = {"split": "S", "merged": "M", "merged, W_eff recomputed": "R", "merged, W_eff kept": "K",
         "(gB)ᵀx": "gB", "Bᵀ(gᵀx)": "gx", "gᵀh": "h", "(gᵀx)Aᵀ": "gx",
         "save h": ":save", "recompute h": ":rec"}


def plan_code(plan: Plan) -> str:
    """Short form for the per-point table (describe() is ~55 characters); LEGEND spells it out."""
    fwd, dx, da, db = (
        "-" if choice is None else CODES[choice.value]
        for choice in (plan.forward, plan.input_grad, plan.grad_a, plan.grad_b))
    shared = "".join(mark for flag, mark in (("fold_x", "+x"), ("fold_dy", "+dy"))
                     if getattr(plan, flag))
    return (f"{fwd},{dx},{da},{db}{'' if plan.hidden is None else CODES[plan.hidden.value]}"
            f"{shared}")


LEGEND = ("Plan code = forward, dx, dA, dB[:h][+x][+dy]. Forward/dx: S split, M merged, R merged "
          "with W_eff recomputed, K merged with W_eff kept. dA: gB = (gB)ᵀx, gx = Bᵀ(gᵀx). dB: "
          "h = gᵀh with h saved (:save) or recomputed (:rec), gx = (gᵀx)Aᵀ. +x: h from the "
          "forward GEMM x·[W; A]ᵀ; +dy: dh from the backward GEMM dy·[W | s·B].")


def score_table(names: Sequence[str], results: Sequence[PointResult], within: float) -> str:
    lines = [f"| criterion | points | within {within * 100:g}% of best | not within | "
             "mean slowdown when not | worst slowdown |", "|---|---:|---:|---:|---:|---:|"]
    for name in names:
        slowdowns = [r.slowdown(name) for r in results]
        misses = [s for s in slowdowns if s > within]
        hits = len(slowdowns) - len(misses)
        mean = f"{statistics.fmean(misses):+.1%}" if misses else "—"
        lines.append(f"| {name} | {len(slowdowns)} | {hits} ({hits / len(slowdowns):.0%}) | "
                     f"{len(misses)} | {mean} | {max(slowdowns):+.1%} |")
    return "\n".join(lines)


def point_table(names: Sequence[str], results: Sequence[PointResult]) -> str:
    lines = ["| point | eligible plans | best plan | best ms | " + " | ".join(names) + " |",
             "|---|---:|---|---:|" + "---|" * len(names)]
    for r in results:
        cells = [f"{plan_code(r.picks[n])} ({r.slowdown(n):+.1%})" for n in names]
        lines.append(f"| {r.point.label} | {len(r.eligible)} | {plan_code(r.best)} | "
                     f"{r.truth[r.best] * 1e3:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_title(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo")  # Linux: the CPU's model name
    names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
             if ln.startswith("model name")] if info.exists() else []
    return f"CPU {names[0] if names else ''} ({torch.backends.cpu.get_cpu_capability()})"


def row_names(args: argparse.Namespace) -> list[str]:
    """The criteria, then the baselines: eager PEFT's order and, if measured, the truth again."""
    return [*args.criterions, REFERENCE, *([TRUTH_AGAIN] if args.truth_repeats > 1 else [])]


def summary_tables(args: argparse.Namespace, results: Sequence[PointResult]) -> str:
    names = row_names(args)
    groups = {f"All points ({' '.join(args.dtypes)})": results}
    if len(args.dtypes) > 1:  # then one table per dtype as well
        groups |= {d: [r for r in results if r.point.dtype == d] for d in args.dtypes}
    return "\n\n".join(f"## {title}\n\n{score_table(names, subset, args.within)}"
                       for title, subset in groups.items())


def header(args: argparse.Namespace, argv: Sequence[str], done: int) -> str:
    cap = "none" if args.max_mnk is None else f"{args.max_mnk}"
    pairs = " ".join(f"{a}x{b}" for a, b in args.dims)
    grid_text = ("--quick: " + ", ".join(f"N{n} {a}x{b} r{r}" for n, a, b, r in QUICK)
                 if args.quick else f"N {args.n}, d_in x d_out {pairs}, r {args.ranks} "
                 "(r < min(d_in, d_out))")
    return "\n".join([
        f"# Choice criteria vs measured best on {device_title(torch.device(args.device))}", "",
        f"- torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads",
        f"- command: `{shlex.join([*allocator_env(), 'python', 'experiments/criteria_exp.py', *argv])}`",
        f"- grid: {grid_text}; dtypes {' '.join(args.dtypes)}; dropout {args.dropout:g}; max "
        f"N·d_in·d_out {cap}: {len(args.points)} points kept, {args.skipped} skipped",
        *([] if done == len(args.points) else [
            f"- **stopped by --time_limit {args.time_limit:g} s after {done} of "
            f"{len(args.points)} points** (in grid order): the tables cover those only"]),
        "- sites: one adapter, no bias, x, A and B require grad, training",
        f"- truth: every eligible plan (saved bytes ≤ eager PEFT's), fwd+bwd, median over "
        f"{args.truth_sessions} sessions of fresh tensors of the median over interleaved rounds "
        f"(≥ {args.truth_min_rounds} rounds and {args.truth_budget:g} s per session); 'time' "
        f"measures on its own ({SESSIONS} sessions of ≥ {MIN_ROUNDS} rounds and {BUDGET_S:g} s), "
        "before the truth",
        f"- a pick is within when its truth time ≤ (1 + {args.within:g}) × the best's; slowdown ="
        " truth(pick) / truth(best) − 1; 'reference' is eager PEFT's plan (a baseline, not a "
        "criterion)" + (f"; '{TRUTH_AGAIN}' is the best plan of a second measurement of the "
                       "truth, made after the first the same way: its score is how often the "
                       "truth agrees with itself, the ceiling of any criterion's"
                       if args.truth_repeats > 1 else ""),
    ])


def write_csv(path: Path, args: argparse.Namespace, results: Sequence[PointResult]) -> None:
    timed = [n for n in args.criterions if n in ("roofline", "time")]  # candidates with seconds
    columns = ["point", "dtype", "n", "d_in", "d_out", "r", "dropout", "plan", "plan_code",
               "seconds", "ratio_to_best", "best", "chosen_by", "flops", "bytes_moved",
               "saved_bytes", *(f"{n}_seconds" for n in timed),
               *(["truth_again_seconds"] if args.truth_repeats > 1 else [])]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in results:
            p, seconds = r.point, {n: {c.plan: c.seconds for c in r.decisions[n].candidates}
                                   for n in timed}
            for c in r.eligible:
                writer.writerow({
                    "point": p.label, "dtype": p.dtype, "n": p.n, "d_in": p.d_in, "d_out": p.d_out,
                    "r": p.r, "dropout": args.dropout, "plan": c.plan.describe(),
                    "plan_code": plan_code(c.plan), "seconds": r.truth[c.plan],
                    "ratio_to_best": r.truth[c.plan] / r.truth[r.best], "best": c.plan == r.best,
                    "chosen_by": " ".join(n for n, plan in r.picks.items() if plan == c.plan),
                    "flops": c.cost.flops, "bytes_moved": c.cost.bytes_moved,
                    "saved_bytes": c.cost.saved_bytes,
                    **{f"{n}_seconds": seconds[n][c.plan] for n in timed},
                    **({"truth_again_seconds": r.truth_again[c.plan]}
                       if r.truth_again is not None else {})})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    started = time.perf_counter()  # --time_limit counts from here
    args = parse_args(argv)
    limit = TimeLimit(args.time_limit, start=started)
    torch.set_num_threads(args.threads)
    print(f"# criteria {' '.join(args.criterions)} on {args.device}: {len(args.points)} points "
          f"kept, {args.skipped} skipped (max N·d_in·d_out {args.max_mnk or 'none'})", flush=True)
    results = run(args, limit)
    tables = summary_tables(args, results)
    print(tables, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = row_names(args)
    (out / "criteria_summary.md").write_text(
        f"{header(args, argv, len(results))}\n\n{tables}\n\n## Per point\n\n{LEGEND} In "
        f"parentheses: the pick's slowdown against the best.\n\n{point_table(names, results)}\n")
    write_csv(out / "criteria_points.csv", args, results)
    print(f"wrote {out / 'criteria_summary.md'}, {out / 'criteria_points.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
