"""Uniforms that are a pure function of a seed held in a device tensor, drawn without reading it.

A torch.Generator takes its seed on the host: seeding one from a seed the step drew on a GPU
reads that seed back, a host sync per dropout site per step. SplitMix64 is counter based:
its k-th output is a fixed mix of seed + k·γ (mod 2⁶⁴), so all of them are elementwise int64
ops on the device, with no state and no host read (Steele, Lea, Flood: "Fast splittable
pseudorandom number generators", OOPSLA 2014; the generator of java.util.SplittableRandom).
torch's int64 multiply wraps modulo 2⁶⁴ on CPU and CUDA; `tests/test_dropout_device.py` checks
the outputs against Python's exact integers.
"""

from __future__ import annotations

import torch
from torch import Tensor

GAMMA = 0x9E3779B97F4A7C15  # the golden ratio's 64-bit odd integer: the counter's increment
MIX = ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB))  # (shift, multiplier) rounds
FINAL_SHIFT = 31
MANTISSA = 53  # bits of a float64 uniform: p is honoured to 2⁻⁵³ of an element's chance


def _signed(value: int) -> int:
    """The int64 whose bits are `value`'s 64 bits (a Python int torch accepts)."""
    return value - 2**64 if value >= 2**63 else value


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(seed: Tensor, count: int) -> Tensor:
    """Outputs 1..count of SplitMix64 from a 0-d int64 `seed`, as int64 bits, on its device."""
    z = torch.arange(1, count + 1, dtype=torch.int64, device=seed.device) * _signed(GAMMA)
    z = z + seed
    for bits, multiplier in MIX:
        z = (z ^ _shift_right(z, bits)) * _signed(multiplier)
    return z ^ _shift_right(z, FINAL_SHIFT)


def uniforms(seed: Tensor, count: int) -> Tensor:
    """`count` float64 uniforms in [0, 1) on `seed`'s device: the top 53 bits of each output."""
    return _shift_right(splitmix64(seed, count), 64 - MANTISSA).double() * 2.0**-MANTISSA
