"""What a LoRA site is: pure data about one `xWᵀ + b + Σ s·(D(x)Aᵀ)Bᵀ` found in a graph, and
about a group of sites that read the same x (the planning unit)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from runlora_fx.merge_check import MergeCheck


class WeightLayout(enum.Enum):
    OUT_IN = "out×in"  # F.linear's W (d_out×d_in)
    IN_OUT = "in×out"  # transformers' Conv1D and `x @ W` (d_in×d_out)


class Base(enum.Enum):
    LINEAR = "linear"  # x·Wᵀ + b with W a tensor the plan reads (and may merge into)
    OPAQUE = "opaque"  # a quantized linear: its result comes from the graph's own op


@dataclass(frozen=True)
class Adapter:
    """One `s · (D(x) Aᵀ) Bᵀ` term: A is r×d_in, B is d_out×r."""

    r: int
    dropout_p: float  # 0.0 when the branch reads the base input itself
    scale: float | None  # None when the scale is a graph value (e.g. PEFT under dynamic=True)
    a_requires_grad: bool
    b_requires_grad: bool
    # the branch's dropout feeds this branch alone, so a plan may draw its own mask instead
    own_dropout: bool = True

    @property
    def reads_base_input(self) -> bool:
        return self.dropout_p == 0.0


@dataclass(frozen=True)
class LoraSite:
    """Shapes, dtypes and flags of one site; N is the hint when the batch is symbolic.

    Dtypes, as PEFT and autocast run a site: x and W are stored in `dtype` / `weight_dtype`, the
    base product runs in `base_dtype` (autocast's dtype, else x's), A and B are stored in
    `a_dtype` (PEFT keeps them fp32 on a 16-bit model), the LoRA products run in `lora_dtype`
    (PEFT casts the branch input to the adapter's dtype; autocast runs them in its own), the
    sum runs in the promotion of the two, and the site returns `result_dtype`.
    """

    path: str
    n: int
    d_in: int
    d_out: int
    adapters: tuple[Adapter, ...]
    dtype: torch.dtype  # x as stored
    has_bias: bool
    bias_requires_grad: bool
    x_requires_grad: bool
    training: bool
    n_symbolic: str | None = None  # the symbolic form of N, when N is not static
    compute_dtype: torch.dtype | None = None  # the base product's dtype when not x's (autocast)
    device: str = "cpu"  # where the site's tensors live, e.g. "cuda:0"
    weight_dtype: torch.dtype | None = None  # W and b as stored, when not x's
    adapter_dtype: torch.dtype | None = None  # A and B as stored, when not x's
    branch_dtype: torch.dtype | None = None  # the LoRA products' dtype, when not the base's
    out_dtype: torch.dtype | None = None  # the site's result, when not the base product's
    weight_layout: WeightLayout = WeightLayout.OUT_IN
    base: Base = Base.LINEAR
    base_op: str | None = None  # an opaque base's op, as the report names it
    # the verdict on merged plans read from the site's own frozen W (merge_check.py); None:
    # not checked, and the measured rule (precision.RULE) decides alone
    merge_check: MergeCheck | None = None

    @property
    def elt_bytes(self) -> int:
        return self.dtype.itemsize

    @property
    def base_dtype(self) -> torch.dtype:
        return self.compute_dtype or self.dtype

    @property
    def matmul_dtype(self) -> torch.dtype:
        """What the base product runs in (the dtype a device is calibrated and timed in)."""
        return self.base_dtype

    @property
    def w_dtype(self) -> torch.dtype:
        return self.weight_dtype or self.dtype

    @property
    def a_dtype(self) -> torch.dtype:
        return self.adapter_dtype or self.dtype

    @property
    def lora_dtype(self) -> torch.dtype:
        return self.branch_dtype or self.base_dtype

    @property
    def sum_dtype(self) -> torch.dtype:
        return torch.promote_types(self.base_dtype, self.lora_dtype)

    @property
    def result_dtype(self) -> torch.dtype:
        return self.out_dtype or self.sum_dtype

    @property
    def is_low_precision(self) -> bool:
        """The base product runs in 16 bits: plans that round differently need the measured
        precision rule (precision.py)."""
        return self.base_dtype.itemsize < 4

    @property
    def needs_lora_grads(self) -> bool:
        return any(a.a_requires_grad or a.b_requires_grad for a in self.adapters)


@dataclass(frozen=True)
class SiteGroup:
    """The planning unit: sites that read the same x (q/k/v, gate/up), or one site alone."""

    members: tuple[LoraSite, ...]

    @property
    def path(self) -> str:
        return " + ".join(m.path for m in self.members)

    @property
    def n(self) -> int:
        return self.members[0].n

    def with_n(self, n: int) -> SiteGroup:
        return SiteGroup(tuple(replace(site, n=n) for site in self.members))


def as_group(unit: LoraSite | SiteGroup) -> SiteGroup:
    return unit if isinstance(unit, SiteGroup) else SiteGroup((unit,))


@dataclass(frozen=True)
class SkippedSite:
    """A candidate left to plain Inductor, with the reason why."""

    path: str
    reason: str
