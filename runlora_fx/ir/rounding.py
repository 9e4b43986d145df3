"""How a value is rounded to a 16-bit dtype: to nearest, or stochastically (unbiased). A merged
plan rounds W_eff = W + s·BA so (its `round` step), and the merge check rounds as it would."""

from __future__ import annotations

import enum

import torch


class Rounding(enum.Enum):
    """How a merged W_eff = W + s·BA (computed in fp32) is rounded to a 16-bit base dtype."""

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"  # unbiased: 16 random low bits added, then truncated


def stochastic_round(
    value: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Round fp32 `value` to bf16/fp16 up or down with probability by distance (unbiased).

    bf16: add 16 uniformly random low bits to the fp32 bit pattern and truncate them. fp16 (a
    different exponent range): draw u ~ U[0, 1) and round down at the fp16 grid point below
    value + u·ulp. Random bits come from `generator`, else torch's, so seeded runs reproduce.
    """
    value = value.float()
    if dtype == torch.bfloat16:
        noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device,
                              generator=generator)
        bits = (value.view(torch.int32) + noise) & -65536  # clear the low 16 bits
        return bits.view(torch.float32).to(torch.bfloat16)
    if dtype == torch.float16:
        down = value.to(torch.float16)
        down = torch.where(down.float() > value, torch.nextafter(
            down, torch.full_like(down, float("-inf"))), down)
        up = torch.nextafter(down, torch.full_like(down, float("inf")))
        gap = (up.float() - down.float()).clamp_min(torch.finfo(torch.float32).tiny)
        take_up = torch.rand(value.shape, device=value.device,
                             generator=generator) * gap < value - down.float()
        return torch.where(take_up, up, down)
    return value.to(dtype)


def round_to(value: torch.Tensor, dtype: torch.dtype, rounding: Rounding | None) -> torch.Tensor:
    if rounding is Rounding.STOCHASTIC and value.dtype != dtype:
        return stochastic_round(value, dtype)
    return value.to(dtype)
