"""Low precision: bf16/fp16 models and CPU bf16 autocast stay within PEFT eager's own error.

Every figure is measured against an fp64 twin of the same weights: err(PEFT eager, low
precision vs fp64) is the budget, and ours may use at most twice it (plus a tiny floor).
Run with `-s` to print the figures the README quotes.

Merging `W + sBA` in a 16-bit dtype rounds away every update element below half an ulp of W
(W is already on the 16-bit grid, so `W + u` rounds back to W). Measured on the small-update
case below (figures in tests/README-stacks-section.md), merging made the adapter's contribution
1.7-11x less accurate than PEFT's, so plans.py makes merged plans illegal when the site's
matmuls run in bf16/fp16 (autocast included).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model

import runlora_fx
from conftest import grads, peft_llama, rel_err
from runlora_fx.plans import Forward, InputGrad, illegal_reason, plans_for
from runlora_fx.site import Adapter, LoraSite

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
FLOOR = 1e-6  # absolute slack on a relative error, for figures PEFT gets (almost) exact


def within_peft_error(ours: float, peft: float) -> bool:
    return ours <= 2 * peft + FLOOR


def autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def llama_step(model, ids, backend=None, amp=False):
    """One forward/backward; returns (logits, loss, grads) of `model`'s parameters."""
    run = torch.compile(model, backend=backend) if backend is not None else model
    with autocast(amp):
        out = run(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits, out.loss, grads(model)


def figures(name, ref, peft, ours):
    """rel errors vs fp64 of logits, loss and the worst grad: (peft, ours) each, printed."""
    (r_logits, r_loss, r_grads), (p_logits, p_loss, p_grads), (o_logits, o_loss, o_grads) = (
        ref, peft, ours
    )
    assert r_grads.keys() == p_grads.keys() == o_grads.keys()
    rows = {
        "logits": (rel_err(p_logits, r_logits), rel_err(o_logits, r_logits)),
        "loss": (rel_err(p_loss, r_loss), rel_err(o_loss, r_loss)),
    }
    for key in r_grads:
        rows[key] = (rel_err(p_grads[key], r_grads[key]), rel_err(o_grads[key], r_grads[key]))
    worst = max((k for k in rows if k not in ("logits", "loss")), key=lambda k: rows[k][0])
    print(f"\n[{name}] rel err vs fp64 (PEFT eager / runlora): "
          f"logits {rows['logits'][0]:.2e} / {rows['logits'][1]:.2e}, "
          f"loss {rows['loss'][0]:.2e} / {rows['loss'][1]:.2e}, "
          f"worst grad {rows[worst][0]:.2e} / {rows[worst][1]:.2e}, "
          f"max grad ratio {max(o / max(p, FLOOR) for k, (p, o) in rows.items()):.2f}")
    return rows


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_llama_within_peft_error(dtype):
    base = peft_llama(layers=1, hidden=32)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = llama_step(copy.deepcopy(base).double(), ids)
    peft = llama_step(copy.deepcopy(base).to(LOW[dtype]), ids)
    backend = runlora_fx.Backend({"inner": "eager"})
    ours = llama_step(copy.deepcopy(base).to(LOW[dtype]), ids, backend)

    for key, (p, o) in figures(dtype, ref, peft, ours).items():
        assert within_peft_error(o, p), (key, o, p)
    [report] = backend.reports
    assert len(report.decisions) == 7 and not report.skipped
    for decision in report.decisions:
        assert decision.site.dtype == LOW[dtype]
        assert decision.chosen.plan.forward is Forward.SPLIT  # merged is illegal in 16 bits


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_cpu_bf16_autocast_step_within_peft_error(inner):
    base = peft_llama(layers=1, hidden=32)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = llama_step(copy.deepcopy(base).double(), ids)
    peft = llama_step(copy.deepcopy(base), ids, amp=True)
    backend = runlora_fx.Backend({"inner": inner})
    ours = llama_step(copy.deepcopy(base), ids, backend, amp=True)

    assert ours[0].dtype == peft[0].dtype
    for key, (p, o) in figures(f"autocast, {inner}", ref, peft, ours).items():
        assert within_peft_error(o, p), (key, o, p)
    [report] = backend.reports
    # PEFT casts a LoRA branch's input to lora_A's dtype (fp32). Where the base linear reads a
    # bf16 activation (o_proj after attention, down_proj after the MLP product) Dynamo records
    # that cast, so the branch reads another tensor than the base: left to plain Inductor.
    found = sorted(d.site.path.rsplit(".", 1)[-1] for d in report.decisions)
    skipped = sorted(s.path.rsplit(".", 1)[-1] for s in report.skipped)
    assert found == ["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert skipped == ["down_proj", "o_proj"] and all(s.reason for s in report.skipped)
    for decision in report.decisions:
        assert decision.site.dtype == torch.float32  # x and W as stored
        assert decision.site.compute_dtype == torch.bfloat16  # what the matmuls produce
        assert decision.chosen.plan.forward is Forward.SPLIT


# --- a small update: does the adapter's contribution survive? --------------------------------

D, N, R = 64, 4096, 4  # N >> d: in fp32 the merged plan wins


def small_update_model(relative: float) -> torch.nn.Module:
    """One PEFT linear (no bias) whose s·BA is `relative` of W's mean magnitude."""
    torch.manual_seed(0)
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(D, D, bias=False)),
        LoraConfig(r=R, lora_alpha=R, target_modules=["0"]),
    )
    layer = model.base_model.model[0]
    weight, a, b = layer.base_layer.weight, layer.lora_A.default.weight, layer.lora_B.default.weight
    with torch.no_grad():
        b.normal_()
        b.mul_(relative * weight.abs().mean() / (b @ a).abs().mean())
    return model


