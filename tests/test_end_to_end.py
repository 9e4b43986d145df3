"""End to end on real Inductor, the training loop, the entry point and the options."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import runlora_fx
from conftest import assert_grads_match, peft_llama, rel_err, twin

INDUCTOR_TOL = 1e-5


def test_tiny_llama_on_inductor_matches_eager_including_input_grad():
    eager = peft_llama(layers=2)
    compiled_model = twin(eager)
    backend = runlora_fx.Backend()  # defaults: criterion flops, inner inductor
    compiled = torch.compile(compiled_model, backend=backend)
    ids = torch.randint(0, 128, (2, 40))
    embeds = eager.get_input_embeddings()(ids).detach()
    e_in, c_in = embeds.clone().requires_grad_(), embeds.clone().requires_grad_()

    out_e = eager(inputs_embeds=e_in, labels=ids)
    out_e.loss.backward()
    out_c = compiled(inputs_embeds=c_in, labels=ids)
    out_c.loss.backward()

    assert rel_err(out_c.logits, out_e.logits) <= INDUCTOR_TOL
    assert rel_err(out_c.loss, out_e.loss) <= INDUCTOR_TOL
    assert rel_err(c_in.grad, e_in.grad) <= INDUCTOR_TOL
    assert_grads_match(eager, compiled_model, INDUCTOR_TOL)
    [report] = backend.reports
    assert report.sites_rewritten == 14
    # x requires grad at every site now, so dx is planned everywhere
    assert all(d.chosen.plan.input_grad is not None for d in report.decisions)


def test_twenty_adamw_steps_with_dropout_match_eager(exact_dropout):
    eager = peft_llama(layers=1, lora_dropout=0.1)
    compiled_model = twin(eager)
    compiled = torch.compile(compiled_model, backend="runlora")
    opts = [
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        for m in (eager, compiled_model)
    ]
    gen = torch.Generator().manual_seed(0)
    for step in range(20):
        ids = torch.randint(0, 128, (2, 32), generator=gen)
        losses = []
        for model, opt in zip((eager, compiled), opts):
            torch.manual_seed(step)  # same dropout masks in both
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5), step


def test_backend_string_works_in_a_fresh_process_without_import():
    script = textwrap.dedent(
        """
        import copy, sys, torch
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 8))
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["0", "1"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p)
        twin = copy.deepcopy(model)
        x = torch.randn(32, 16)
        model(x).square().mean().backward()
        assert "runlora_fx" not in sys.modules
        compiled = torch.compile(twin, backend="runlora", options={"inner": "eager"})
        compiled(x).square().mean().backward()
        assert "runlora_fx" in sys.modules
        for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
            if a.grad is not None:
                err = ((a.grad - b.grad).norm() / a.grad.norm()).item()
                assert err <= 1e-5, (n, err)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"criterion": "fastest"}, "criterion='fastest' is not valid; choose one of flops, priced, memory"),
        ({"inner": "cuda"}, "inner='cuda' is not valid; choose one of inductor, eager"),
        ({"criterium": "flops"}, "unknown option(s) 'criterium'; valid options are"),
    ],
)
def test_invalid_options_are_refused_with_the_valid_ones(options, message):
    with pytest.raises(ValueError) as err:
        runlora_fx.Backend(options)
    assert message in str(err.value)


def test_invalid_options_surface_through_torch_compile():
    model = torch.compile(torch.nn.Linear(4, 4), backend="runlora", options={"criterion": "x"})
    with pytest.raises(Exception, match="criterion='x' is not valid"):
        model(torch.randn(2, 4))
