"""Runs a plan's program: an autograd.Function that AOTAutograd traces, forward and custom
backward, into plain aten ops for Inductor (docs/design.md, "The partitioner decides what is
saved": the forward steps a plan recomputes are annotated here for passes/recompute_tags.py)."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch.fx.traceback import annotate

from runlora_fx.ir import dropout
from runlora_fx.ir import operands as ops
from runlora_fx.ir.plans import Plan
from runlora_fx.ir.rounding import round_to
from runlora_fx.ir.program import Program, program_for, program_operands
from runlora_fx.ir.stacks import Stack
from runlora_fx.ir.steps import GEMMS, Step
from runlora_fx.ir.site import SiteGroup

# Forward nodes traced under this annotation are tagged MUST_RECOMPUTE by passes/recompute_tags.
RECOMPUTE_ANNOTATION = "runlora_recompute"

Scale = float | torch.SymFloat
Placement = tuple[torch.Size, torch.device]  # an operand's shape and device
ACTIVATIONS = (ops.Role.X, ops.Role.LORA_INPUT, ops.Role.BASE_RESULT)  # N×… : flattened to 2-D


def _apply(step: Step, env: dict[str, torch.Tensor], scales: Sequence[Scale],
           operands: Mapping[str, Placement], tag: str) -> torch.Tensor:
    if step.op == "positions":  # reads its operand's shape and device only
        shape, device = operands[step.args[1]]
        numel = math.prod(shape)
        return dropout.positions_op(device)(env[step.args[0]], numel, step.p,
                                            dropout.capacity(numel, step.p), device)
    args = [env[name] for name in step.args]
    if step.op in dropout.PRODUCTS:
        return _sparse_product(step, args)
    if step.op in GEMMS:
        a, b = (t.t() if flip else t for t, flip in zip(args[-2:], step.transpose))
        if step.op == "add_mm":
            return dropout.add_mm_op(args[0].device)(args[0], a, b)
        return torch.mm(a, b)
    if step.op == "scale":
        scaled = args[0] * scales[step.scale] if step.scale >= 0 else args[0]
        return scaled * step.factor if step.factor != 1.0 else scaled
    if step.op == "add":
        return functools.reduce(operator.add, args)
    if step.op == "sub":
        return args[0] - args[1]
    if step.op == "seed":
        return dropout.draw_seed(args[0], f"{tag}/{step.out}")  # a name unique in the graph
    if step.op == "colsum":
        return args[0].sum(0)
    if step.op == "cast":
        return args[0].to(step.dtype)
    if step.op == "round":
        assert step.dtype is not None
        return round_to(args[0], step.dtype, step.rounding)
    if step.op == "cat":
        return torch.cat(args, step.dim)
    if step.op == "slice":
        return args[0].narrow(step.dim, step.start, step.stop - step.start)
    if step.op == "t":
        return args[0].t()
    if step.op == "copy":
        return args[0].clone(memory_format=torch.contiguous_format)
    raise AssertionError(f"unknown op {step.op}")


def _sparse_product(step: Step, args: list[torch.Tensor]) -> torch.Tensor:
    """A product with the dropped entries (dropout.py), by the ops of args[0]'s device."""
    product = dropout.product_ops(args[0].device)[step.op]
    if step.op == "minus_dots_at":
        product(*args, step.factor)
    elif step.op == "zero_at":
        product(*args)
    else:
        return product(*args)
    return args[0]  # in place: the program hands it a fresh product no one reads


