"""The LoRA users run (tests/lora_zoo.py: GPT-2's Conv1D, BERT and T5 behind their own dropout,
the transformers families of zoo.ARCHITECTURES, QLoRA on bitsandbytes 4-bit and torchao NF4,
torchtune, loralib, DoRA): every LoRA module is rewritten or reported with its reason — none is
missed silently — and every grad equals eager's.

Each case is built twice from its seed (a deep copy would re-quantize an NF4 weight).
"""

from __future__ import annotations

import pytest
import torch

import lora_zoo as zoo
import runlora_fx
from conftest import rel_err

FP32_TOL = 1e-5
LORA_ATTRS = ("lora_A", "lora_B", "lora_a", "lora_b")

# case → (builder kwargs, every LoRA module rewritten?)
REWRITTEN = {
    "gpt2": (zoo.gpt2_peft, {}),
    "bert": (zoo.bert_peft, {}),
    "bert-lora-dropout": (zoo.bert_peft, {"lora_dropout": 0.1}),
    "dropout-p0": (zoo.dropout_linear_peft, {"p": 0.0}),
    "dropout-p0.1": (zoo.dropout_linear_peft, {"p": 0.1}),
    "t5": (zoo.t5_peft, {}),
    "bnb-4bit": (zoo.bnb_llama_peft, {"bits": 4}),
    "nf4-x-grad": (zoo.nf4_lora_module, {"x_requires_grad": True}),
    "nf4-x-frozen": (zoo.nf4_lora_module, {"x_requires_grad": False}),
    "torchtune-qlora": (zoo.torchtune_llama, {}),
    "torchtune-lora": (zoo.torchtune_llama, {"quantize_base": False}),
    "loralib-linear": (zoo.loralib_linear, {}),
    **{arch: (zoo.hf_peft, {"arch": arch}) for arch in zoo.ARCHITECTURES},
}
REPORTED = {  # case → (builder, kwargs, a phrase every reason for it holds)
    "loralib-merged-linear": (zoo.loralib_merged_linear, {}, "loralib MergedLinear"),
    "bnb-8bit": (zoo.bnb_llama_peft, {"bits": 8}, "in-place op"),
    "dora": (zoo.dora_llama, {}, "DoRA: not rewritten"),
}


def lora_modules(model: torch.nn.Module) -> set[str]:
    """Modules holding LoRA weights, by the model's own names (not the matcher's rules)."""
    return {name for name, module in model.named_modules()
            if any(hasattr(module, a) for a in LORA_ATTRS)}


def run(build, kwargs) -> tuple[zoo.Case, zoo.Case, runlora_fx.Backend]:
    eager, compiled = build(**kwargs), build(**kwargs)
    backend = runlora_fx.Backend({"inner": "eager"})
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(0)
        expected = eager.step()
        torch.manual_seed(0)
        got = compiled.step(torch.compile(compiled.model, backend=backend))
    assert rel_err(got, expected) <= FP32_TOL
    want = {n: p.grad for n, p in eager.model.named_parameters() if p.grad is not None}
    have = {n: p.grad for n, p in compiled.model.named_parameters() if p.grad is not None}
    assert want and want.keys() == have.keys()
    for name in want:
        assert rel_err(have[name], want[name]) <= FP32_TOL, name
    # every LoRA module appeared in a compiled graph (DoRA's too: part of each module is in one)
    outside = {r.outside for r in backend.reports}
    assert len(outside) == 1 and None not in outside and not outside.pop().paths
    return eager, compiled, backend


def rewritten_paths(backend) -> set[str]:
    return {s.path for r in backend.reports for d in r.decisions for s in d.sites}


@pytest.mark.parametrize("case", REWRITTEN)
def test_every_lora_module_is_rewritten(case):
    build, kwargs = REWRITTEN[case]
    eager, _, backend = run(build, kwargs)
    skipped = [(s.path, s.reason) for r in backend.reports for s in r.skipped]
    assert not skipped
    assert lora_modules(eager.model) == rewritten_paths(backend)


@pytest.mark.parametrize("case", REPORTED)
def test_the_lora_modules_left_alone_are_reported_with_their_reason(case):
    build, kwargs, phrase = REPORTED[case]
    eager, _, backend = run(build, kwargs)
    reasons = {s.path: s.reason for r in backend.reports for s in r.skipped}
    assert reasons and all(phrase in why for why in reasons.values()), reasons
    if case == "dora":
        # DoRA's frames resume after a graph break with no module stack, and same-shaped sites
        # reuse one compiled graph: its reports name the lora_A weight, one per graph
        assert not rewritten_paths(backend)
        return
    covered = rewritten_paths(backend) | set(reasons)
    assert lora_modules(eager.model) <= covered
    if case == "bnb-8bit":  # where x needs grad bitsandbytes dequantizes out of place
        assert rewritten_paths(backend)
