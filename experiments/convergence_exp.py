"""bf16 LoRA training, PEFT's default setup: does runlora converge like PEFT? (issue 11, item 5)

A small Llama (default configs/llama_9m.json, vocab 256, random init from --seed) with LoRA on
all 7 Llama target modules (lora_B = 0, as PEFT initialises it) is trained with AdamW on text any
Python install has: the standard library's sources and docs (*.py, *.rst, *.txt, sorted by path)
as bytes, no tokenizer; the tail of the stream is the validation text. Every variant starts from
the very same weights (built once, then copied) and sees the same batches:

  fp32                fp32 model, fp32 adapters, PEFT eager: the reference
  peft-bf16           PEFT's default: base cast to bf16, adapters kept in fp32, eager
  runlora-nearest     that model under torch.compile(backend="runlora") with options
                      {"merge_rounding": "nearest"} + --options
  runlora-stochastic  the same with {"merge_rounding": "stochastic"}
  runlora             (not in the default list) the same with --options only
  peft-autocast, runlora-autocast-nearest, runlora-autocast-stochastic
                      (not in the default list) the fp32 model under torch.autocast(bf16):
                      the setup where runlora's measured precision rule lets it merge (with
                      either rounding), compared with peft-autocast

The base (--base): "random" (transformers' init, every linear ~ normal(0, 0.02): what the
committed 300-step run used, where the variants differ by ~1.5e-3 nats of rounding noise);
"linear-init" (every nn.Linear re-drawn by its own reset_parameters, U(±1/√d_in): the W
distribution where runlora's merge check refuses merging); "pretrained" (the case LoRA exists
for: the random base trained in fp32 for --pretrain_steps on the first half of the training
text, cached under --cache_dir keyed by config, text, steps, batch and seed, then LoRA
fine-tuned on the second half). Each runlora variant's note says what the merge check of every
site's frozen W decided (runlora_fx/merge_check.py).

Figure of merit (issue 11, "Done means"): per variant, the mean over the last 100 steps of
|train loss - fp32's train loss on the same batch|, and its ratio to PEFT's in the same setup
(peft-bf16's, or peft-autocast's; runlora passes at <= 1.5). Validation loss: the variant's weights, its module run eagerly under no_grad.

Cost, on the project's 2-core AVX2 CPU shared with other jobs (load 4-6; bf16 matmuls are
emulated there, ~40x slower than fp32), b 4 x s 128, one thread: median s/step fp32 0.31,
peft-bf16 1.65, runlora 0.75-1.2 after a first step of 160 s (the compile; the second runlora
variant's took 22 s). Two threads on the shared machine made a bf16 eager step 13x slower
(13.8 s vs 1.0 s: the threads wait on each other), hence --threads 1. The default run

    python experiments/convergence_exp.py

(300 steps x 4 variants) took 24 min there; allow 30-40 when the machine is busier.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "llama_9m.json"
DEFAULT_OUT = REPO / "experiments" / "results" / "convergence_cpu"
DEFAULT_CACHE = REPO / "experiments" / ".cache"  # pretrained bases (git-ignored)
BASES = {  # --base: the frozen weights LoRA trains on
    "random": "random init, transformers' _init_weights (every linear ~ normal(0, 0.02))",
    "linear-init": "random init, every nn.Linear re-drawn by its own reset_parameters "
                   "(U(±1/√d_in), nn.Linear's init)",
    "pretrained": "trained in fp32 on the first half of the training text, then LoRA "
                  "fine-tuned on the second half (held apart)",
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VOCAB = 256  # byte-level tokens
# runlora's options per variant (None: not compiled); --options is merged into each runlora one
VARIANTS: dict[str, dict[str, object] | None] = {
    "fp32": None, "peft-bf16": None, "runlora-nearest": {"merge_rounding": "nearest"},
    "runlora-stochastic": {"merge_rounding": "stochastic"}, "runlora": {},
    # the fp32 model under torch.autocast(bf16): where the precision rule lets runlora merge
    "peft-autocast": None, "runlora-autocast-nearest": {"merge_rounding": "nearest"},
    "runlora-autocast-stochastic": {"merge_rounding": "stochastic"}}
DEFAULT_VARIANTS = ["fp32", "peft-bf16", "runlora-nearest", "runlora-stochastic"]
REFERENCE, BASELINE = "fp32", "peft-bf16"
AUTOCAST_BASELINE = "peft-autocast"


def uses_autocast(name: str) -> bool:
    return "autocast" in name


def baseline_of(name: str) -> str:
    return AUTOCAST_BASELINE if uses_autocast(name) else BASELINE
LAST = 100  # steps the figure of merit averages over
PASS_RATIO = 1.5
ONE, FINITE = (lambda v: v >= 1, ">= 1"), (lambda v: math.isfinite(v) and v > 0, "finite, > 0")
ANY = (lambda v: True, "")
NUMBERS = [  # flag, type, default, (check, what it requires), help
    ("steps", int, 300, ONE, "AdamW steps per variant"),
    ("n_batch", int, 4, ONE, "windows per batch"),
    ("seq_len", int, 128, (lambda v: v >= 2, ">= 2"), "bytes per window"),
    ("lr", float, 1e-3, FINITE, "AdamW learning rate (constant)"),
    ("lora_r", int, 8, ONE, "LoRA rank"),
    ("lora_alpha", float, 16.0, FINITE, "LoRA alpha (scale alpha/r)"),
    ("lora_dropout", float, 0.0, (lambda v: 0 <= v < 1, "in [0, 1)"), "LoRA branch dropout"),
    ("seed", int, 0, ANY, "seed of the weights, the batches and each variant's run"),
    ("pretrain_steps", int, 3000, ONE, "--base pretrained: fp32 AdamW steps that train the base"),
    ("pretrain_lr", float, 1e-3, FINITE, "--base pretrained: their learning rate (constant)"),
    ("threads", int, 1, ONE, "torch CPU threads (1: see the module docstring)"),
    ("eval_every", int, 25, ONE, "validation loss every this many steps"),
    ("val_batches", int, 4, ONE, "validation batches (fixed windows)"),
    ("log_every", int, 10, ONE, "print progress every this many steps"),
    ("val_fraction", float, 0.05, (lambda v: 0 < v < 0.5, "in (0, 0.5)"),
     "tail of the byte stream held out for validation")]
TEXT_SUFFIXES = {".py", ".rst", ".txt"}
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # uint8 byte stream
    val: torch.Tensor
    files: int
    sha256: str  # of the whole stream


@dataclass
class Curve:
    variant: str
    note: str = ""  # runlora variants: what runlora did
    train: list[float] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train LoRA on a small Llama per variant (fp32, PEFT bf16, runlora bf16) "
        "and compare each loss curve with fp32's.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("-m", "--config", default=str(DEFAULT_CONFIG),
        help="Llama config JSON (vocab_size is set to 256, max_position_embeddings >= seq_len)")
    add("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
        help="variants to train, one after another; must include fp32 (the reference)")
    add("--options", default="{}", metavar="JSON",
        help="more runlora options, a JSON object merged into every runlora variant's options")
    for flag, kind, default, _, text in NUMBERS:
        add(f"--{flag}", type=kind, default=default, help=text)
    add("--data_dir", default=sysconfig.get_paths()["stdlib"],
        help="folder of text (*.py, *.rst, *.txt; site-packages and tests skipped)")
    add("--base", default="random", choices=list(BASES),
        help="the base: " + "; ".join(f"{k}: {v}" for k, v in BASES.items()))
    add("--cache_dir", default=str(DEFAULT_CACHE),
        help="where --base pretrained keeps the trained base (made once, then reused)")
    add("--dropout", dest="lora_dropout", type=float, default=argparse.SUPPRESS,
        help="the same as --lora_dropout")
    add("--seeds", nargs="+", type=int, default=None, metavar="SEED",
        help="run once per seed (each into OUT/seed<k>) and compare the variants' mean train "
             "loss over the last 100 steps across seeds (seeds_summary.md): with dropout the "
             "masks differ between implementations, so runlora passes when its mean is within "
             "one seed standard deviation of PEFT's")
    add("-o", "--out", default=str(DEFAULT_OUT), help="output folder")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parsed and checked arguments; any error exits 2 before anything is built."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, _, _, (valid, need), _ in NUMBERS:
        if not valid(getattr(args, name)):
            parser.error(f"--{name} must be {need}, got {getattr(args, name)}")
    if len(set(args.variants)) != len(args.variants):
        parser.error(f"--variants lists a variant twice: {' '.join(args.variants)}")
    if REFERENCE not in args.variants:
        parser.error(f"--variants must include {REFERENCE}, the reference of the comparison")
    args.options = parse_json_object(parser, args.options, "--options")
    args.model_config = load_config(parser, Path(args.config), args.seq_len)
    if not Path(args.data_dir).is_dir():
        parser.error(f"--data_dir {args.data_dir} is not a folder")
    for name in args.variants:
        check_options(parser, name, args.options)
    args.command = shlex.join(["python", "experiments/convergence_exp.py", *argv])
    return args


def check_options(parser: argparse.ArgumentParser, name: str, extra: dict) -> None:
    """runlora refuses bad options only when it compiles: ask it now, before any training."""
    if (own := VARIANTS[name]) is None:
        return
    if clash := sorted(set(own) & set(extra)):
        parser.error(f"--options sets {', '.join(clash)}, which variant {name} sets itself")
    from runlora_fx import parse_options

    try:
        parse_options(runlora_options(name, extra))
    except ValueError as err:
        parser.error(f"variant {name}: {err}")


def parse_json_object(parser: argparse.ArgumentParser, text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        parser.error(f"{what} is not valid JSON ({err}): {text!r}")
    if not isinstance(value, dict):
        parser.error(f"{what} must be a JSON object, got {text!r}")
    return value


def load_config(parser: argparse.ArgumentParser, path: Path, seq_len: int) -> dict:
    if not path.is_file():
        parser.error(f"--config {path} is not a file")
    config = parse_json_object(parser, path.read_text(), f"--config {path}")
    config["vocab_size"] = VOCAB
    config["max_position_embeddings"] = max(int(config.get("max_position_embeddings", 0)), seq_len)
    config["use_cache"] = False
    return config


def load_corpus(root: Path, val_fraction: float) -> Corpus:
    """The text files under `root`, sorted by path, joined by newlines; the tail is validation."""
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in SKIP_DIRS]  # site-packages is huge
        files += [Path(folder, n) for n in names if Path(n).suffix in TEXT_SUFFIXES]
    files.sort(key=lambda p: p.relative_to(root).parts)
    stream = b"\n".join(p.read_bytes() for p in files)
    data = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    cut = int(len(data) * (1 - val_fraction))
    return Corpus(data[:cut], data[cut:], len(files), hashlib.sha256(stream).hexdigest())


def draw_windows(data: torch.Tensor, count: int, n_batch: int, seq_len: int,
                 gen: torch.Generator) -> torch.Tensor:
    """`count` batches of `n_batch` random windows of `seq_len` bytes: (count, n_batch, seq_len)."""
    if len(data) <= seq_len:
        print(f"convergence_exp.py: error: {len(data)} bytes of text, fewer than --seq_len "
              f"{seq_len} + 1 (a larger --data_dir or --val_fraction?)", file=sys.stderr)
        sys.exit(2)
    starts = torch.randint(0, len(data) - seq_len, (count, n_batch, 1), generator=gen)
    return data[starts + torch.arange(seq_len)]


def fine_tune_text(corpus: Corpus, base: str) -> torch.Tensor:
    """The bytes LoRA trains on: all the training text, or for a pretrained base the second
    half (the first half trained the base)."""
    return corpus.train[len(corpus.train) // 2:] if base == "pretrained" else corpus.train


def random_base(config: dict, args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    if args.base == "linear-init":
        torch.manual_seed(args.seed)
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()  # kaiming-uniform: U(±1/√d_in)
    return model


def pretrained_base(config: dict, args: argparse.Namespace,
                    corpus: Corpus) -> tuple[nn.Module, str]:
    """The base trained in fp32 on the first half of the training text, from the cache when a
    run with the same config, text, steps, batch and seed made it; and how it was made."""
    key = hashlib.sha256(json.dumps(
        [config, corpus.sha256, args.pretrain_steps, args.pretrain_lr, args.n_batch,
         args.seq_len, args.seed], sort_keys=True).encode()).hexdigest()[:16]
    path = Path(args.cache_dir).resolve() / f"pretrained_{key}.pt"
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    model = random_base(config, args)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state"])
        return model, f"{saved['note']}; read from {shown}"
    text = corpus.train[: len(corpus.train) // 2]
    gen = torch.Generator().manual_seed(args.seed + 2)
    batches = draw_windows(text, args.pretrain_steps, args.n_batch, args.seq_len, gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr)
    start, losses = time.perf_counter(), []
    model.train()
    for step, batch in enumerate(batches, start=1):
        loss = causal_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 250 == 0 or step == len(batches):
            print(f"[pretrain] step {step}/{len(batches)} loss "
                  f"{statistics.fmean(losses[-100:]):.4f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    note = (f"pretrained in fp32: {args.pretrain_steps} AdamW steps (lr {args.pretrain_lr}, "
            f"b {args.n_batch} x s {args.seq_len}) on the first half of the training text, "
            f"{(time.perf_counter() - start) / 60:.1f} min, train loss "
            f"{statistics.fmean(losses[:100]):.3f} -> {statistics.fmean(losses[-100:]):.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "note": note}, path)
    return model, f"{note}; cached at {shown}"


def make_base(config: dict, args: argparse.Namespace, corpus: Corpus) -> tuple[nn.Module, str]:
    """The frozen base LoRA trains on (--base), and how it was made."""
    if args.base == "pretrained":
        return pretrained_base(config, args, corpus)
    return random_base(config, args), BASES[args.base]


def build_models(base: nn.Module, args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    """The fp32 PEFT model, and PEFT's default on the bf16-cast base with the same adapters."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=list(TARGETS))
    torch.manual_seed(args.seed + 1)
    fp32 = get_peft_model(copy.deepcopy(base), lora)  # lora_B = 0, as PEFT initialises it
    bf16 = get_peft_model(copy.deepcopy(base).to(torch.bfloat16), lora)
    adapters = {k: v for k, v in fp32.state_dict().items() if "lora_" in k}
    result = bf16.load_state_dict(adapters, strict=False)
    if result.unexpected_keys or not adapters:
        raise RuntimeError(f"adapters do not match: {result.unexpected_keys[:3]}")
    dtypes = {p.dtype for n, p in bf16.named_parameters() if "lora_" in n}
    if dtypes != {torch.float32}:
        raise RuntimeError(f"PEFT's default keeps bf16 models' adapters in fp32, found {dtypes}")
    return fp32.train(), bf16.train()


