"""Counted cost of a plan: pure integer functions of the unit's shapes and dtypes.

FLOPs count matmuls only, 2·m·k·n each, exactly as `torch.utils.flop_counter` does; bytes moved
count every step's operands and result once, each at its own dtype's size (m·k + k·n + m·n
elements for a matmul; views — slices, transposes — move nothing); saved bytes are the
activations the backward reads from the forward (weights excluded); `gemms` counts the matmul
calls, which on a CPU cost more than their FLOPs say (DESIGN.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass

from runlora_fx import operands as ops
from runlora_fx.plans import Plan
from runlora_fx.program import Program, metas_of, program_for
from runlora_fx.steps import Meta, Step, infer, mm_dims
from runlora_fx.site import LoraSite, SiteGroup

VIEWS = ("slice", "t")


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes_moved: int
    saved_bytes: int
    gemms: int = 0

    def at(self, n: int, at_one: Cost) -> Cost:
        """The cost at N = n, `self` being the cost at N = 0 and `at_one` at N = 1: every count
        is affine in N (one side of each product is N or fixed)."""
        return Cost(*(a + n * (b - a) for a, b in zip(
            (self.flops, self.bytes_moved, self.saved_bytes, self.gemms),
            (at_one.flops, at_one.bytes_moved, at_one.saved_bytes, at_one.gemms))))

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.flops + other.flops,
            self.bytes_moved + other.bytes_moved,
            self.saved_bytes + other.saved_bytes,
            self.gemms + other.gemms,
        )


@dataclass(frozen=True)
class StepCost:
    step: Step
    flops: int
    bytes_moved: int


def _nbytes(meta: Meta) -> int:
    shape, dtype = meta
    total = dtype.itemsize
    for dim in shape:
        total *= dim
    return total


def step_costs(program: Program, unit: LoraSite | SiteGroup) -> list[StepCost]:
    """Every step of forward then backward with its FLOPs and bytes, in program order."""
    metas = dict(ops.shapes_and_dtypes(unit))
    costs: list[StepCost] = []
    for step in (*program.forward, *program.backward):
        metas[step.out] = infer(step, metas)
        if step.op == "mm":
            m, k, n = mm_dims(step, metas)
            elt = metas[step.out][1].itemsize
            flops, moved = 2 * m * k * n, (m * k + k * n + m * n) * elt
        elif step.op in VIEWS:
            flops, moved = 0, 0
        else:
            flops = 0
            moved = sum(_nbytes(metas[a]) for a in step.args) + _nbytes(metas[step.out])
        costs.append(StepCost(step, flops, moved))
    return costs


def saved_bytes(program: Program, unit: LoraSite | SiteGroup) -> int:
    metas = metas_of(program, unit)
    parameters = ops.parameter_names(unit)
    return sum(_nbytes(metas[name]) for name in program.saved if name not in parameters)


def cost_of(plan: Plan, unit: LoraSite | SiteGroup) -> Cost:
    program = program_for(plan, unit)
    steps = step_costs(program, unit)
    return Cost(
        flops=sum(s.flops for s in steps),
        bytes_moved=sum(s.bytes_moved for s in steps),
        saved_bytes=saved_bytes(program, unit),
        gemms=sum(s.step.op == "mm" for s in steps),
    )
