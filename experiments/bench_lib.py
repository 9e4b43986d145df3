"""The benchmark's machinery: variants, models, steps, memory probes and the interleaved timer.

`model_exp.py` is the CLI; this file holds what it runs (docs/benchmarks.md). Every variant
trains the very same weights on the very same batch: one PEFT model is built and deep-copied,
because PEFT initialises lora_A from the global RNG.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from torch import nn

from runlora_fx import Backend

VARIANT_KINDS = ("peft", "peft+inductor", "floor")  # plus runlora:<criterion>
# runlora with options of its own: runlora-unshared:<criterion> plans without GEMM sharing
# (the plans before x·[W; A]ᵀ, dy·[W | s·B] and q/k/v groups existed)
RUNLORA_KINDS = {"runlora": {}, "runlora-unshared": {"fusions": False}}


@dataclass(frozen=True)
class Variant:
    """An implementation in the table: `peft`, `peft+inductor`, `floor`, `runlora:<criterion>`,
    `runlora-unshared:<criterion>`."""

    name: str

    @property
    def kind(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def criterion(self) -> str | None:
        return self.name.split(":", 1)[1] if self.kind in RUNLORA_KINDS else None

    @property
    def options(self) -> dict[str, Any]:
        return dict(RUNLORA_KINDS.get(self.kind, {}))

    @property
    def label(self) -> str:
        labels = {"peft": "PEFT", "peft+inductor": "PEFT+Inductor", "floor": "Floor+Inductor"}
        unshared = ", no GEMM sharing" if self.kind == "runlora-unshared" else ""
        return labels.get(self.name) or f"RunLoRA ({self.criterion}{unshared})"


def variant_error(name: str, criteria: Sequence[str]) -> str | None:
    """Why `name` is not a variant, or None when it is."""
    if name in VARIANT_KINDS:
        return None
    kind, _, criterion = name.partition(":")
    if kind in RUNLORA_KINDS and criterion:
        if criterion in criteria:
            return None
        return f"unknown criterion {criterion!r} in variant {name!r}; valid: {', '.join(criteria)}"
    valid = [*VARIANT_KINDS, *(f"runlora:{c}" for c in criteria)]
    return (f"unknown variant {name!r}; valid: {', '.join(valid)} (and runlora-unshared:<c>, "
            "without GEMM sharing)")


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    # lora_A/lora_B's dtype: fp32 (PEFT's default for any base) or the base model's dtype
    adapter_dtype: torch.dtype = torch.float32


def is_target(path: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for a list of names: a module is targeted when its path ends with one."""
    return any(path == t or path.endswith("." + t) for t in targets)


def missing_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Target names that match no module of `model`."""
    paths = [path for path, _ in model.named_modules()]
    return [t for t in targets if not any(is_target(path, [t]) for path in paths)]


def build_base(config, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Module:
    """The frozen base model, random weights from `seed`, in train mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with device:  # initialise on the device: a 1.3b model inits slowly on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    model.to(device).train()
    model.requires_grad_(False)
    return model


def add_lora(base: nn.Module, spec: LoraSpec, seed: int) -> nn.Module:
    """A PEFT LoRA model on a copy of `base`; lora_B is drawn non-zero so the branch is live.

    Adapters in fp32 are PEFT's default (`get_peft_model(..., autocast_adapter_dtype=True)`):
    on a bf16/fp16 base PEFT keeps lora_A/lora_B in fp32, casts each branch's input to fp32 and
    the branch's result back to the base dtype. Adapters in the base dtype are the pure 16-bit
    setup (`autocast_adapter_dtype=False`). lora_B is drawn in fp32 and then cast, so the pure
    setup's adapters are the PEFT default's rounded to the base dtype.
    """
    from peft import LoraConfig, get_peft_model

    base_dtype = next(base.parameters()).dtype
    if spec.adapter_dtype not in (torch.float32, base_dtype):
        raise ValueError(f"adapters in {spec.adapter_dtype} on a {base_dtype} base: PEFT keeps "
                         "adapters in fp32 or in the base model's dtype")
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed + 1)
    autocast = spec.adapter_dtype == torch.float32
    model = get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=autocast)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # fp32 draw: the same values whatever the adapter dtype
                param.copy_(torch.empty(param.shape, dtype=torch.float32).normal_(0.0, 0.02))
    wrong = {p.dtype for n, p in model.named_parameters() if "lora_" in n} - {spec.adapter_dtype}
    if wrong:
        raise RuntimeError(f"PEFT built adapters in {', '.join(map(str, wrong))}, not "
                           f"{spec.adapter_dtype} (autocast_adapter_dtype={autocast})")
    model.train()
    return model


