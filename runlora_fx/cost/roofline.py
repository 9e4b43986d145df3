"""The roofline criterion: a plan's time predicted from its counted steps and two device numbers.

    predicted(plan) = Σ over the program's steps (views excluded) of
                      launch + max(FLOPs / peak, bytes moved / bandwidth)
                    + GEMM calls · gemm_call + random draws · draw
                    (+ the graph's dropouts a plan reads, as cost.graph_dropout_cost counts)

`peak` (FLOP/s of a large matmul in the site's matmul dtype), `bandwidth` (bytes/s of a large
elementwise add) and `launch` (seconds of a 1-element op: the fixed cost of one more kernel,
which decides between plans of small sites) are measured in a hot loop. `gemm_call` is what a
thin GEMM costs beyond that inside a training step, where its operands come cold from memory:
measured over operands that do not fit the last-level cache, each read once, as in a step
(docs/choosing.md, "Roofline model": in a compiled CPU step thin GEMMs took several times
their hot-loop time).
All four are measured once per device and dtype and kept in the measurement cache, so
predicting costs nothing after the first run. Thin LoRA matmuls (one side r) land on the
bandwidth roof, which is what FLOPs alone misjudge, and their calls are what fusing saves.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields, replace

import torch

from runlora_fx.cost.cache import MeasurementCache
from runlora_fx.cost.cost import VIEWS, graph_dropout_cost, step_costs
from runlora_fx.cost.measure import synchronize
from runlora_fx.ir.plans import Plan
from runlora_fx.ir.program import Program, program_for
from runlora_fx.ir.site import SiteGroup
from runlora_fx.ir.steps import GEMMS

log = logging.getLogger("runlora_fx")


@dataclass(frozen=True)
class DeviceModel:
    peak_flops: float  # FLOP/s
    bandwidth: float  # bytes/s
    launch: float = 0.0  # seconds per step
    gemm_call: float = 0.0  # seconds a GEMM call costs in a step beyond its roofline time
    draw: float = 0.0  # seconds per random number drawn

    def seconds(self, flops: int, bytes_moved: int, gemm: bool = False) -> float:
        roof = max(flops / self.peak_flops, bytes_moved / self.bandwidth)
        return self.launch + roof + (self.gemm_call if gemm else 0.0)


def _best_seconds(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_device(device: torch.device, dtype: torch.dtype) -> DeviceModel:
    """Best of a few runs of a square matmul (peak), an out-of-cache add (bandwidth) and a
    1-element matmul (launch)."""
    size = 4096 if device.type == "cuda" else 1024
    a, b = (torch.ones(size, size, device=device, dtype=dtype) for _ in range(2))
    mm_s = _best_seconds(lambda: torch.mm(a, b), device, reps=5)
    numel = (64 if device.type == "cuda" else 16) * 2**20  # well past the last-level cache
    x, y, out = (torch.ones(numel, device=device, dtype=dtype) for _ in range(3))
    add_s = _best_seconds(lambda: torch.add(x, y, out=out), device, reps=5)
    one = torch.ones(1, 1, device=device, dtype=dtype)
    launch_s = min(_best_seconds(lambda: torch.mm(one, one), device, reps=50) for _ in range(3))
    noise = torch.empty(numel, device=device)
    rand_s = _best_seconds(lambda: torch.rand(numel, device=device, out=noise), device, reps=3)
    model = DeviceModel(
        peak_flops=2 * size**3 / mm_s,
        bandwidth=3 * numel * x.itemsize / add_s,
        launch=launch_s,
        draw=rand_s / numel,
    )
    return replace(model, gemm_call=_cold_gemm_call(device, dtype, model))


def _cold_gemm_call(device: torch.device, dtype: torch.dtype, model: DeviceModel) -> float:
    """Seconds a thin GEMM (N×d·d×r) costs beyond its roofline time when, as in a training
    step, each call reads an x that is not in cache: calls over distinct x's that together
    exceed the last-level cache, best of a few passes."""
    n, d, r, calls = 4096, 256, 8, 16  # 16 x's of 4 MiB (fp32): past a 32 MiB L3
    xs = [torch.randn(n, d, device=device).to(dtype) for _ in range(calls)]
    a = torch.randn(r, d, device=device).to(dtype)
    per_call = _best_seconds(lambda: [torch.mm(x, a.t()) for x in xs], device, reps=5) / calls
    roof = model.seconds(2 * n * d * r, (n * d + d * r + n * r) * xs[0].itemsize)
    return max(0.0, per_call - roof)


def device_model(
    device: torch.device, dtype: torch.dtype, cache: MeasurementCache
) -> DeviceModel:
    key = {"dtype": str(dtype)}
    hit = cache.get("calibration", key)
    if isinstance(hit, dict) and set(hit) == {f.name for f in fields(DeviceModel)}:
        return DeviceModel(**hit)
    log.info("runlora: calibrating the roofline for %s %s (once; cached)", device, dtype)
    model = measure_device(device, dtype)
    log.info("runlora: peak %.3g FLOP/s, bandwidth %.3g B/s, launch %.3g s, GEMM call %.3g s",
             model.peak_flops, model.bandwidth, model.launch, model.gemm_call)
    cache.put("calibration", key, asdict(model))
    return model


# The "priced" criterion's device: the roofline's formula on fixed, typical figures per device
# kind instead of a calibration, so the default choice is a pure function of the shapes —
# the same on every run, in tests and under a busy machine (a calibration taken while other
# work runs caches a GEMM call at 30 ms and a bandwidth at 2 GB/s, and every choice after it
# follows). CPU: 2–16 cores of an AVX2/AVX-512 server (a large fp32 GEMM at ~100 GFLOP/s, an
# out-of-cache add at ~15 GB/s, a thin GEMM ~50 µs dearer in a step than in a hot loop,
# docs/design.md §6; a Bernoulli draw ~7 ns). CUDA: an H100/H200 (dense bf16 ~600 TFLOP/s,
# fp32 without TF32 ~50 TFLOP/s, HBM ~3 TB/s, a launch ~5 µs, Philox draws at bandwidth).
NOMINAL: dict[tuple[str, bool], DeviceModel] = {  # (device type, 16-bit matmuls)
    ("cpu", False): DeviceModel(1.0e11, 1.5e10, launch=5e-6, gemm_call=5e-5, draw=7e-9),
    ("cpu", True): DeviceModel(1.0e11, 1.5e10, launch=5e-6, gemm_call=5e-5, draw=7e-9),
    ("cuda", False): DeviceModel(5.0e13, 3.0e12, launch=5e-6, draw=2e-12),
    ("cuda", True): DeviceModel(6.0e14, 3.0e12, launch=5e-6, draw=2e-12),
}


def nominal_model(device: str, dtype: torch.dtype) -> DeviceModel:
    """The fixed device model of `device`'s kind ("cpu", "cuda:0", …) for matmuls in `dtype`;
    another kind is priced as a CPU."""
    kind = torch.device(device).type
    return NOMINAL[(kind if kind == "cuda" else "cpu", dtype.itemsize < 4)]


def predicted_seconds(
    program: Program, unit: SiteGroup, model: DeviceModel
) -> float:
    return sum(
        model.seconds(s.flops, s.bytes_moved, gemm=s.step.op in GEMMS) + s.draws * model.draw
        for s in step_costs(program, unit) if s.step.op not in VIEWS
    )


def plan_seconds(plan: Plan, unit: SiteGroup, model: DeviceModel,
                 program: Program | None = None) -> float:
    """A plan's predicted time: its program's (`program`, built for any N; default: built
    here) and that of the graph dropouts it reads."""
    dropout = graph_dropout_cost(plan, unit)
    extra = dropout.bytes_moved / model.bandwidth + dropout.draws * model.draw if (
        dropout.draws) else 0.0
    program = program_for(plan, unit) if program is None else program
    return predicted_seconds(program, unit, model) + extra
