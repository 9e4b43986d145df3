"""Runs a plan's program: an autograd.Function that AOTAutograd traces, forward and custom
backward, into plain aten ops for Inductor (DESIGN.md §2)."""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx.traceback import annotate

from runlora_fx.plans import Plan
from runlora_fx.program import Program, Step, program_for
from runlora_fx.site import LoraSite

# Forward nodes traced under this annotation are tagged MUST_RECOMPUTE by passes/recompute_tags.
RECOMPUTE_ANNOTATION = "runlora_recompute"

Scale = float | torch.SymFloat


def _apply(step: Step, env: dict[str, torch.Tensor], scales: Sequence[Scale]) -> torch.Tensor:
    args = [env[name] for name in step.args]
    if step.op == "mm":
        a, b = (t.t() if flip else t for t, flip in zip(args, step.transpose))
        return torch.mm(a, b)
    if step.op == "scale":
        return args[0] * scales[step.adapter]
    if step.op == "add":
        return functools.reduce(operator.add, args)
    if step.op == "colsum":
        return args[0].sum(0)
    raise AssertionError(f"unknown op {step.op}")


def run_steps(
    steps: Sequence[Step], env: dict[str, torch.Tensor], scales: Sequence[Scale], tag: str
) -> None:
    for step in steps:
        if step.recompute:
            with annotate({RECOMPUTE_ANNOTATION: tag}):
                env[step.out] = _apply(step, env, scales)
        else:
            env[step.out] = _apply(step, env, scales)


class _PlannedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        program: Program,
        tag: str,
        scales: tuple[Scale, ...],
        names: tuple[str, ...],
        *tensors: torch.Tensor,
    ) -> torch.Tensor:
        env = dict(zip(names, tensors))
        run_steps(program.forward, env, scales, tag)
        ctx.program, ctx.scales, ctx.names, ctx.tag = program, scales, names, tag
        ctx.save_for_backward(*(env[name] for name in program.saved))
        return env[program.output]

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        program: Program = ctx.program
        env = dict(zip(program.saved, ctx.saved_tensors))
        env["dy"] = dy
        run_steps(program.backward, env, ctx.scales, ctx.tag)
        grad_of = dict(program.grads)
        grads = tuple(env[grad_of[name]] if name in grad_of else None for name in ctx.names)
        return (None, None, None, None, *grads)


class PlannedLoraLinear:
    """The callable a rewritten graph calls in place of a site's nodes."""

    def __init__(self, name: str, site: LoraSite, plan: Plan) -> None:
        self.__name__ = name  # FX codegen names the global after it
        self.site = site
        self.plan = plan
        self.program = program_for(plan, site)

    def __call__(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_inputs: Sequence[torch.Tensor | None],
        lora_a: Sequence[torch.Tensor],
        lora_b: Sequence[torch.Tensor],
        scales: Sequence[Scale],
    ) -> torch.Tensor:
        d_in = self.site.d_in
        names: list[str] = ["x", "W"]
        tensors: list[torch.Tensor] = [x.reshape(-1, d_in), weight]
        if bias is not None:
            names.append("b")
            tensors.append(bias)
        for k, xd in enumerate(lora_inputs):
            if xd is not None:  # a dropout branch: its D(x) comes from the graph's own dropout
                names.append(f"xd{k}")
                tensors.append(xd.reshape(-1, d_in))
        for k, (a, b) in enumerate(zip(lora_a, lora_b)):
            names += [f"A{k}", f"B{k}"]
            tensors += [a, b]
        y = _PlannedLinearFunction.apply(
            self.program, self.__name__, tuple(scales), tuple(names), *tensors
        )
        return y.reshape(*x.shape[:-1], self.site.d_out)
