"""Counted cost of a plan: pure integer functions of the unit's shapes and dtypes.

FLOPs count matmuls only, 2·m·k·n each, exactly as `torch.utils.flop_counter` does; bytes moved
count every step's operands and result once, each at its own dtype's size (m·k + k·n + m·n
elements for a matmul; views — slices, transposes — move nothing); saved bytes are the
activations the backward reads from the forward (weights excluded); `gemms` counts the matmul
calls, which on a CPU cost more than their FLOPs say (docs/choosing.md, "Roofline model");
`draws` counts random numbers drawn. A plan that reads the graph's own dropout pays for it here
too (a dense mask drawn, applied forward and backward, and kept), since its program only
receives D(x). A persistent stack (runlora_fx/ir/stacks.py) costs a step only the rewrite of
its trainable parts (`refresh_costs`), not its frozen W rows.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields

from runlora_fx.ir.dropout import PRODUCTS, expected_count
from runlora_fx.ir.plans import Dropout, Plan
from runlora_fx.ir.operands import Derived, derived
from runlora_fx.ir.program import Program, metas_of, operand_metas, program_for, program_operands
from runlora_fx.ir.steps import GEMMS, Meta, Step, infer, mm_dims
from runlora_fx.ir.site import SiteGroup

VIEWS = ("slice", "t")


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes_moved: int
    saved_bytes: int
    gemms: int = 0
    draws: int = 0
    # persistent stacks (stacks.py) the plan holds across steps: a copy of each W they stack
    held_bytes: int = 0

    @property
    def kept_bytes(self) -> int:
        """What the plan keeps beyond the parameters: saved activations and held stacks."""
        return self.saved_bytes + self.held_bytes

    def at(self, n: int, at_one: Cost) -> Cost:
        """The cost at N = n, `self` being the cost at N = 0 and `at_one` at N = 1: every count
        is affine in N (one side of each product is N or fixed; dropped positions are p·N·d)."""
        return Cost(*(a + n * (b - a) for a, b in zip(astuple(self), astuple(at_one))))

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(a + b for a, b in zip(astuple(self), astuple(other))))


@dataclass(frozen=True)
class AffineCost:
    """A plan's cost as a function of N: slope·N + constant, each count exactly."""

    slope: Cost
    constant: Cost

    @classmethod
    def between(cls, at0: Cost, at1: Cost) -> AffineCost:
        """From the costs at N = 0 and N = 1."""
        return cls(Cost(*(b - a for a, b in zip(astuple(at0), astuple(at1)))), at0)

    def describe(self, symbol: str) -> dict[str, str]:
        """Each count as text in `symbol`: "64*(N) + 512"."""
        return {f.name: f"{getattr(self.slope, f.name)}*({symbol}) + "
                        f"{getattr(self.constant, f.name)}" for f in fields(Cost)}


@dataclass(frozen=True)
class StepCost:
    step: Step
    flops: int
    bytes_moved: int
    draws: int = 0


def _nbytes(meta: Meta) -> int:
    shape, dtype = meta
    total = dtype.itemsize
    for dim in shape:
        total *= dim
    return total


def _sparse_bytes(step: Step, metas: dict[str, Meta]) -> int:
    """Bytes a sparse-dropout step moves: per dropped position its index, what it gathers and
    what it adds; a product with S also zeroes and writes its N×r or k×d result, while a dense
    result is updated in place (its producer, a GEMM, has no other reader)."""
    (count,), _ = metas[step.args[1]]
    first, *rest = (metas[a] for a in step.args if a != step.args[1])
    elt = first[1].itemsize
    out = metas[step.out][1].itemsize
    if step.op == "s_times_at":  # (x, P, A): x[i, j], A[:, j] → N×r
        r = rest[0][0][0]
        return count * (4 + elt + r * (rest[0][1].itemsize + out)) + 2 * _nbytes(metas[step.out])
    if step.op == "lt_times_s":  # (L, P, x): L[i, :], x[i, j] → k×d
        k = first[0][1]
        return count * (4 + k * (elt + out) + rest[0][1].itemsize) + 2 * _nbytes(metas[step.out])
    if step.op == "zero_at":
        return count * (4 + elt)
    (_, left_dtype), (a_shape, a_dtype) = rest  # minus_dots_at (dense, P, L, A)
    return count * (4 + elt + a_shape[0] * (left_dtype.itemsize + a_dtype.itemsize))


