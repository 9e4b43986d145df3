"""The operands of a planning unit, and the one place that names a program's tensors.

A unit is a group of sites reading the same x (a single site is a group of one). Its operands
are x, and per member m: W (absent for an opaque base, whose result `base` comes in instead),
b, and per adapter k: D(x) (only for a dropout branch whose plan reads the graph's dropout),
A and B. Programs, costs, the executor, the timer, the memory budget and the rewriter all read
these records and nothing else, so a name means the same tensor everywhere. The values a
program computes are named here too (`value`, `derived`), so a name read in one place is the
name made in another.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from runlora_fx.ir.site import Base, LoraSite, SiteGroup, WeightLayout, dtype_name

Shape = tuple[int, ...]


class Role(enum.Enum):
    X = "x"
    LORA_INPUT = "D(x)"  # a dropout branch's input, from the graph's own dropout
    WEIGHT = "W"
    BIAS = "b"
    BASE_RESULT = "base"  # an opaque (quantized) base's result, computed by the graph
    LORA_A = "A"
    LORA_B = "B"
    STACK = "stack"  # a persistent stack of parameters (stacks.py), held by the backend

    @property
    def is_parameter(self) -> bool:
        """Weights (and stacks of them): never counted as saved activations."""
        return self in (Role.WEIGHT, Role.BIAS, Role.LORA_A, Role.LORA_B, Role.STACK)


@dataclass(frozen=True)
class Operand:
    name: str
    role: Role
    shape: Shape  # 2-D views as the program reads them (x is N×d_in)
    dtype: torch.dtype
    requires_grad: bool
    member: int = 0
    adapter: int | None = None


# ---- names -------------------------------------------------------------------------------------
# Member m, adapter k. Single sites use member 0, so their names are the same in every unit.

X = "x"
DX = "dx"  # the grad of x, summed over members and adapters


def weight(m: int) -> str:
    return f"W{m}"


def bias(m: int) -> str:
    return f"b{m}"


def base_result(m: int) -> str:
    return f"base{m}"


def lora_a(m: int, k: int) -> str:
    return f"A{m}.{k}"


def lora_b(m: int, k: int) -> str:
    return f"B{m}.{k}"


def dropped(m: int, k: int) -> str:
    return f"xd{m}.{k}"


def tangent(m: int) -> str:
    return f"dy{m}"


def value(stem: str, m: int, k: int | None = None) -> str:
    """A value the program computes for member m (and its adapter k): "xW0", "h0.1"."""
    return f"{stem}{m}" if k is None else f"{stem}{m}.{k}"


class Derived(enum.Enum):
    """How a name derives from other names (and numbers): the template they fill."""

    CAST = "{}:{}"  # a value in another dtype (its name)
    RECOMPUTED = "{}~"  # the backward's own recompute of a value the forward computed fused
    VIEW = "{}@"  # a slice of a fused GEMM, before the copy that gives it its own storage
    TRANSPOSED = "{}ᵀ"  # a transposed view
    JOINED = "cat({})"  # operands concatenated (their names, comma-separated)
    REFRESHED = "refresh({})"  # a persistent stack's trainable parts rewritten (a cost only)
    FUSED = "mm({})"  # one GEMM for several (their results' names, comma-separated)
    ON_X = "x{}"  # h's product on x itself, before its sparse-dropout correction
    DENSE = "{}:x"  # leftᵀ·x, before its sparse-dropout correction
    AT_DROPPED = "{}:S"  # leftᵀ·S: the same product at the dropped positions only
    DIFFERENCE = "{}−{}"  # one value less another
    OVER_Q = "{}/q"  # divided by q = 1 − p
    MASKED = "{}·m"  # with the dropped positions zeroed
    CORRECTED = "{}−C{}"  # a merged y or dx with adapter k's sparse-dropout correction
    GRAM = "G{}[{}]"  # member m's dyᵀ·D(x), for the input its adapters read


def derived(how: Derived, *parts: object) -> str:
    """The name `how` makes of `parts` (a dtype is named as the reports name it)."""
    return how.value.format(*(dtype_name(p) if isinstance(p, torch.dtype) else p for p in parts))


def lora_input(site: LoraSite, m: int, k: int, graph_dropout: bool = True) -> str:
    """What adapter k of member m's products read: x itself, or the graph's D(x) (a plan with
    sparse dropout reads x and corrects at the dropped positions)."""
    return dropped(m, k) if graph_dropout and not site.adapters[k].reads_base_input else X


# ---- the operands ------------------------------------------------------------------------------


def site_operands(site: LoraSite, m: int = 0, graph_dropout: bool = True) -> list[Operand]:
    """Member m's own operands (not x), in call order; D(x) only from the graph's dropout."""
    found: list[Operand] = []
    if site.base is Base.OPAQUE:
        found.append(Operand(base_result(m), Role.BASE_RESULT, (site.n, site.d_out),
                             site.base_dtype, site.x_requires_grad, m))
    else:
        shape = (site.d_out, site.d_in)
        if site.weight_layout is WeightLayout.IN_OUT:
            shape = (site.d_in, site.d_out)
        found.append(Operand(weight(m), Role.WEIGHT, shape, site.weight_dtype, False, m))
        if site.has_bias:
            found.append(Operand(bias(m), Role.BIAS, (site.d_out,), site.weight_dtype,
                                 site.bias_requires_grad, m))
    for k, a in enumerate(site.adapters):
        if graph_dropout and not a.reads_base_input:
            found.append(Operand(dropped(m, k), Role.LORA_INPUT, (site.n, site.d_in),
                                 site.lora_dtype, site.x_requires_grad, m, k))
    for k, a in enumerate(site.adapters):
        found.append(Operand(lora_a(m, k), Role.LORA_A, (a.r, site.d_in), site.adapter_dtype,
                             a.a_requires_grad, m, k))
        found.append(Operand(lora_b(m, k), Role.LORA_B, (site.d_out, a.r), site.adapter_dtype,
                             a.b_requires_grad, m, k))
    return found


def operands(unit: SiteGroup, graph_dropout: bool = True) -> tuple[Operand, ...]:
    """x, then each member's operands: the order the planned call takes its tensors in.
    `graph_dropout`: whether the plan reads its dropout branches' D(x) from the graph."""
    first = unit.members[0]
    x = Operand(X, Role.X, (unit.n, first.d_in), first.dtype, first.x_requires_grad)
    found = [x]
    for m, site in enumerate(unit.members):
        found += site_operands(site, m, graph_dropout)
    return tuple(found)


def shapes_and_dtypes(
    unit: SiteGroup, graph_dropout: bool = True
) -> dict[str, tuple[Shape, torch.dtype]]:
    """Every operand and every tangent (dy per member), by name."""
    found = {op.name: (op.shape, op.dtype) for op in operands(unit, graph_dropout)}
    for m, site in enumerate(unit.members):
        found[tangent(m)] = ((site.n, site.d_out), site.result_dtype)
    return found


def parameter_names(unit: SiteGroup) -> frozenset[str]:
    return frozenset(op.name for op in operands(unit) if op.role.is_parameter)