def _drawn_product(draw: Step, product: Step | None, operands: Mapping[str, Placement]
                   ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """The one call that runs `draw` (a positions step) and `product` (the step after it) where
    that is the S·Aᵀ at its positions, recomputed or not alike; None where they run apart."""
    if (draw.op != "positions" or product is None or product.op != "s_times_at"
            or product.args[1] != draw.out or product.recompute != draw.recompute):
        return None
    return dropout.drawn_product_op(operands[draw.args[1]][1])


def run_steps(
    steps: Sequence[Step], env: dict[str, torch.Tensor], scales: Sequence[Scale], tag: str,
    operands: Mapping[str, Placement],
) -> None:
    i = 0
    while i < len(steps):
        step, after = steps[i], steps[i + 1] if i + 1 < len(steps) else None
        drawn = _drawn_product(step, after, operands)
        with annotate({RECOMPUTE_ANNOTATION: tag}) if step.recompute else nullcontext():
            if drawn is None or after is None:
                env[step.out] = _apply(step, env, scales, operands, tag)
                i += 1
                continue
            # (seed, numel, p, slots, x, A): the buffer, after.args[1], is drawn by this call
            numel = math.prod(operands[step.args[1]][0])
            env[step.out], env[after.out] = drawn(
                env[step.args[0]], numel, step.p, dropout.capacity(numel, step.p),
                env[after.args[0]], env[after.args[2]])
            i += 2


def stack_parts(stack: Stack, parts: Sequence[str], env: Mapping[str, torch.Tensor],
                scales: Sequence[Scale]) -> dict[str, torch.Tensor]:
    """`parts` of a persistent stack computed from its operands in `env` (no grad recorded)."""
    values = dict(env)
    with torch.no_grad():
        run_steps(stack.steps_for(parts), values, scales, stack.name, {})
    return {part: values[part] for part in parts}


def stack_tensor(stack: Stack, env: Mapping[str, torch.Tensor],
                 scales: Sequence[Scale]) -> torch.Tensor:
    """A persistent stack built whole, as its own contiguous tensor."""
    parts = stack_parts(stack, stack.parts, env, scales)
    with torch.no_grad():
        return torch.cat([parts[p] for p in stack.parts], stack.dim).contiguous()


class ProgramFunction(torch.autograd.Function):
    """Forward and backward of one program over the unit's operand tensors (in `names`)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        program: Program,
        tag: str,
        scales: tuple[Scale, ...],
        names: tuple[str, ...],
        *tensors: torch.Tensor,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        env = dict(zip(names, tensors))
        operands = {name: (t.shape, t.device) for name, t in env.items()}
        run_steps(program.forward, env, scales, tag, operands)
        ctx.program, ctx.scales, ctx.names, ctx.tag = program, scales, names, tag
        ctx.operands = operands
        ctx.save_for_backward(*(env[name] for name in program.saved))
        outputs = tuple(env[name] for name in program.outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    @staticmethod
    def backward(ctx: Any, *dys: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        program: Program = ctx.program
        env = dict(zip(program.saved, ctx.saved_tensors))
        env.update(zip(program.tangents, dys))
        run_steps(program.backward, env, ctx.scales, ctx.tag, ctx.operands)
        grad_of = dict(program.grads)
        grads = tuple(env[grad_of[name]] if name in grad_of else None for name in ctx.names)
        return (None, None, None, None, *grads)


class UnitCall:
    """The callable a rewritten graph calls in place of a unit's nodes: it takes the unit's
    operands (operands.py order; None where an operand is absent) and returns each member's
    result, shaped like its base linear's."""

    def __init__(self, name: str, unit: SiteGroup, plan: Plan) -> None:
        self.__name__ = name  # FX codegen names the global after it
        self.unit = unit
        self.plan = plan
        self.program = program_for(plan, self.unit)
        self.operands = program_operands(self.unit, self.program)

    def __call__(
        self, tensors: Sequence[torch.Tensor], scales: Sequence[Scale]
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x = tensors[0]
        lead = x.shape[:-1]
        flat = [t.reshape(-1, t.shape[-1]) if op.role in ACTIVATIONS else t
                for op, t in zip(self.operands, tensors)]
        names = tuple(op.name for op in self.operands)
        out = ProgramFunction.apply(self.program, self.__name__, tuple(scales), names, *flat)
        outs = out if isinstance(out, tuple) else (out,)
        shaped = tuple(y.reshape(*lead, site.d_out) for y, site in zip(outs, self.unit.members))
        return shaped[0] if len(shaped) == 1 else shaped