def refresh_costs(program: Program, unit: SiteGroup) -> list[StepCost]:
    """Per persistent stack (stacks.py) what a step costs it: its trainable parts (A, s·B)
    read and written into the held buffer again after an optimizer step. Its frozen W rows
    are written once, not per step."""
    metas = operand_metas(program, unit)
    operands = {op.name: op for op in program_operands(unit, program)}
    costs = []
    for stack in program.stacks:
        parts = stack.trainable_parts(operands)
        if parts:
            part_metas = stack.part_metas(metas)
            moved = 2 * sum(_nbytes(part_metas[p]) for p in parts)
            costs.append(StepCost(Step(derived(Derived.REFRESHED, stack.name), "refresh", parts),
                                  0, moved))
    return costs


def step_costs(program: Program, unit: SiteGroup) -> list[StepCost]:
    """Every step of forward then backward with its FLOPs, bytes and draws, in program order;
    first the refresh of the program's persistent stacks, a pseudo-step each."""
    metas = operand_metas(program, unit)
    costs: list[StepCost] = refresh_costs(program, unit)
    for step in (*program.forward, *program.backward):
        metas[step.out] = infer(step, metas)
        flops, draws = 0, 0
        if step.op in GEMMS:  # add_mm reads its m×n addend and writes it back
            m, k, n = mm_dims(step, metas)
            elt = metas[step.out][1].itemsize
            flops = 2 * m * k * n
            moved = (m * k + k * n + m * n * (2 if step.op == "add_mm" else 1)) * elt
        elif step.op in VIEWS:
            moved = 0
        elif step.op == "seed":
            moved, draws = 8, 1
        elif step.op == "positions":  # per drawn gap an exponential (f64), a gap and a position
            (source, _), p = metas[step.args[1]], step.p
            count = expected_count(source[0] * source[1], p)
            moved, draws = count * 24 + _nbytes(metas[step.out]), count
        elif step.op in PRODUCTS:
            moved = _sparse_bytes(step, metas)
        else:
            moved = sum(_nbytes(metas[a]) for a in step.args) + _nbytes(metas[step.out])
        costs.append(StepCost(step, flops, moved, draws))
    return costs


def graph_dropout_cost(plan: Plan, unit: SiteGroup) -> Cost:
    """What the graph's own dropouts cost a plan that reads them: per branch an N×d mask drawn
    and kept (1 byte an element), x read and D(x) written, and in the backward the grad read,
    the mask read and the grad written again."""
    if plan.dropout is not Dropout.GRAPH:
        return Cost(0, 0, 0)
    total = Cost(0, 0, 0)
    for site in unit.members:
        for adapter in site.adapters:
            if adapter.reads_base_input:
                continue
            numel, elt = site.n * site.d_in, site.lora_dtype.itemsize
            total += Cost(0, 2 * numel * (2 * elt + 1), numel, draws=numel)
    return total


def saved_bytes(program: Program, unit: SiteGroup) -> int:
    metas = metas_of(program, unit)
    parameters = {op.name for op in program_operands(unit, program) if op.role.is_parameter}
    return sum(_nbytes(metas[name]) for name in program.saved if name not in parameters)


def cost_of(plan: Plan, unit: SiteGroup, program: Program | None = None) -> Cost:
    """The plan's counted cost at the unit's shapes. `program`: the plan's program, built for
    any N (its steps do not depend on N, only their shapes do, which are read from `unit`)."""
    program = program_for(plan, unit) if program is None else program
    steps = step_costs(program, unit)
    return Cost(
        flops=sum(s.flops for s in steps),
        bytes_moved=sum(s.bytes_moved for s in steps),
        saved_bytes=saved_bytes(program, unit),
        gemms=sum(s.step.op in GEMMS for s in steps),
        draws=sum(s.draws for s in steps),
        held_bytes=sum(_nbytes(stack.meta) for stack in program.stacks),
    ) + graph_dropout_cost(plan, unit)


def affine_cost(plan: Plan, unit: SiteGroup) -> AffineCost:
    """The plan's cost at every N, from its costs at N = 0 and N = 1."""
    return AffineCost.between(*costs_at_0_and_1(plan, unit))


def costs_at_0_and_1(plan: Plan, unit: SiteGroup,
                     program: Program | None = None) -> tuple[Cost, Cost]:
    """The plan's costs at N = 0 and N = 1, from one build of its program."""
    program = program_for(plan, unit) if program is None else program
    return cost_of(plan, unit.with_n(0), program), cost_of(plan, unit.with_n(1), program)
