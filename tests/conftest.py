"""Shared builders for the tests: tiny real models (HF Llama, PEFT), never mocks."""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pytest_configure(config):
    """Under pytest-xdist each worker gets one torch thread: two workers share two cores."""
    config.addinivalue_line(
        "markers", "rounding: its verdict depends on how this CPU rounds 16-bit products "
        "(`make test` runs these again on the AVX2 code paths)")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    """runlora raises in tests instead of falling back to plain compile (options strict)."""
    monkeypatch.setenv("RUNLORA_STRICT", "1")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch and sees its graphs (no AOTAutograd cache hits)."""
    torch._dynamo.reset()
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def tiny_llama_config(layers: int = 1, hidden: int = 32) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )


def nonzero_lora_b(model: torch.nn.Module, seed: int = 0) -> None:
    """PEFT zero-inits lora_B; make the LoRA path contribute so grads are meaningful."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def peft_llama(layers: int = 1, hidden: int = 32, **lora: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ALL_TARGETS, **lora})
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config(layers, hidden)), config)
    nonzero_lora_b(model)
    return model


def enable_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Gradient checkpointing as a training script turns it on (non-reentrant), with
    `use_cache=False`: with the cache on, transformers >= 5.25 logs a `warning_once` from inside
    peft's forward-hook context manager, where Dynamo cannot break the graph, so it runs the
    whole model eagerly and no backend sees a LoRA site. Compile it under
    `compilable_checkpointing`."""
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


@pytest.fixture
def compilable_checkpointing():
    """transformers >= 5.25 reads its output-capturing context variable inside each checkpointed
    layer after setting it outside; Dynamo refuses that side effect in a checkpoint body and runs
    the whole model eagerly (any backend). The hook does nothing unless hidden states are asked
    for, so not replaying it in the backward changes nothing: allow it, as users must."""
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        yield


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_match(eager: torch.nn.Module, compiled: torch.nn.Module, tol: float) -> None:
    expected, actual = grads(eager), grads(compiled)
    assert expected.keys() == actual.keys()
    assert expected, "no parameter received a gradient"
    for name in expected:
        assert rel_err(actual[name], expected[name]) <= tol, name


def twin(model: torch.nn.Module) -> torch.nn.Module:
    """An identical copy: PEFT draws lora_A from the global RNG, so never build twice."""
    return copy.deepcopy(model)


class PlainCompile:
    """Plain torch.compile's partitioning (no rewrite), graphs run eagerly and recorded."""

    def __init__(self) -> None:
        self.reports: list = []

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        from runlora_fx.backend import eager_inner, record_partitions
        from runlora_fx.report.graph_report import GraphReport

        report = GraphReport.for_inputs(len(self.reports), example_inputs)
        self.reports.append(report)
        return compile_fx(gm, example_inputs, inner_compile=record_partitions(eager_inner, report))


@pytest.fixture
def exact_dropout():
    """Inductor draws dropout masks with eager's RNG (seeded per step), so masks match."""
    with torch._inductor.config.patch(fallback_random=True):
        yield


def load_script(path: Path, name: str):
    """Import a CLI script (experiments/*.py) as a module, to call its main() in-process."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
