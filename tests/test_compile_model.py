"""`runlora_fx.compile(model)` (runlora_fx/compile_model.py): in place, Dynamo's checkpoint
side-effect setting scoped to the model's own compiled calls (recompiles included), use_cache off
where transformers turns it off. HF Trainer and TRL runs: tests/test_training_stacks.py."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import runlora_fx
from conftest import assert_grads_match, peft_llama, rel_err, twin
from runlora_fx.compile_model import DYNAMO_SETTING, CompiledCall
from runlora_fx.report.outside import Outside

EAGER = {"inner": "eager"}
COUNT = {"calls": 0}


def setting() -> bool:
    return getattr(torch._dynamo.config, DYNAMO_SETTING)


class TinyLora(nn.Module):
    """A frozen linear and a LoRA branch, PEFT's names."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(8, 8).requires_grad_(False)
        self.lora_A = nn.Linear(8, 2, bias=False)
        self.lora_B = nn.Linear(2, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + 0.5 * self.lora_B(self.lora_A(x))


class Body(nn.Module):
    """Two LoRA linears and a side effect (a global dict's counter, as transformers sets its
    output-capturing state): Dynamo refuses it in a checkpoint body unless the setting is on."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = TinyLora(), TinyLora()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        COUNT["calls"] += 1
        return self.second(self.first(x))


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = Body(), TinyLora()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.block, x * 2, use_reentrant=False)).sum()


def x_input(rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, 8, generator=torch.Generator().manual_seed(rows), requires_grad=True)


def rewritten(backend: runlora_fx.Backend) -> int:
    return sum(r.sites_rewritten for r in backend.reports)


def test_compiles_in_place_and_refuses_what_it_cannot_use():
    model = Checkpointed()
    backend = runlora_fx.Backend(EAGER)
    assert runlora_fx.compile(model, backend=backend) is model
    assert isinstance(model._compiled_call_impl, CompiledCall)
    with pytest.raises(ValueError, match="unknown option"):
        runlora_fx.compile(Checkpointed(), criterion="flops", budget=1)
    with pytest.raises(ValueError, match="not both"):
        runlora_fx.compile(Checkpointed(), backend=backend, inner="eager")
    with pytest.raises(TypeError, match="a runlora_fx.Backend"):
        runlora_fx.compile(Checkpointed(), backend="runlora")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        runlora_fx.compile(lambda x: x)


def test_the_checkpoint_setting_holds_for_the_models_calls_only(recwarn):
    """With runlora_fx.compile the checkpointed block compiles (3 of 3 sites rewritten), and so it
    does again when a new input shape recompiles; the process-wide setting stays off. A copy
    compiled with torch.compile as before gets what it always got: the block runs eagerly."""
    model = Checkpointed()
    plain, expected = twin(model), twin(model)
    backend = runlora_fx.Backend(EAGER)
    runlora_fx.compile(model, backend=backend)

    model(x_input()).backward()
    assert not setting()
    assert rewritten(backend) == 3 and {r.outside for r in backend.reports} == {Outside(3)}

    graphs = len(backend.reports)
    model(x_input(rows=6)).backward()  # a recompile, traced under the setting again
    assert len(backend.reports) > graphs and not setting()
    assert sum(r.sites_rewritten for r in backend.reports[graphs:]) == 3
    assert not [w for w in recwarn if str(w.message).startswith("runlora")]

    for x in (x_input(), x_input(rows=6)):  # the compiled steps matched eager
        expected(x).backward()
    assert_grads_match(expected, model, 1e-5)

    torch._dynamo.reset()
    plain_backend = runlora_fx.Backend(EAGER)
    torch.compile(plain, backend=plain_backend)(x_input()).backward()
    assert rewritten(plain_backend) == 1  # the head only: torch.compile's behaviour unchanged


def test_use_cache_is_turned_off_where_transformers_turns_it_off(caplog):
    """The condition of transformers' own switch (utils/generic.py, modeling_layers.py):
    training, gradients on, a module checkpointing, the cache asked for or on in the config."""
    model = peft_llama(layers=1)
    call = CompiledCall(model, lambda *a, **k: None)
    assert model.config.use_cache
    assert call.without_cache((), {}) == {}  # no checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with caplog.at_level(logging.INFO, logger="runlora_fx"):
        assert call.without_cache((), {"labels": 1}) == {"labels": 1, "use_cache": False}
        assert call.without_cache((), {"use_cache": True}) == {"use_cache": False}
        assert call.without_cache((), {"use_cache": False}) == {"use_cache": False}
        with torch.no_grad():
            assert call.without_cache((), {}) == {}
        model.eval()
        assert call.without_cache((), {}) == {}
        model.train()
        llama = CompiledCall(model.base_model.model, lambda *a, **k: None)
        at = llama.use_cache_at  # LlamaForCausalLM.forward(input_ids, …, use_cache, …)
        assert at is not None and llama.without_cache((None,) * at, {}) == {"use_cache": False}
        assert llama.without_cache((None,) * (at + 1), {}) == {}  # given positionally: left be
        assert CompiledCall(nn.Linear(2, 2), lambda *a, **k: None).use_cache_at is None
        model.config.use_cache = False
        assert call.without_cache((), {}) == {}
    # once per compiled model: the PeftModel's, then the Llama's
    [line, _] = [r.getMessage() for r in caplog.records if "use_cache" in r.getMessage()]
    assert line.startswith(f"runlora: {type(model).__name__} trains with gradient checkpointing: "
                           "its compiled calls get use_cache=False")
    assert model.config.use_cache is False  # the test's own; runlora never writes the config


def test_a_checkpointed_llama_with_use_cache_on_compiles_whole(caplog):
    """Gradient checkpointing as the transformers docs set it up (use_cache left on, no Dynamo
    setting): every site is rewritten, two steps match eager, nothing is said but the one INFO
    line, the config and the process-wide setting stay as they were, and transformers' warning
    no longer breaks the graph."""
    model = peft_llama(layers=1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    eager = twin(model)
    backend = runlora_fx.Backend(EAGER)
    runlora_fx.compile(model, backend=backend)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))

    with caplog.at_level(logging.INFO, logger="runlora_fx"), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            got = model(input_ids=ids, labels=ids).loss
            got.backward()
            expected = eager(input_ids=ids, labels=ids).loss
            expected.backward()
            assert rel_err(got, expected) <= 1e-6
    assert_grads_match(eager, model, 1e-5)
    assert rewritten(backend) == 7 and not [s for r in backend.reports for s in r.skipped]
    assert {r.outside for r in backend.reports} == {Outside(7)}
    assert not [w for w in caught if str(w.message).startswith("runlora")]
    ours = [r for r in caplog.records if r.name == "runlora_fx"]  # the eager twin warns its own
    assert len([r for r in ours if "use_cache=False" in r.getMessage()]) == 1
    assert not [r for r in ours if r.levelno >= logging.WARNING]
    assert model.config.use_cache and not setting()
    reasons = [r.reason for r in torch._dynamo.utils.graph_break_reasons]
    assert not [r for r in reasons if "logging" in r]
