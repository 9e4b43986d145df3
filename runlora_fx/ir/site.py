"""What a LoRA site is: pure data about one `xWᵀ + b + Σ s·(D(x)Aᵀ)Bᵀ` found in a graph, and
about a group of sites that read the same x (the planning unit; a single site is a group of
one)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from runlora_fx.ir.merge_check import MergeCheck


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as the reports and reasons name it: "bfloat16", not "torch.bfloat16"."""
    return str(dtype).removeprefix("torch.")


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

    Dtypes, as PEFT and autocast run a site: x is stored in `dtype`, the base product runs in
    `base_dtype` (autocast's dtype, else x's), W and b are stored in `weight_dtype`, A and B in
    `adapter_dtype` (PEFT keeps them fp32 on a 16-bit model), the LoRA products run in
    `lora_dtype` (PEFT casts the branch input to the adapter's dtype; autocast runs them in its
    own), the sum runs in `sum_dtype`, the promotion of the two, and the site returns
    `result_dtype`. Left out (None), each is what follows from the others: x's for the base, W
    and the adapters, the base's for the LoRA products, the sum's for the result.
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
    base_dtype: torch.dtype = None  # type: ignore[assignment]  # None: x's (resolved below)
    device: str = "cpu"  # where the site's tensors live, e.g. "cuda:0"
    weight_dtype: torch.dtype = None  # type: ignore[assignment]  # None: x's
    adapter_dtype: torch.dtype = None  # type: ignore[assignment]  # None: x's
    lora_dtype: torch.dtype = None  # type: ignore[assignment]  # None: the base product's
    result_dtype: torch.dtype = None  # type: ignore[assignment]  # None: the sum's
    weight_layout: WeightLayout = WeightLayout.OUT_IN
    base: Base = Base.LINEAR
    base_op: str | None = None  # an opaque base's op, as the report names it
    # the verdict on merged plans read from the site's own frozen W (merge_check.py); None:
    # not checked, and the measured rule (precision.RULE) decides alone
    merge_check: MergeCheck | None = None
    # its W, A and B are top-level graph inputs (or constants) whose real tensors the backend
    # holds: a stack of them may persist across steps (stacks.py); hand-built sites: False
    weights_held: bool = False

    def __post_init__(self) -> None:
        for name, default in (("base_dtype", self.dtype), ("weight_dtype", self.dtype),
                              ("adapter_dtype", self.dtype)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.lora_dtype is None:
            object.__setattr__(self, "lora_dtype", self.base_dtype)
        if self.result_dtype is None:
            object.__setattr__(self, "result_dtype", self.sum_dtype)

    @property
    def sum_dtype(self) -> torch.dtype:
        return torch.promote_types(self.base_dtype, self.lora_dtype)

    def stated_dtypes(self) -> dict[str, torch.dtype]:
        """x's dtype, and each other dtype where it is not what follows from the rest."""
        defaults = {"base_dtype": self.dtype, "weight_dtype": self.dtype,
                    "adapter_dtype": self.dtype, "lora_dtype": self.base_dtype,
                    "result_dtype": self.sum_dtype}
        return {"dtype": self.dtype, **{name: getattr(self, name) for name, default
                                        in defaults.items() if getattr(self, name) != default}}

    @property
    def is_low_precision(self) -> bool:
        """The base product runs in 16 bits: plans that round differently need the measured
        precision rule (precision.py)."""
        return self.base_dtype.itemsize < 4


@dataclass(frozen=True)
class SiteGroup:
    """The planning unit: sites that read the same x (q/k/v, gate/up), or one site alone."""

    members: tuple[LoraSite, ...]

    @property
    def path(self) -> str:
        return " + ".join(m.path for m in self.members)

    @property
    def n(self) -> int:
        """N, the rows of x every member reads (its hint when symbolic)."""
        return self.members[0].n

    @property
    def n_symbolic(self) -> str | None:
        return self.members[0].n_symbolic

    def with_n(self, n: int) -> SiteGroup:
        return SiteGroup(tuple(replace(site, n=n) for site in self.members))

    def alone(self) -> list[SiteGroup]:
        """Each member as a unit of its own."""
        return [SiteGroup((site,)) for site in self.members]


@dataclass(frozen=True)
class SkippedSite:
    """A candidate left to plain Inductor, with the reason why."""

    path: str
    reason: str