def runlora_options(name: str, extra: dict) -> dict | None:
    return None if VARIANTS[name] is None else {**extra, **VARIANTS[name]}


def make_variant(name: str, fp32: nn.Module, bf16: nn.Module,
                 extra: dict) -> tuple[nn.Module, nn.Module, object | None]:
    """(module to train, its eager self for validation, runlora's backend or None).

    Backend(options) is what backend="runlora" builds; holding it keeps its reports."""
    module = copy.deepcopy(fp32 if name == REFERENCE or uses_autocast(name) else bf16)
    options = runlora_options(name, extra)
    if options is None:
        return module, module, None
    from runlora_fx import Backend

    backend = Backend(options)
    return torch.compile(module, backend=backend), module, backend


def runlora_note(backend: object) -> str:
    """What runlora did: sites rewritten, plans chosen, sites skipped, graphs that fell back."""
    try:
        reports = backend.reports
        decisions = [d for r in reports for d in r.decisions]
        plans = Counter((f"{len(d.sites)} sites as one: " if len(d.sites) > 1 else "")
                        + d.chosen.plan.describe() for d in decisions)
        skipped = Counter(s.reason for r in reports for s in r.skipped)
        failures = [r.failure for r in reports if r.failure]
    except Exception as err:  # noqa: BLE001 — never lose a long run's results to a report API
        return f"(runlora's report could not be read: {type(err).__name__}: {err})"
    text = f"{sum(len(d.sites) for d in decisions)} sites rewritten: " + (
        "; ".join(f"{n}x {plan}" for plan, n in plans.most_common()) or "none")
    checks = [s.merge_check for d in decisions for s in d.sites if s.merge_check is not None]
    if checks:
        refused = Counter(c.reason.split(": at ")[0] for c in checks if not c.legal)
        worst = min((f.kept - f.kept_peft for c in checks for f in c.figures), default=math.nan)
        text += (f"; merge check of the frozen W ({checks[0].rounding}): "
                 f"{sum(c.legal for c in checks)} of {len(checks)} sites may merge, worst kept "
                 f"share vs PEFT's {worst:+.3f}")
        text += "".join(f"; refused {n}x: {why}" for why, n in refused.most_common())
    text += "".join(f"; skipped {n}x: {why}" for why, n in skipped.most_common())
    return text + "".join(f"; FELL BACK to plain torch.compile: {f}" for f in failures)