def lora_effect(model, x, dtype, backend=None):
    """(output, output − base output) of a copy of `model` run in `dtype` ("autocast": fp32
    weights under CPU bf16 autocast)."""
    amp = dtype == "autocast"
    model = copy.deepcopy(model).to(torch.float32 if amp else dtype)
    x = x.to(torch.float32 if amp else dtype)
    run = torch.compile(model, backend=backend) if backend is not None else model
    with autocast(amp):
        y = run(x)
        with model.disable_adapter():
            y0 = model(x)
    return y, y - y0


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "autocast"])
@pytest.mark.parametrize("relative", [1e-3, 1e-4])
def test_a_small_adapter_update_is_not_rounded_away(dtype, relative):
    model = small_update_model(relative)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    y_ref, delta_ref = lora_effect(model, x, torch.float64)
    y_peft, delta_peft = lora_effect(model, x, LOW.get(dtype, dtype))
    backend = runlora_fx.Backend({"inner": "eager"})
    y_ours, delta_ours = lora_effect(model, x, LOW.get(dtype, dtype), backend)

    errs = {
        "output": (rel_err(y_peft, y_ref), rel_err(y_ours, y_ref)),
        "lora effect": (rel_err(delta_peft, delta_ref), rel_err(delta_ours, delta_ref)),
    }
    print(f"\n[small update {relative:g}, {dtype}] rel err vs fp64 (PEFT eager / runlora): "
          + ", ".join(f"{k} {p:.3e} / {o:.3e}" for k, (p, o) in errs.items()))
    for key, (p, o) in errs.items():
        assert within_peft_error(o, p), (key, o, p)
    [decision] = backend.reports[0].decisions
    assert decision.chosen.plan.forward is Forward.SPLIT


def test_the_same_small_update_site_merges_in_fp32():
    """The case above is one where merging is chosen when it is exact enough (fp32)."""
    model = small_update_model(1e-3)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    y_ref, delta_ref = lora_effect(model, x, torch.float64)
    backend = runlora_fx.Backend({"inner": "eager"})
    y_ours, delta_ours = lora_effect(model, x, torch.float32, backend)
    [decision] = backend.reports[0].decisions
    assert decision.chosen.plan.forward is Forward.MERGED
    assert rel_err(delta_ours, delta_ref) <= 1e-3


def test_a_16_bit_weight_swallows_an_update_below_half_an_ulp():
    """Why merging is illegal in 16 bits: W is on the bf16 grid, so W + u rounds back to W."""
    weight = torch.randn(64, 64).to(torch.bfloat16)
    update = (weight.float().abs() * 1e-3).to(torch.bfloat16)  # far below half an ulp (2^-9)
    assert torch.equal(weight + update, weight)


def _site(dtype: torch.dtype, compute_dtype: torch.dtype | None = None) -> LoraSite:
    return LoraSite(
        path="layer", n=4096, d_in=64, d_out=64,
        adapters=(Adapter(r=4, dropout_p=0.0, scale=1.0, a_requires_grad=True,
                          b_requires_grad=True),),
        dtype=dtype, has_bias=False, bias_requires_grad=False, x_requires_grad=True,
        training=True, compute_dtype=compute_dtype,
    )


@pytest.mark.parametrize(
    "dtype, compute_dtype, merges",
    [
        (torch.float32, None, True),
        (torch.float64, None, True),
        (torch.bfloat16, None, False),
        (torch.float16, None, False),
        (torch.float32, torch.bfloat16, False),  # autocast
        (torch.float32, torch.float16, False),
    ],
)
def test_merged_plans_are_illegal_when_the_matmuls_run_in_16_bits(dtype, compute_dtype, merges):
    site = _site(dtype, compute_dtype)
    plans = plans_for(site)
    merged = [
        p for p in plans
        if p.forward is Forward.MERGED
        or p.input_grad in (InputGrad.MERGED_RECOMPUTE, InputGrad.MERGED_KEEP)
    ]
    assert bool(merged) == merges
    if not merges:
        any_merged = dataclasses.replace(plans[0], forward=Forward.MERGED)
        assert "rounds away every update below half an ulp of W" in illegal_reason(
            any_merged, site
        )
