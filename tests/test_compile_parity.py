"""Parity of backend="runlora" with eager PEFT: outputs, loss, every LoRA grad, the input grad."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import runlora_fx
from conftest import assert_grads_match, nonzero_lora_b, rel_err, twin

FP32_TOL = 1e-5


class TwoLinears(torch.nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.up = torch.nn.Linear(16, 24, bias=bias)
        self.down = torch.nn.Linear(24, 8, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


def peft_two_linears(bias=True, dropout=0.0, rslora=False, second_adapter=False):
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["up", "down"], lora_dropout=dropout, use_rslora=rslora
    )
    model = get_peft_model(TwoLinears(bias), config)
    if second_adapter:
        model.add_adapter("second", LoraConfig(r=2, lora_alpha=3, target_modules=["up", "down"]))
        model.base_model.set_adapter(["default", "second"])
        for name, param in model.named_parameters():  # set_adapter leaves only one trainable
            param.requires_grad_("lora_" in name)
    nonzero_lora_b(model)
    return model


def step(model, x, seed=1):
    torch.manual_seed(seed)  # the same dropout masks in eager and compiled runs
    out = model(x)
    loss = out.square().mean()
    loss.backward()
    return out, loss


CASES = {
    "bias": {},
    "no-bias": {"bias": False},
    "dropout": {"dropout": 0.2},
    "rslora": {"rslora": True},
    "two-adapters": {"second_adapter": True},
    "two-adapters-dropout": {"second_adapter": True, "dropout": 0.3},
}


@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "x-frozen"])
@pytest.mark.parametrize("case", CASES)
def test_parity_with_eager_peft(case, x_grad, exact_dropout):
    eager = peft_two_linears(**CASES[case])
    compiled_model = twin(eager)
    backend = runlora_fx.Backend({"inner": "eager"})
    compiled = torch.compile(compiled_model, backend=backend)
    x = torch.randn(4, 16, 16)
    x_eager, x_comp = x.clone().requires_grad_(x_grad), x.clone().requires_grad_(x_grad)

    out_e, loss_e = step(eager, x_eager)
    out_c, loss_c = step(compiled, x_comp)

    assert rel_err(out_c, out_e) <= FP32_TOL
    assert rel_err(loss_c, loss_e) <= FP32_TOL
    assert_grads_match(eager, compiled_model, FP32_TOL)
    if x_grad:
        assert rel_err(x_comp.grad, x_eager.grad) <= FP32_TOL
    [report] = backend.reports
    assert len(report.decisions) == 2 and not report.skipped  # both sites were rewritten
    adapters = 2 if CASES[case].get("second_adapter") else 1
    assert all(len(d.site.adapters) == adapters for d in report.decisions)


def test_dropout_sites_merge_only_with_sparse_dropout():
    """With the graph's dropout the branch reads D(x), so nothing merges; a plan that draws
    its own positions reads x and corrects at them, so merging is open to it."""
    for dropout, mode in ((0.0, "auto"), (0.2, "graph"), (0.2, "sparse")):
        # flops: these shapes (N 64, d 16) merge under it; the test is about what may merge
        backend = runlora_fx.Backend({"inner": "eager", "dropout": mode, "criterion": "flops"})
        model = torch.compile(peft_two_linears(dropout=dropout), backend=backend)
        step(model, torch.randn(4, 16, 16, requires_grad=True))
        plans = [d.chosen.plan for d in backend.reports[0].decisions]
        if mode == "graph":
            assert {p.forward.value for p in plans} == {"split"} and not any(
                p.merges for p in plans)
        elif dropout:
            assert all(p.sparse_dropout for p in plans)
        else:
            assert {p.forward.value for p in plans} == {"merged"}


def test_eval_mode_sites_may_merge():
    model = peft_two_linears(dropout=0.2).eval()
    expected = model(x := torch.randn(4, 16, 16))
    backend = runlora_fx.Backend({"inner": "eager"})
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(x)
    assert rel_err(got, expected) <= FP32_TOL
    assert {d.chosen.plan.forward.value for d in backend.reports[0].decisions} == {"merged"}


def test_memory_criterion_parity():
    eager = peft_two_linears()
    compiled_model = twin(eager)
    backend = runlora_fx.Backend({"inner": "eager", "criterion": "memory"})
    x = torch.randn(4, 16, 16)
    step(eager, x.clone().requires_grad_())
    step(torch.compile(compiled_model, backend=backend), x.clone().requires_grad_())
    assert_grads_match(eager, compiled_model, FP32_TOL)
