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


def predicted_seconds(
    program: Program, unit: SiteGroup, model: DeviceModel
) -> float:
    return sum(
        model.seconds(s.flops, s.bytes_moved, gemm=s.step.op == "mm") + s.draws * model.draw
        for s in step_costs(program, unit) if s.step.op not in VIEWS
    )


def plan_seconds(plan: Plan, unit: SiteGroup, model: DeviceModel) -> float:
    """A plan's predicted time: its program's and that of the graph dropouts it reads."""
    dropout = graph_dropout_cost(plan, unit)
    extra = dropout.bytes_moved / model.bandwidth + dropout.draws * model.draw if (
        dropout.draws) else 0.0
    return predicted_seconds(program_for(plan, unit), unit, model) + extra