def causal_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    ids = batch.long()
    return model(input_ids=ids, labels=ids).loss  # HF shifts the labels: next-byte loss


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor) -> float:
    return statistics.fmean(causal_loss(model, batch).item() for batch in windows)


def train(name: str, model: nn.Module, eval_model: nn.Module, batches: torch.Tensor,
          val: torch.Tensor, args: argparse.Namespace) -> Curve:
    torch.manual_seed(args.seed)  # stochastic rounding draws from torch's generator
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    curve = Curve(name, val=[(0, evaluate(eval_model, val))])
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=uses_autocast(name))
    for step, batch in enumerate(batches, start=1):
        start = time.perf_counter()
        with amp:
            loss = causal_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.step_s.append(time.perf_counter() - start)
        curve.train.append(loss.item())
        if step % args.eval_every == 0 or step == len(batches):
            curve.val.append((step, evaluate(eval_model, val)))
        if step == 1 or step % args.log_every == 0 or step == len(batches):
            recent = statistics.median(curve.step_s[-args.log_every:])
            print(f"[{name}] step {step}/{len(batches)} loss {curve.train[-1]:.4f} "
                  f"{recent:.2f} s/step (val {curve.val[-1][1]:.4f} @ {curve.val[-1][0]})",
                  flush=True)
    return curve


