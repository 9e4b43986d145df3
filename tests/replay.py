"""The dropout masks a sparse-dropout program draws, replayed from the seed it was run under.

A program's `seed` steps draw from torch's generator in forward order, and each `positions`
step is a pure function of its seed (runlora_fx/dropout.py): so under `torch.manual_seed(s)`
the positions a run drew can be drawn again here, for a dense reference with the same mask.
`RecordRunloraOps` counts the runlora ops a run dispatches.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from runlora_fx.ir.dropout import capacity, draw_seed, dropped_positions
from runlora_fx.ir.program import Program


def replayed_positions(program: Program, seed: int, numel: int) -> dict[str, torch.Tensor]:
    """Each positions step's result (by name) for a forward run after torch.manual_seed(seed)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        seeds = {s.out: draw_seed(torch.empty(0), s.out) for s in program.forward if s.op == "seed"}
    buffers = {s.out: dropped_positions(seeds[s.args[0]], numel, s.p, capacity(numel, s.p),
                                        torch.device("cpu"))
               for s in program.forward if s.op == "positions"}
    return {name: buffer[: int(buffer[-1])] for name, buffer in buffers.items()}


def keep_mask(positions: torch.Tensor, shape: tuple[int, ...], p: float,
              dtype: torch.dtype) -> torch.Tensor:
    """The scaled keep mask m/q with the given dropped positions."""
    mask = torch.ones(shape, dtype=dtype).reshape(-1)
    mask[positions.long()] = 0
    return mask.reshape(shape) / (1 - p)


class RecordRunloraOps(TorchDispatchMode):
    """Counts every runlora op dispatched, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "runlora":
            self.calls[func._opname] += 1
        return func(*args, **(kwargs or {}))
