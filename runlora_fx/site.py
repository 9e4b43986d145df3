"""What a LoRA site is: pure data about one `xWᵀ + b + Σ s·(D(x)Aᵀ)Bᵀ` found in a graph."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Adapter:
    """One `s · (D(x) Aᵀ) Bᵀ` term: A is r×d_in, B is d_out×r."""

    r: int
    dropout_p: float  # 0.0 when the branch reads the base input itself
    scale: float | None  # None when the scale is a graph value (e.g. PEFT under dynamic=True)
    a_requires_grad: bool
    b_requires_grad: bool

    @property
    def reads_base_input(self) -> bool:
        return self.dropout_p == 0.0


@dataclass(frozen=True)
class LoraSite:
    """Shapes and flags of one site; N is the hint when the batch is symbolic."""

    path: str
    n: int
    d_in: int
    d_out: int
    adapters: tuple[Adapter, ...]
    dtype: torch.dtype
    has_bias: bool
    bias_requires_grad: bool
    x_requires_grad: bool
    training: bool
    n_symbolic: str | None = None  # the symbolic form of N, when N is not static
    # the dtype the site's matmuls produce when it is not `dtype` (autocast: fp32 x, bf16 result)
    compute_dtype: torch.dtype | None = None
    device: str = "cpu"  # where the site's tensors live, e.g. "cuda:0"

    @property
    def elt_bytes(self) -> int:
        return self.dtype.itemsize

    @property
    def matmul_dtype(self) -> torch.dtype:
        return self.compute_dtype or self.dtype

    @property
    def can_merge(self) -> bool:
        """`x (W + sBA)ᵀ` equals the split form only when every branch reads x itself."""
        return all(a.reads_base_input for a in self.adapters)

    @property
    def needs_lora_grads(self) -> bool:
        return any(a.a_requires_grad or a.b_requires_grad for a in self.adapters)


@dataclass(frozen=True)
class SkippedSite:
    """A candidate left to plain Inductor, with the reason why."""

    path: str
    reason: str
