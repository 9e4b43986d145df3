"""Benchmark a LoRA training step on a Llama config: PEFT eager, PEFT + Inductor, runlora, floor.

The RunLoRA paper's experiment (the seed's flags, same names and meaning), rerun as
docs/benchmarks.md says: same weights and batch for every variant, compile first (timed
apart), then interleaved rounds until --min_run_time is spent, medians and paired ratios. With no arguments it runs the
CPU-sized default job (DEFAULT_JOB: llama_20m, all 7 target modules, r 8, fp32, b 4, s 256,
60 s of rounds) that `make bench` runs; with any argument the seed's defaults apply.
`--dtype bf16` (or fp16) is PEFT's default setup: the base model in bf16, get_peft_model keeping
lora_A/lora_B in fp32; `--adapter_dtype bf16` makes the adapters bf16 too (pure bf16).

    python experiments/model_exp.py -m configs/llama_60m.json --n_batch 4 --seq_len 256 -r 64
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

STARTED = time.perf_counter()  # --time_limit counts from here, imports included

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_lib, bench_report

from bench_lib import (  # noqa: E402
    LoraSpec,
    Runner,
    TimeLimit,
    Variant,
    add_lora,
    build_base,
    compile_variant,
    fb_step,
    interleaved_rounds,
    make_batch,
    make_floor,
    measure_memory,
    missing_targets,
    parse_device,
    runlora_options,
    state_storages,
    steps_per_round,
    variant_error,
    warm_up,
)
from runlora_fx import CRITERIA, Options, parse_options  # noqa: E402
from runlora_fx.options import INNER_COMPILERS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALL_TARGETS = ("q_proj", "v_proj", "k_proj", "o_proj", "up_proj", "down_proj", "gate_proj")
ROUND_TARGET_S = 0.2  # each variant runs about this long per round (at least one step)
# What runs with no arguments (`make bench`): a llama_20m step that takes about 1 s on 2 cores.
DEFAULT_JOB = ["-m", str(REPO / "configs" / "llama_20m.json"), "--n_batch", "4", "--seq_len", "256",
               "--min_run_time", "60"]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time a LoRA forward+backward step per implementation and write the table.",
        formatter_class=_Defaults,
        epilog="With no arguments at all it runs the CPU-sized default job: "
        + " ".join(Path(a).name if a.endswith(".json") else a for a in DEFAULT_JOB),
    )
    add = parser.add_argument
    add("-m", "--model_name_or_config", default=str(REPO / "configs" / "llama_20m.json"),
        help="path to a config JSON, or the name of a model already in the local HF cache")
    add("--n_batch", type=int, default=10, help="batch size")
    add("--seq_len", type=int, default=None,
        help="sequence length (default: the config's max_sequence_length, else "
             "max_position_embeddings)")
    add("-r", "--lora_r", type=int, default=8, help="rank of the LoRA adapters")
    add("-a", "--lora_alpha", type=float, default=8.0, help="LoRA scaling factor (scale = alpha/r)")
    add("-d", "--lora_dropout", type=float, default=0.0, help="dropout on the LoRA branch input")
    add("--dtype", default="fp32",
        help=f"dtype of the base model's weights and activations: {', '.join(DTYPES)}")
    add("--adapter_dtype", default=None, choices=list(DTYPES),
        help="dtype of lora_A/lora_B. fp32 (the default) is PEFT's default for any --dtype "
             "(get_peft_model's autocast_adapter_dtype=True: on a bf16/fp16 base each LoRA "
             "branch's input is cast to fp32 and its result back); the same as a 16-bit --dtype "
             "is the pure 16-bit setup (autocast_adapter_dtype=False)")
    add("--target_modules", nargs="+", default=list(ALL_TARGETS),
        help="module names that get LoRA adapters")
    add("--criterions", nargs="+", default=[Options().criterion],
        help="runlora criteria to benchmark, one runlora:<criterion> variant each: "
             + ", ".join(CRITERIA))
    add("--variants", nargs="+", default=None,
        help="implementations to run: peft, peft+inductor, runlora:<criterion>, floor; 'runlora' "
             "stands for one per --criterions (default: peft peft+inductor runlora floor)")
    add("--inner", default="inductor", choices=INNER_COMPILERS,
        help="compiler runlora hands its rewritten graphs to")
    add("--options", default=None, metavar="JSON",
        help="more runlora backend options, a JSON object merged into every runlora variant's "
             "options, e.g. '{\"memory_budget\": 0.5}' (criterion and inner come from "
             "--criterions and --inner)")
    add("--min_run_time", type=float, default=10.0,
        help="seconds of interleaved timed rounds (after compiling)")
    add("--min_rounds", type=int, default=5, help="at least this many rounds")
    add("--time_limit", type=float, default=None,
        help="seconds for the whole process: variants whose compile would not fit are skipped "
             "(in --variants order; the first always runs) and the rounds are cut short")
    add("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    add("--threads", type=int, default=available_cores(), help="torch CPU threads")
    add("--seed", type=int, default=0, help="seed of the weights and of the batch")
    add("--profile_memory", action=argparse.BooleanOptionalAction, default=True,
        help="on CPU, also measure each variant's peak bytes in one profiled step")
    add("-o", "--out", default=None,
        help="prefix of the .csv/.md/.png outputs "
             "(default: bench-out/<config>_b<n>_s<len>_r<r>_<dtype>, and "
             "-adapters-<adapter_dtype> when the adapters are not fp32)")
    return parser


def load_config(name: str):
    from transformers import AutoConfig

    if Path(name).exists():
        return AutoConfig.from_pretrained(name)
    return AutoConfig.from_pretrained(name, local_files_only=True)


def expand_variants(args: argparse.Namespace) -> list[str]:
    names = args.variants or ["peft", "peft+inductor", "runlora", "floor"]
    expanded: list[str] = []
    for name in names:
        expanded += [f"runlora:{c}" for c in args.criterions] if name == "runlora" else [name]
    return list(dict.fromkeys(expanded))  # drop repeats, keep order


def check_numbers(args: argparse.Namespace, error: Callable[[str], NoReturn]) -> None:
    if args.dtype not in DTYPES:
        error(f"--dtype {args.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    for flag, value in (("--lora_r", args.lora_r), ("--n_batch", args.n_batch),
                        ("--min_rounds", args.min_rounds), ("--threads", args.threads)):
        if value <= 0:
            error(f"{flag} must be a positive integer, got {value}")
    if args.seq_len is not None and args.seq_len <= 0:
        error(f"--seq_len must be a positive integer, got {args.seq_len}")
    if args.lora_alpha <= 0:
        error(f"--lora_alpha must be positive, got {args.lora_alpha:g}")
    if not 0.0 <= args.lora_dropout < 1.0:
        error(f"--lora_dropout must be in [0, 1), got {args.lora_dropout:g}")
    if args.min_run_time < 0:
        error(f"--min_run_time must not be negative, got {args.min_run_time:g}")
    if args.time_limit is not None and args.time_limit <= 0:
        error(f"--time_limit must be positive, got {args.time_limit:g}")


def check_precision(args: argparse.Namespace, error: Callable[[str], NoReturn]) -> None:
    """--adapter_dtype: fp32 (PEFT's default, any --dtype) or --dtype itself (pure 16-bit)."""
    if args.adapter_dtype is None:
        args.adapter_dtype = "fp32"
    if args.adapter_dtype not in ("fp32", args.dtype):
        choose = "fp32" if args.dtype == "fp32" else f"fp32 (PEFT's default) or {args.dtype}"
        error(f"--adapter_dtype {args.adapter_dtype} does not go with --dtype {args.dtype}: "
              f"PEFT keeps adapters in fp32 or in the base model's dtype; choose --adapter_dtype "
              f"{choose}")


def check_options(args: argparse.Namespace, error: Callable[[str], NoReturn]) -> None:
    """--options: a JSON object; runlora_fx.parse_options judges it, once per criterion."""
    args.runlora_options = {}
    if args.options is None:
        return
    try:
        extra = json.loads(args.options)
    except json.JSONDecodeError as why:
        error(f"--options is not valid JSON ({why}): give an object such as "
              "'{\"memory_budget\": 0.5}'")
    if not isinstance(extra, dict):
        error(f"--options must be a JSON object of runlora option names to values, not "
              f"{type(extra).__name__} {args.options!r}")
    for key, flag in (("criterion", "--criterions"), ("inner", "--inner")):
        if key in extra:
            error(f"--options sets {key!r}: use {flag} instead")
    for criterion in args.criterions:
        try:
            parse_options(runlora_options(criterion, args.inner, extra))
        except ValueError as why:
            error(f"--options: {why}")
    args.runlora_options = extra


def precision_tag(args: argparse.Namespace) -> str:
    """The default output name's dtype: `bf16` (PEFT's default), `bf16-adapters-bf16` (pure)."""
    if args.adapter_dtype == "fp32":
        return args.dtype
    return f"{args.dtype}-adapters-{args.adapter_dtype}"


def precision_label(args: argparse.Namespace) -> str:
    """The title's dtype: `fp32`; `bf16 (fp32 adapters)`, PEFT's default; `bf16 (bf16 adapters)`."""
    if args.dtype == args.adapter_dtype == "fp32":
        return "fp32"
    return f"{args.dtype} ({args.adapter_dtype} adapters)"


def precision_note(args: argparse.Namespace) -> str | None:
    if args.dtype == "fp32":
        return None
    if args.adapter_dtype == "fp32":
        return (f"Precision: {args.dtype} base model (the floor is the same {args.dtype} base), "
                "lora_A/lora_B in fp32 — PEFT's default (get_peft_model's "
                "autocast_adapter_dtype=True): each LoRA branch's input is cast to fp32 and its "
                f"result back to {args.dtype}.")
    return (f"Precision: pure {args.dtype} — base model and lora_A/lora_B in {args.dtype} "
            "(get_peft_model(..., autocast_adapter_dtype=False)).")


def check_names(args: argparse.Namespace, error: Callable[[str], NoReturn]) -> None:
    args.target_modules = [t for t in args.target_modules if t.strip()]
    if not args.target_modules:
        error("--target_modules is empty: name at least one module, e.g. q_proj v_proj")
    for criterion in args.criterions:
        if criterion not in CRITERIA:
            error(f"unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    args.variants = expand_variants(args)
    for name in args.variants:
        why = variant_error(name, tuple(CRITERIA))
        if why:
            error(why)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    parse_device(args.device, error)


def check_model(args: argparse.Namespace, error: Callable[[str], NoReturn]) -> None:
    """Load the config and check the target modules on a weightless (meta) copy of the model."""
    from transformers import AutoModelForCausalLM

    try:
        args.config = load_config(args.model_name_or_config)
    except (OSError, ValueError) as why:
        error(f"-m {args.model_name_or_config!r} is neither a config file nor a model in the "
              f"local HF cache: {why}")
    config = args.config
    args.seq_len = args.seq_len or getattr(config, "max_sequence_length", None) or (
        config.max_position_embeddings
    )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(args.config)
    missing = missing_targets(skeleton, args.target_modules)
    if missing:
        error(f"--target_modules {' '.join(missing)} match no module of "
              f"{args.model_name_or_config}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parsed and validated arguments; every error exits with code 2 before anything compiles."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_numbers(args, parser.error)
    check_precision(args, parser.error)
    check_names(args, parser.error)
    check_options(args, parser.error)
    check_model(args, parser.error)
    if args.out is None:
        name = f"{Path(args.model_name_or_config).stem}_b{args.n_batch}_s{args.seq_len}"
        args.out = str(Path("bench-out") / f"{name}_r{args.lora_r}_{precision_tag(args)}")
    return args


def build_models(
    args: argparse.Namespace, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The frozen base in --dtype (the floor's model) and the PEFT model on a copy of it.

    --dtype bf16 is PEFT's default setup: the base model built in bf16, then get_peft_model,
    which keeps lora_A/lora_B in fp32 unless --adapter_dtype says bf16.
    """
    spec = LoraSpec(args.lora_r, args.lora_alpha, args.lora_dropout, tuple(args.target_modules),
                    DTYPES[args.adapter_dtype])
    base = build_base(args.config, DTYPES[args.dtype], device, args.seed)
    return base, add_lora(base, spec, args.seed)


def prepare(args: argparse.Namespace, device: torch.device) -> list[Runner]:
    """One frozen base, one PEFT model; each variant gets its own copy of the same weights."""
    base, peft_model = build_models(args, device)
    batch = make_batch(args.config.vocab_size, args.n_batch, args.seq_len, device, args.seed)
    runners = []
    for name in args.variants:
        variant = Variant(name)
        if name == "floor":
            model = make_floor(base, args.target_modules)
        else:
            model = copy.deepcopy(peft_model)
        runnable, backend = compile_variant(variant, model, args.inner, args.runlora_options)
        runners.append(Runner(variant, fb_step(runnable, batch), state_storages(model), backend))
    return runners


@dataclass
class Measured:
    runners: list[Runner]  # the variants that ran, in order
    skipped: list[str]  # variants left out to respect --time_limit
    recompiles: int  # graphs compiled during the timed rounds (0 unless a guard failed)


def run(args: argparse.Namespace) -> Measured:
    """Compile and warm up, measure memory, then the interleaved timed rounds."""
    from tqdm import tqdm

    device = torch.device(args.device)
    limit = TimeLimit(args.time_limit, start=STARTED)
    runners = prepare(args, device)
    ready: list[Runner] = []
    skipped: list[str] = []
    count = len(runners)
    with tqdm(total=2 * count + args.min_rounds, unit="task", file=sys.stderr) as bar:
        for runner in runners:
            bar.set_description(f"compile {runner.variant.name}")
            if ready and not limit.fits_compile(max(r.compile_s for r in ready)):
                skipped.append(runner.variant.name)
            else:
                warm_up(runner, device)
                ready.append(runner)
            bar.update()
        for runner in ready:
            bar.set_description(f"memory {runner.variant.name}")
            measure_memory(runner, device, args.profile_memory)
            bar.update()
        reps = steps_per_round(ready, ROUND_TARGET_S)
        run_time = min(args.min_run_time, max(0.0, limit.left()))
        round_s = reps * sum(r.warm_step_s for r in ready)
        bar.total = bar.n + max(args.min_rounds, math.ceil(run_time / round_s))
        bar.set_description("timed rounds")

        def on_round(rounds: int, elapsed: float) -> None:
            bar.total = max(bar.total, bar.n + 1 + (elapsed < run_time))
            bar.update()

        graphs = counters["stats"]["unique_graphs"]
        interleaved_rounds(ready, device, run_time, args.min_rounds, reps, on_round)
        recompiles = counters["stats"]["unique_graphs"] - graphs
        bar.total = bar.n
    for runner in ready:
        runner.reps = reps
    return Measured(ready, skipped, recompiles)


def notes_for(args: argparse.Namespace, measured: Measured, rows: list[dict]) -> list[str]:
    from bench_report import memory_kind, plan_summary

    device = torch.device(args.device)
    first = rows[0]
    notes = [
        f"Memory for F-B loop: {memory_kind(device.type)}. Speedups are paired ratios: per round "
        f"variant / baseline, median over {first['rounds']} interleaved rounds of "
        f"{first['steps_per_round']} step(s) per variant. LoRA overhead recovered = "
        "(PEFT+Inductor − variant) / (PEFT+Inductor − floor).",
        f"Target modules: {' '.join(args.target_modules)}; alpha {args.lora_alpha:g}, dropout "
        f"{args.lora_dropout:g}, runlora inner compiler {args.inner}"
        + (f", runlora --options {options_text(args)}." if args.runlora_options else "."),
    ]
    precision = precision_note(args)
    if precision:
        notes.append(precision)
    if device.type == "cpu" and args.profile_memory:
        peaks = ", ".join(f"{r['label']} {r['profiler_peak_mb']:.1f}" for r in rows)
        notes.append(f"Profiler peak per step, MB: {peaks}.")
    runners = measured.runners
    notes += plan_summary(runners)
    if measured.skipped:
        notes.append(f"Skipped to keep within --time_limit {args.time_limit:g} s: "
                     f"{', '.join(measured.skipped)}.")
    if measured.recompiles:
        notes.append(f"WARNING: {measured.recompiles} graph(s) compiled during the timed rounds; "
                     "their times include compilation.")
    losses = {r.variant.label: r.first_loss for r in runners if r.variant.name != "floor"}
    if len(losses) > 1 and args.lora_dropout == 0:
        spread = max(losses.values()) - min(losses.values())
        tolerance = (1e-3 if args.dtype == "fp32" else 5e-2) * max(1.0, *map(abs, losses.values()))
        verdict = "agree" if spread <= tolerance else "DISAGREE"
        notes.append(f"First-step losses of the LoRA variants {verdict}: spread {spread:.2e} "
                     f"({', '.join(f'{k} {v:.5f}' for k, v in losses.items())}).")
    return notes


def options_text(args: argparse.Namespace) -> str:
    return json.dumps(args.runlora_options, sort_keys=True) if args.runlora_options else ""


def write_outputs(args: argparse.Namespace, title: str, rows: list[dict], report: str) -> None:
    """<out>.csv (rows + the run's settings), <out>.md (the printed report), <out>.png."""
    from bench_report import write_chart, write_csv

    run_info = {"model": args.model_name_or_config, "n_batch": args.n_batch,
                "seq_len": args.seq_len, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
                "lora_dropout": args.lora_dropout, "dtype": args.dtype,
                "adapter_dtype": args.adapter_dtype, "device": args.device,
                "threads": args.threads, "inner": args.inner, "options": options_text(args),
                "target_modules": " ".join(args.target_modules)}
    paths = {ext: Path(f"{args.out}.{ext}") for ext in ("csv", "md", "png")}  # 1.3b: no suffix
    paths["csv"].parent.mkdir(parents=True, exist_ok=True)
    write_csv(paths["csv"], rows, run_info)
    paths["md"].write_text(report)
    write_chart(paths["png"], title, rows)
    print(f"wrote {', '.join(map(str, paths.values()))}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(f"no arguments: running the default job {' '.join(DEFAULT_JOB)}", flush=True)
        argv = DEFAULT_JOB
    args = parse_args(argv)
    from bench_report import markdown_report, rows_for

    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.reset()
    device = torch.device(args.device)
    stem = Path(args.model_name_or_config).stem
    cuda = device.type == "cuda"
    where = torch.cuda.get_device_name(device) if cuda else f"{args.threads} threads"
    title = (f"{stem} b={args.n_batch} s={args.seq_len} r={args.lora_r} "
             f"{precision_label(args)} on {device.type} ({where})")
    print(f"# {title}: variants {' '.join(args.variants)}, min_run_time {args.min_run_time:g} s",
          flush=True)

    measured = run(args)
    rows = rows_for(measured.runners, device.type)
    report = markdown_report(title, rows, notes_for(args, measured, rows))
    print(report, flush=True)
    write_outputs(args, title, rows, report)
    torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
