"""A plan as a straight-line program over named tensors — the one thing both the cost model
and the executor read, so the counted cost is the cost of what runs.

Names: `x` (N×d_in), `W` (d_out×d_in), `b` (d_out), per adapter k: `xd{k}` (its D(x); `x` itself
when the branch has no dropout), `A{k}` (r×d_in), `B{k}` (d_out×r); `dy` (N×d_out) in backward.
Shared subexpressions (G = dyᵀ D(x), shared by dA/dB and by adapters reading the same input)
are named once and computed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from runlora_fx.plans import Forward, GradA, GradB, Hidden, InputGrad, Plan
from runlora_fx.site import LoraSite

Op = Literal["mm", "scale", "add", "colsum"]
PARAMETERS = ("W", "b", "A", "B")  # name prefixes of weights: never counted as saved activations


@dataclass(frozen=True)
class Step:
    """`out = op(args)`. mm: args[0]ᵀ? @ args[1]ᵀ? per `transpose`; scale: args[0]·s[adapter];
    add: Σ args (broadcasting the bias); colsum: Σ over rows of args[0]."""

    out: str
    op: Op
    args: tuple[str, ...]
    transpose: tuple[bool, bool] = (False, False)
    adapter: int = -1
    recompute: bool = False  # forward steps the partitioner must recompute, not save


@dataclass(frozen=True)
class Program:
    forward: tuple[Step, ...]
    backward: tuple[Step, ...]
    output: str  # forward result
    grads: tuple[tuple[str, str], ...]  # (input name, grad name) pairs the backward returns
    saved: tuple[str, ...]  # forward names the backward reads


def lora_input(site: LoraSite, k: int) -> str:
    return "x" if site.adapters[k].reads_base_input else f"xd{k}"


def is_parameter(name: str) -> bool:
    return name.rstrip("0123456789") in PARAMETERS


def _weff_steps(site: LoraSite, recompute: bool) -> list[Step]:
    """W_eff = W + Σ s_k B_k A_k."""
    steps: list[Step] = []
    for k in range(len(site.adapters)):
        steps.append(Step(f"BA{k}", "mm", (f"B{k}", f"A{k}"), recompute=recompute))
        steps.append(Step(f"sBA{k}", "scale", (f"BA{k}",), adapter=k, recompute=recompute))
    terms = ("W", *(f"sBA{k}" for k in range(len(site.adapters))))
    steps.append(Step("Weff", "add", terms, recompute=recompute))
    return steps


def _hidden_step(site: LoraSite, k: int, recompute: bool = False) -> Step:
    """h_k = D(x) A_kᵀ."""
    return Step(f"h{k}", "mm", (lora_input(site, k), f"A{k}"), (False, True), recompute=recompute)


def _forward(plan: Plan, site: LoraSite) -> list[Step]:
    adapters = range(len(site.adapters))
    bias = ("b",) if site.has_bias else ()
    h_for_backward = plan.hidden is Hidden.SAVE
    steps: list[Step] = []
    if plan.forward is Forward.MERGED:
        steps += _weff_steps(site, recompute=plan.input_grad is not InputGrad.MERGED_KEEP)
        steps.append(Step("xWeff", "mm", ("x", "Weff"), (False, True)))
        steps.append(Step("y", "add", ("xWeff", *bias)))
        if h_for_backward:
            steps += [_hidden_step(site, k) for k in adapters]
        return steps
    steps.append(Step("xW", "mm", ("x", "W"), (False, True)))
    for k in adapters:
        steps.append(_hidden_step(site, k, recompute=plan.hidden is Hidden.RECOMPUTE))
        steps.append(Step(f"hB{k}", "mm", (f"h{k}", f"B{k}"), (False, True)))
        steps.append(Step(f"shB{k}", "scale", (f"hB{k}",), adapter=k))
    steps.append(Step("y", "add", ("xW", *bias, *(f"shB{k}" for k in adapters))))
    if plan.input_grad is InputGrad.MERGED_KEEP:
        steps += _weff_steps(site, recompute=False)
    return steps


def _backward(plan: Plan, site: LoraSite) -> tuple[list[Step], list[tuple[str, str]]]:
    adapters = range(len(site.adapters))
    steps: list[Step] = []
    grads: list[tuple[str, str]] = []
    defined: set[str] = set()

    def emit(step: Step) -> str:
        if step.out not in defined:  # shared subexpression: computed once
            defined.add(step.out)
            steps.append(step)
        return step.out

    def dh(k: int) -> str:  # dh_k = s_k · dy B_k
        emit(Step(f"dyB{k}", "mm", ("dy", f"B{k}")))
        return emit(Step(f"dh{k}", "scale", (f"dyB{k}",), adapter=k))

    def gram(k: int) -> str:  # G = dyᵀ D(x): d_out×d_in, shared by adapters reading one input
        src = lora_input(site, k)
        return emit(Step(f"G[{src}]", "mm", ("dy", src), (True, False)))

    for k in adapters:
        a = site.adapters[k]
        if a.a_requires_grad:
            if plan.grad_a is GradA.VIA_DH:
                emit(Step(f"dA{k}", "mm", (dh(k), lora_input(site, k)), (True, False)))
            else:
                emit(Step(f"BG{k}", "mm", (f"B{k}", gram(k)), (True, False)))
                emit(Step(f"dA{k}", "scale", (f"BG{k}",), adapter=k))
            grads.append((f"A{k}", f"dA{k}"))
        if a.b_requires_grad:
            if plan.grad_b is GradB.VIA_H:
                if plan.hidden is Hidden.RECOMPUTE:
                    emit(_hidden_step(site, k))
                emit(Step(f"dyh{k}", "mm", ("dy", f"h{k}"), (True, False)))
                emit(Step(f"dB{k}", "scale", (f"dyh{k}",), adapter=k))
            else:
                emit(Step(f"GA{k}", "mm", (gram(k), f"A{k}"), (False, True)))
                emit(Step(f"dB{k}", "scale", (f"GA{k}",), adapter=k))
            grads.append((f"B{k}", f"dB{k}"))

    if plan.input_grad is InputGrad.SPLIT:
        terms = [emit(Step("dyW", "mm", ("dy", "W")))]
        for k in adapters:
            dh_a = emit(Step(f"dhA{k}", "mm", (dh(k), f"A{k}")))
            if site.adapters[k].reads_base_input:
                terms.append(dh_a)
            else:  # the grad of D(x); autograd routes it through the dropout's own backward
                grads.append((f"xd{k}", dh_a))
        grads.append(("x", emit(Step("dx", "add", tuple(terms)))))
    elif plan.input_grad is not None:
        if plan.input_grad is InputGrad.MERGED_RECOMPUTE:
            for step in _weff_steps(site, recompute=False):
                emit(step)
        grads.append(("x", emit(Step("dx", "mm", ("dy", "Weff")))))
    if site.bias_requires_grad:
        grads.append(("b", emit(Step("db", "colsum", ("dy",)))))
    return steps, grads


def program_for(plan: Plan, site: LoraSite) -> Program:
    forward = _forward(plan, site)
    backward, grads = _backward(plan, site)
    defined_in_backward = {s.out for s in backward}
    saved: dict[str, None] = {}
    for step in backward:
        for name in step.args:
            if name != "dy" and name not in defined_in_backward:
                saved[name] = None
    return Program(tuple(forward), tuple(backward), "y", tuple(grads), tuple(saved))
