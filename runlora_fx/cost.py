"""Counted cost of a plan: pure integer functions of the site's shapes.

FLOPs count matmuls only, 2·m·k·n each, exactly as `torch.utils.flop_counter` does; bytes moved
count every step's operands and result once (m·k + k·n + m·n elements for a matmul);
saved bytes are the activations the backward reads from the forward (weights excluded).
"""

from __future__ import annotations

from dataclasses import dataclass

from runlora_fx.plans import Plan
from runlora_fx.program import Program, Step, is_parameter, program_for
from runlora_fx.site import LoraSite

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes_moved: int
    saved_bytes: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.flops + other.flops,
            self.bytes_moved + other.bytes_moved,
            self.saved_bytes + other.saved_bytes,
        )


@dataclass(frozen=True)
class StepCost:
    step: Step
    flops: int
    bytes_moved: int


def input_shapes(site: LoraSite) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {
        "x": (site.n, site.d_in),
        "W": (site.d_out, site.d_in),
        "b": (site.d_out,),
        "dy": (site.n, site.d_out),
    }
    for k, adapter in enumerate(site.adapters):
        shapes[f"xd{k}"] = (site.n, site.d_in)
        shapes[f"A{k}"] = (adapter.r, site.d_in)
        shapes[f"B{k}"] = (site.d_out, adapter.r)
    return shapes


def _numel(shape: Shape) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def _mm_dims(step: Step, shapes: dict[str, Shape]) -> tuple[int, int, int]:
    """(m, k, n) of `op(a) @ op(b)`."""
    a, b = (shapes[name] for name in step.args)
    m, k = (a[1], a[0]) if step.transpose[0] else a
    k2, n = (b[1], b[0]) if step.transpose[1] else b
    assert k == k2, f"{step}: inner dims {k} != {k2}"
    return m, k, n


def _step_shape(step: Step, shapes: dict[str, Shape]) -> Shape:
    if step.op == "mm":
        m, _, n = _mm_dims(step, shapes)
        return (m, n)
    if step.op == "colsum":
        return shapes[step.args[0]][1:]
    return shapes[step.args[0]]  # scale and add keep the first operand's shape


def step_costs(program: Program, site: LoraSite) -> list[StepCost]:
    """Every step of forward then backward with its FLOPs and bytes, in program order."""
    shapes = input_shapes(site)
    elt = site.elt_bytes
    costs: list[StepCost] = []
    for step in (*program.forward, *program.backward):
        shapes[step.out] = _step_shape(step, shapes)
        if step.op == "mm":
            m, k, n = _mm_dims(step, shapes)
            flops, elements = 2 * m * k * n, m * k + k * n + m * n
        else:
            flops = 0
            elements = sum(_numel(shapes[a]) for a in step.args) + _numel(shapes[step.out])
        costs.append(StepCost(step, flops, elements * elt))
    return costs


def saved_bytes(program: Program, site: LoraSite) -> int:
    shapes = input_shapes(site)
    for step in program.forward:
        shapes[step.out] = _step_shape(step, shapes)
    activations = [name for name in program.saved if not is_parameter(name)]
    return sum(_numel(shapes[name]) for name in activations) * site.elt_bytes


def cost_of(plan: Plan, site: LoraSite) -> Cost:
    program = program_for(plan, site)
    steps = step_costs(program, site)
    return Cost(
        flops=sum(s.flops for s in steps),
        bytes_moved=sum(s.bytes_moved for s in steps),
        saved_bytes=saved_bytes(program, site),
    )