def abs_diffs(curve: Curve, reference: Curve) -> list[float]:
    return [abs(a - b) for a, b in zip(curve.train, reference.train)]


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def write_csv(path: Path, column: str, rows: list[tuple[int, str, float]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "variant", column])
        writer.writerows((step, name, f"{value:.6f}") for step, name, value in rows)


def plot(out: Path, curves: list[Curve]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, min(20, len(curves[0].train) // 10))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for c, style in zip(curves, itertools.cycle(["-", "--", "-.", ":", (0, (5, 1))])):
        steps = range(1, len(c.train) + 1)
        line, = left.plot(steps, smooth(c.train, window), ls=style, label=f"{c.variant} (train)")
        left.plot(*zip(*c.val), "o", color=line.get_color(), ms=3)
        if c.variant != REFERENCE:
            right.plot(steps, smooth(abs_diffs(c, curves[0]), window), ls=style,
                       label=c.variant, color=line.get_color())
    n = len(curves[0].train)
    right.axvspan(max(0, n - LAST) + 0.5, n + 0.5, color="grey", alpha=0.1, label="averaged")
    left.set(xlabel="step", ylabel="loss (nats/byte)",
             title=f"train loss (moving mean of {window}); o: validation")
    right.set(xlabel="step", ylabel="|loss - fp32 loss|", yscale="log",
              title=f"distance from fp32 on the same batch (moving mean of {window})")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


# With dropout the per-step distance to fp32 compares different masks: the per-seed table can't judge.
MASKS_NOTE = ("With LoRA dropout runlora draws its own dropped positions (sparse dropout), so its "
              "masks differ from those of PEFT and fp32: the distance to fp32 above measures "
              "different masks, not rounding. The bar is across seeds (`--seeds`, "
              "seeds_summary.md): runlora's mean train loss within one seed standard deviation "
              "of PEFT's.")


def summary(curves: list[Curve], corpus: Corpus, args: argparse.Namespace, wall_s: float) -> str:
    ref = curves[0]
    diffs = {c.variant: statistics.fmean(abs_diffs(c, ref)[-LAST:]) for c in curves}
    n = min(LAST, args.steps)
    lines = [
        "# LoRA convergence in bf16: runlora vs PEFT, against fp32", "",
        f"{args.steps} AdamW steps (lr {args.lr}), b {args.n_batch} x s {args.seq_len} bytes, "
        f"LoRA r {args.lora_r} alpha {args.lora_alpha} dropout {args.lora_dropout} on "
        f"{', '.join(TARGETS)}; config {Path(args.config).name} (vocab 256), seed {args.seed}; "
        f"runlora --options {json.dumps(args.options)}. Total {wall_s / 60:.1f} min.", "",
        f"Base (--base {args.base}): {getattr(args, 'base_note', BASES[args.base])}.", "",
        f"| variant | mean \\|loss - fp32\\| (last {n}) | ratio to PEFT's (same setup) | "
        f"<= {PASS_RATIO}x | train loss (last {n}) | final val loss | s/step (median) | "
        "first step s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in curves:
        base = diffs.get(baseline_of(c.variant))
        ratio = diffs[c.variant] / base if base and c.variant != REFERENCE else math.nan
        shown = "-" if math.isnan(ratio) else f"{ratio:.3f}"
        verdict = "" if c.variant in (REFERENCE, BASELINE, AUTOCAST_BASELINE) or math.isnan(
            ratio) else (
            "yes" if ratio <= PASS_RATIO else "no")
        lines.append(
            f"| {c.variant} | {diffs[c.variant]:.3e} | {shown} | {verdict} | "
            f"{statistics.fmean(c.train[-LAST:]):.4f} | {c.val[-1][1]:.4f} | "
            f"{statistics.median(c.step_s[1:] or c.step_s):.3f} | {c.step_s[0]:.2f} |")
    import peft
    import transformers

    notes = [f"- {c.variant}: {c.note}" for c in curves if c.note]
    if args.lora_dropout > 0:
        lines += ["", MASKS_NOTE]
    lines += [
        "", *(["What runlora did:", "", *notes, ""] if notes else []),
        "Command:", "", f"    {args.command}", "", "Environment:", "",
        f"- torch {torch.__version__}, peft {peft.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}, runlora-fx {git_state()}",
        f"- CPU: {platform.machine()}, capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        f"- text: {corpus.files} files under {args.data_dir}, {len(corpus.train)} train + "
        f"{len(corpus.val)} validation bytes, sha256 {corpus.sha256[:16]}", ""]
    return "\n".join(lines)


def git_state() -> str:
    """The repository's commit, and whether the working tree differs from it."""
    git = ["git", "-C", str(REPO)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(not a git checkout)"
    return f"git {head}" + (" + uncommitted changes" if dirty else "")


def write_outputs(out: Path, curves: list[Curve], text: str) -> None:
    """curves.csv, val.csv and summary.md (curves.png is drawn once, at the end)."""
    write_csv(out / "curves.csv", "train_loss",
              [(i, c.variant, v) for c in curves for i, v in enumerate(c.train, start=1)])
    write_csv(out / "val.csv", "val_loss", [(i, c.variant, v) for c in curves for i, v in c.val])
    (out / "summary.md").write_text(text)


def run(args: argparse.Namespace) -> Path:
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(Path(args.data_dir), args.val_fraction)
    gen = torch.Generator().manual_seed(args.seed)
    batches = draw_windows(fine_tune_text(corpus, args.base), args.steps, args.n_batch,
                           args.seq_len, gen)
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same windows for any --steps
    val = draw_windows(corpus.val, args.val_batches, args.n_batch, args.seq_len, gen)
    print(f"text: {corpus.files} files, {len(corpus.train)} + {len(corpus.val)} bytes", flush=True)
    base, args.base_note = make_base(args.model_config, args, corpus)
    print(f"base: {args.base_note}", flush=True)
    fp32, bf16 = build_models(base, args)
    del base
    curves: list[Curve] = []
    try:
        for name in args.variants:
            model, eval_model, backend = make_variant(name, fp32, bf16, args.options)
            curves.append(train(name, model, eval_model, batches, val, args))
            if backend is not None:
                curves[-1].note = runlora_note(backend)
                print(f"[{name}] runlora: {curves[-1].note}", flush=True)
            del model, eval_model, backend
            torch._dynamo.reset()
            text = summary(curves, corpus, args, time.perf_counter() - started)
            write_outputs(out, curves, text)  # a later variant's failure keeps these
    finally:
        if curves:
            plot(out, curves)
    print(text, flush=True)
    return out


def seeds_summary(args: argparse.Namespace, outs: dict[int, Path]) -> str:
    """Per variant the mean train loss over the last steps of each seed's run; a runlora
    variant passes where its mean over seeds is within one seed sd of its PEFT baseline's."""
    means: dict[str, dict[int, float]] = {}
    for seed, out in outs.items():
        with open(out / "curves.csv") as f:
            rows = list(csv.DictReader(f))
        for name in args.variants:
            losses = [float(r["train_loss"]) for r in rows if r["variant"] == name]
            means.setdefault(name, {})[seed] = statistics.fmean(losses[-LAST:])
    lines = [f"# Mean train loss over the last {LAST} steps, per seed", "",
             f"`{args.command}`; LoRA dropout {args.lora_dropout}.", "",
             "| variant | " + " | ".join(f"seed {k}" for k in outs) + " | mean | sd | vs baseline |",
             "|---|" + "---|" * (len(outs) + 3)]
    for name, per in means.items():
        values = list(per.values())
        mean, sd = statistics.fmean(values), statistics.stdev(values)
        verdict = ""
        if VARIANTS[name] is not None:
            base = list(means[baseline_of(name)].values())
            gap, base_sd = abs(mean - statistics.fmean(base)), statistics.stdev(base)
            verdict = (f"|Δ| {gap:.4f} {'≤' if gap <= base_sd else '>'} {baseline_of(name)}'s "
                       f"sd {base_sd:.4f}: {'pass' if gap <= base_sd else 'FAIL'}")
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values)
                     + f" | {mean:.4f} | {sd:.4f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    args.variants = [REFERENCE] + [v for v in args.variants if v != REFERENCE]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if not args.seeds:
            return run(args)
        if len(args.seeds) < 2:
            raise SystemExit("--seeds needs two seeds at least (a standard deviation)")
        root, outs = Path(args.out), {}
        for seed in args.seeds:
            args.seed, args.out = seed, str(root / f"seed{seed}")
            outs[seed] = run(args)
        text = seeds_summary(args, outs)
        (root / "seeds_summary.md").write_text(text)
        print(text, flush=True)
        return root
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