class GradAnchor(nn.Module):
    """Makes the floor's gradients start where a LoRA step's do.

    In a LoRA step the first tensors that need a gradient are the outputs of the first adapted
    linears (layer 0's q/k/v when attention is targeted); their inputs do not. The floor has no
    adapters, so each target linear whose input needs no grad adds a zero scalar that does: from
    there on the backward computes input grads through every layer and no weight grads, and skips
    the same dx the LoRA step skips. Its cost is one fused add and one sum of dy per such linear.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.zero = nn.Parameter(torch.zeros((), dtype=dtype, device=device))

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if inputs[0].requires_grad:
            return None
        return output + self.zero


def make_floor(base: nn.Module, targets: Sequence[str]) -> nn.Module:
    """`base` itself (frozen, no adapters) with a GradAnchor on its target linears."""
    param = next(base.parameters())
    anchor = GradAnchor(param.dtype, param.device)
    base.runlora_grad_anchor = anchor  # a submodule, so zero_grad() clears its grad
    for path, module in base.named_modules():
        if is_target(path, targets):
            module.register_forward_hook(anchor.hook)
    return base


def runlora_options(criterion: str, inner: str, extra: Mapping[str, Any] | None = None) -> dict:
    """A runlora variant's backend options: `extra` (the CLI's --options) plus its criterion."""
    return {**(extra or {}), "criterion": criterion, "inner": inner}


def compile_variant(
    variant: Variant, model: nn.Module, inner: str, extra: Mapping[str, Any] | None = None
) -> tuple[nn.Module, Backend | None]:
    """The callable a variant runs, and the runlora backend whose reports it fills (or None).

    `extra`: more runlora backend options (the CLI's --options), for the runlora variants only.
    """
    if variant.name == "peft":
        return model, None
    if variant.criterion is None:  # peft+inductor, floor
        return torch.compile(model, dynamic=False), None
    backend = Backend(runlora_options(variant.criterion, inner, {**variant.options,
                                                                  **(extra or {})}))
    return torch.compile(model, backend=backend, dynamic=False), backend


# ---------------------------------------------------------------- steps


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor


def make_batch(
    vocab_size: int, n_batch: int, seq_len: int, device: torch.device, seed: int
) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (n_batch, seq_len), generator=generator)
    return Batch(ids.to(device), ids.clone().to(device))


def fb_step(model: nn.Module, batch: Batch) -> Callable[[], torch.Tensor]:
    """The forward+backward loop body: forward with labels, backward, grads set to None."""

    def step() -> torch.Tensor:
        loss = model(input_ids=batch.input_ids, labels=batch.labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- memory


def state_storages(model: nn.Module) -> set[int]:
    """Storage addresses of the model's parameters and buffers (not activations)."""
    tensors = [*model.parameters(), *model.buffers()]
    return {t.untyped_storage().data_ptr() for t in tensors}


def saved_activation_bytes(step: Callable[[], torch.Tensor], exclude: set[int]) -> int:
    """Bytes saved for backward in one step, deduplicated by storage, weights excluded.

    `saved_tensors_hooks` sees what eager autograd and compiled regions save alike
    (docs/benchmarks.md, "How it measures").
    """
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address and address not in exclude:
            seen.setdefault(address, storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(seen.values())


def profiler_peak_bytes(step: Callable[[], torch.Tensor]) -> int | None:
    """Peak of CPU bytes allocated during one step, over those live before it (None: no events).

    torch 2.13 has no CPU allocator stats; the profiler's "[memory]" events carry every
    allocation (+) and free (−), so the running sum's maximum is the step's peak
    (docs/benchmarks.md, "How it measures").
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    if not events:
        return None
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


# ---------------------------------------------------------------- timing


@dataclass
class TimeLimit:
    """`--time_limit`: skip a variant whose compile would not fit, cut the rounds short.

    A variant is compiled only when, after a compile as long as the longest so far, a reserve
    (15 % of the limit, at least 10 s) is still left for the memory step and the rounds.
    """

    seconds: float | None  # None: no limit
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.perf_counter() - self.start)

    def fits_compile(self, longest_compile_s: float) -> bool:
        if self.seconds is None:
            return True
        return self.left() - longest_compile_s > max(0.15 * self.seconds, 10.0)


@dataclass
class Runner:
    """A variant ready to run: its step, and what was measured about it."""

    variant: Variant
    step: Callable[[], torch.Tensor]
    storages: set[int]
    backend: Backend | None = None
    compile_s: float = float("nan")
    first_loss: float = float("nan")
    warm_step_s: float = float("nan")
    saved_bytes: int | None = None
    profiler_peak: int | None = None
    cuda_peak: int | None = None  # bytes allocated above the loop's start, max over rounds
    reps: int = 1  # steps per timed segment
    times: list[float] = field(default_factory=list)  # seconds per step, one per round


def warm_up(runner: Runner, device: torch.device, extra_steps: int = 2) -> None:
    """First call (compile + one step) timed apart, then `extra_steps` to settle caches."""
    synchronize(device)
    start = time.perf_counter()
    loss = runner.step()
    synchronize(device)
    runner.compile_s = time.perf_counter() - start
    runner.first_loss = float(loss)
    start = time.perf_counter()
    for _ in range(extra_steps):
        runner.step()
    synchronize(device)
    runner.warm_step_s = (time.perf_counter() - start) / max(extra_steps, 1)


def measure_memory(runner: Runner, device: torch.device, profile: bool) -> None:
    runner.saved_bytes = saved_activation_bytes(runner.step, runner.storages)
    if profile and device.type == "cpu":
        runner.profiler_peak = profiler_peak_bytes(runner.step)


def steps_per_round(runners: Sequence[Runner], target_s: float) -> int:
    """Steps per variant per round so that the fastest variant runs about `target_s` a round."""
    fastest = min(r.warm_step_s for r in runners)
    return max(1, round(target_s / fastest)) if fastest > 0 else 1


def timed_segment(runner: Runner, reps: int, device: torch.device) -> float:
    """Mean seconds per step over `reps` consecutive steps; on CUDA also the peak memory."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        runner.step()
    synchronize(device)
    elapsed = (time.perf_counter() - start) / reps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
        runner.cuda_peak = max(runner.cuda_peak or 0, peak)
    return elapsed


def interleaved_rounds(
    runners: Sequence[Runner],
    device: torch.device,
    min_run_time: float,
    min_rounds: int,
    reps: int,
    on_round: Callable[[int, float], None] = lambda rounds, elapsed: None,
) -> int:
    """Rounds of every variant in turn (order rotated each round) until `min_run_time` passes."""
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or time.perf_counter() - start < min_run_time:
        gc.collect()
        shift = rounds % len(runners)
        for runner in [*runners[shift:], *runners[:shift]]:
            runner.times.append(timed_segment(runner, reps, device))
        rounds += 1
        on_round(rounds, time.perf_counter() - start)
    return rounds


# ---------------------------------------------------------------- statistics


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def paired_ratio(times: Sequence[float], baseline: Sequence[float]) -> float:
    """Median over rounds of (variant / baseline) in the same round."""
    return statistics.median(t / b for t, b in zip(times, baseline))


def parse_device(text: str, error: Callable[[str], NoReturn]) -> torch.device:
    """A CLI's --device: cpu or an available cuda device, else `error` (argparse's, exit 2)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        error(f"--device {text!r} is not a device; use cpu or cuda")
    if device.type not in ("cpu", "cuda"):
        error(f"--device {text!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        error(f"--device {text}: CUDA is not available in this torch ({torch.__version__})")
    return device
