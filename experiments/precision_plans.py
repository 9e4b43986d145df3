"""runlora's own plans as precision_exp.py variants: the programs the rewritten graph runs
(runlora_fx.ir.execute.UnitCall), so the measured rule is the rule of what runs.

    python experiments/precision_exp.py --plugin precision_plans --variants peft \\
        runlora:split runlora:merged-nearest runlora:merged-stochastic runlora:branch-base …

`runlora:split` is the PEFT order in the site's dtypes (what every 16-bit site may run); the
merged variants round W_eff = W + s·BA (summed in fp32) to the base dtype; `runlora:branch-base`
runs the LoRA products in the base dtype where the site runs them in fp32 (what one GEMM over
[W; A] needs at a PEFT-default site). Each runs without the legality rule (it is what is judged).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from runlora_fx.ir.execute import UnitCall
from runlora_fx.ir.operands import operands
from runlora_fx.ir.plans import Forward, GradA, GradB, Hidden, InputGrad, Plan, canonical
from runlora_fx.ir.precision import Precision
from runlora_fx.ir.rounding import Rounding
from runlora_fx.ir.site import Adapter, LoraSite, SiteGroup

REFERENCE = Plan(Forward.SPLIT, InputGrad.SPLIT, GradA.VIA_DH, GradB.VIA_H, Hidden.SAVE,
                 Precision.SITE)
MERGED = Plan(Forward.MERGED, InputGrad.MERGED_RECOMPUTE, GradA.VIA_DH, GradB.VIA_H,
              Hidden.RECOMPUTE, Precision.SITE)


def site_of(kind, n: int, d: int, r: int, s: float) -> LoraSite:  # kind: precision_exp.Kind
    """The LoraSite runlora's matcher records for one LoRA linear of this kind."""
    base = kind.compute
    return LoraSite(
        path="precision", n=n, d_in=d, d_out=d,
        adapters=(Adapter(r, 0.0, s, True, True),), dtype=kind.store, has_bias=False,
        bias_requires_grad=False, x_requires_grad=True, training=True,
        base_dtype=base if base != kind.store else None,
        adapter_dtype=kind.adapter if kind.adapter != kind.store else None,
        lora_dtype=kind.branch if kind.branch != base else None,
        result_dtype=base if torch.promote_types(base, kind.branch) != base else None,
    )


def run_plan(plan: Plan):
    def variant(x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float, dy: Tensor, kind,
                gen: torch.Generator):
        unit = SiteGroup((site_of(kind, x.shape[0], x.shape[1], A.shape[0], s),))
        xg, ag, bg = (t.detach().clone().requires_grad_() for t in (x, A, B))
        by_role = {"x": xg, "W": W, "A": ag, "B": bg}
        tensors = [by_role[op.role.value] for op in operands(unit)]
        with torch.random.fork_rng():
            torch.manual_seed(gen.initial_seed())  # stochastic rounding draws from torch's RNG
            y = UnitCall("precision", unit, canonical(plan, unit))(tensors, [s])
        y.backward(dy)
        return y.detach(), xg.grad, ag.grad, bg.grad
    return variant


VARIANTS = {
    "runlora:split": run_plan(REFERENCE),
    "runlora:merged-nearest": run_plan(replace(MERGED, rounding=Rounding.NEAREST)),
    "runlora:merged-stochastic": run_plan(replace(MERGED, rounding=Rounding.STOCHASTIC)),
    "runlora:branch-base": run_plan(replace(REFERENCE, branch=Precision.BASE)),
}
