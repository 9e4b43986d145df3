"""The roofline criterion: a plan's time predicted from its counted steps and two device numbers.

    predicted(plan) = Σ over the program's steps of
                      launch + max(FLOPs / peak, bytes moved / bandwidth)

`peak` (FLOP/s of a large matmul in the site's matmul dtype), `bandwidth` (bytes/s of a large
elementwise add) and `launch` (seconds of a 1-element op: the fixed cost of one more kernel,
which decides between plans of small sites) are measured once per device and dtype and kept in
the measurement cache, so predicting costs nothing after the first run. Thin LoRA matmuls (one
side r) land on the bandwidth roof, which is what FLOPs alone misjudge.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

from runlora_fx.cache import MeasurementCache
from runlora_fx.cost import step_costs
from runlora_fx.measure import synchronize
from runlora_fx.program import Program
from runlora_fx.site import LoraSite

log = logging.getLogger("runlora_fx")


@dataclass(frozen=True)
class DeviceModel:
    peak_flops: float  # FLOP/s
    bandwidth: float  # bytes/s
    launch: float = 0.0  # seconds per step

    def seconds(self, flops: int, bytes_moved: int) -> float:
        return self.launch + max(flops / self.peak_flops, bytes_moved / self.bandwidth)


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
    return DeviceModel(
        peak_flops=2 * size**3 / mm_s,
        bandwidth=3 * numel * x.itemsize / add_s,
        launch=launch_s,
    )


def device_model(
    device: torch.device, dtype: torch.dtype, cache: MeasurementCache
) -> DeviceModel:
    key = {"dtype": str(dtype)}
    hit = cache.get("calibration", key)
    if isinstance(hit, dict) and set(hit) == {"peak_flops", "bandwidth", "launch"}:
        return DeviceModel(**hit)
    log.info("runlora: calibrating the roofline for %s %s (once; cached)", device, dtype)
    model = measure_device(device, dtype)
    log.info("runlora: peak %.3g FLOP/s, bandwidth %.3g B/s, launch %.3g s",
             model.peak_flops, model.bandwidth, model.launch)
    cache.put("calibration", key, asdict(model))
    return model


def predicted_seconds(program: Program, site: LoraSite, model: DeviceModel) -> float:
    return sum(model.seconds(s.flops, s.bytes_moved) for s in step_costs(program, site))
