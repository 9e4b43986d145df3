"""LoRA modules that ran outside every compiled graph are counted and said once, with the graph
break that put them there (runlora_fx/coverage.py, runlora_fx/outside.py).

The PEFT Llama cases are the ones users meet: gradient checkpointing set up as the transformers
docs show it (Dynamo refuses each checkpointed layer, which then runs eagerly), and DoRA inside
checkpointed layers. With the remedy nothing is said and every site is rewritten:
tests/test_checkpointing.py checks that on its compiles. Tiny hand-written modules cover the
rest cheaply.
"""

from __future__ import annotations

import json
import logging
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaForCausalLM

import lora_zoo as zoo
import runlora_fx
from conftest import peft_llama, tiny_llama_config
from runlora_fx import coverage
from runlora_fx.report.outside import (
    CHECKPOINT_DOC, CHECKPOINT_REMEDY, DORA_IN_CHECKPOINT, NO_BREAK, Cause, CodeSpan, Outside,
    causes, forward_spans,
)

OUTSIDE = "ran outside every compiled graph"
EAGER = {"inner": "eager"}


@contextmanager
def said() -> Iterator[tuple[list[str], list[str]]]:
    """(runlora's WARNING log lines, runlora's RuntimeWarnings) while the block runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("runlora_fx")
    logger.addHandler(handler)
    logs: list[str] = []
    python: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield logs, python
        finally:
            logger.removeHandler(handler)
    logs += [r.getMessage() for r in records if r.levelno == logging.WARNING]
    python += [str(w.message) for w in caught if str(w.message).startswith("runlora")]


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def docs_checkpointing(model: nn.Module) -> nn.Module:
    """Gradient checkpointing as the transformers docs set it up (use_cache left on)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


# ---- PEFT Llama ----------------------------------------------------------------------------------


def test_checkpointed_llama_warns_once_with_count_cause_and_remedy(tmp_path):
    """Every decoder layer runs eagerly: the one warning (a string backend makes a Backend per
    graph, two steps run) names 14 of 14 and the break; the dumps, the INFO lines and explain()
    carry the same accounting. The check costs no graph and no recompile."""
    model = docs_checkpointing(peft_llama(layers=2))
    explanation = runlora_fx.explain(model, input_ids=ids(), labels=ids())
    assert coverage.LEDGER not in vars(model)  # explain leaves no trace

    torch._dynamo.reset()
    stats = torch._dynamo.utils.counters["stats"]
    before = stats["unique_graphs"]
    options = {**EAGER, "debug_dir": str(tmp_path)}
    compiled = torch.compile(model, backend="runlora", options=options)
    with said() as (logs, python):
        compiled(input_ids=ids(), labels=ids()).loss.backward()
        graphs = stats["unique_graphs"] - before
        compiled(input_ids=ids(), labels=ids()).loss.backward()
    assert stats["unique_graphs"] - before == graphs  # the second step compiles nothing

    [log] = [line for line in logs if OUTSIDE in line]
    assert [w for w in python if OUTSIDE in w] == [log]
    assert log.startswith("runlora: 14 of 14 LoRA modules (base_model.model.model.layers.0.")
    assert "graph break in a gradient-checkpointed layer: HOP: Unsafe side effect" in log
    assert CHECKPOINT_REMEDY in log and log.endswith(f"see {CHECKPOINT_DOC}")

    docs = [json.loads((folder / "sites.json").read_text()) for folder in tmp_path.iterdir()]
    assert len(docs) == graphs > 1
    for doc in docs:
        assert doc["coverage"]["warning"] == log and len(doc["coverage"]["outside"]) == 14
        assert doc["totals"]["lora_modules"] == 14 and not doc["sites"]
    for folder in tmp_path.iterdir():
        assert log in (folder / "report.md").read_text(encoding="utf-8")
    assert explanation.coverage == docs[0]["coverage"]
    assert OUTSIDE in str(explanation)
    assert "0 of 14 LoRA modules rewritten" in repr(explanation)


def test_dora_in_checkpointed_layers_names_peft_break(compilable_checkpointing):
    """With the checkpointing remedy, DoRA's own graph break (in every LoRA module) is what keeps
    each checkpointed layer out of the graphs: the warning names it, as upstream."""
    case = zoo.dora_llama()
    model = docs_checkpointing(case.model)
    model.config.use_cache = False
    backend = runlora_fx.Backend(EAGER)
    with said() as (logs, _):
        case.step(torch.compile(model, backend=backend))
    [log] = [line for line in logs if OUTSIDE in line]
    assert log.startswith("runlora: 7 of 7 LoRA modules")  # 1 layer
    assert "peft's DoRA forward graph-breaks in every LoRA module at dequantize_module_weight" \
        in log
    assert "upstream" in log and "integrations.py" in log and DORA_IN_CHECKPOINT in log
    outside = backend.reports[0].outside
    assert outside is not None and {c.kind for c in outside.causes} == {"dora"}
    assert all(r.outside is outside for r in backend.reports)


def test_a_model_without_lora_is_not_warned_about():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    backend = runlora_fx.Backend(EAGER)
    with said() as (logs, python):
        torch.compile(model, backend=backend)(input_ids=ids(), labels=ids()).loss.backward()
    assert not logs and not python
    assert [(r.lora_modules, r.outside) for r in backend.reports] == [(0, Outside(0))]
    assert coverage.LEDGER not in vars(model)


def test_fullgraph_raises_before_anything_is_said():
    model = docs_checkpointing(peft_llama(layers=1))
    with said() as (logs, python), pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(model, backend="runlora", options=EAGER, fullgraph=True)(
            input_ids=ids(), labels=ids())
    assert not logs and not python
    assert coverage.LEDGER not in vars(model)


# ---- tiny modules --------------------------------------------------------------------------------


class TinyLora(nn.Module):
    """A frozen linear and a LoRA branch, PEFT's names; `breaks`: a graph break between them."""

    def __init__(self, breaks: bool = False) -> None:
        super().__init__()
        self.base = nn.Linear(8, 8).requires_grad_(False)
        self.lora_A = nn.Linear(8, 2, bias=False)
        self.lora_B = nn.Linear(2, 8, bias=False)
        self.breaks = breaks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.breaks:
            torch._dynamo.graph_break()
        return y + 0.5 * self.lora_B(self.lora_A(x))


class Block(nn.Module):
    """Two LoRA linears; counts its calls (a side effect Dynamo refuses in a checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = TinyLora(), TinyLora()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.second(self.first(x))


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = Block(), TinyLora()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = checkpoint(self.block, x * 2, use_reentrant=False)
        return self.head(x).sum()


class Layers(nn.Module):
    """Identical layers, each broken between base and branch: Dynamo compiles the layer's frame
    once and runs every layer through that graph."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TinyLora(breaks=True) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.sum()


def x_input() -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)


def test_a_refused_checkpoint_counts_its_modules_and_names_the_break():
    """Dynamo refuses the checkpointed block (its call counter is a side effect it cannot undo):
    the block runs eagerly; the break is named, without the transformers remedy (Dynamo's hint
    does not name the setting for this one)."""
    model, backend = Checkpointed(), runlora_fx.Backend(EAGER)
    with said() as (logs, _):
        torch.compile(model, backend=backend)(x_input()).backward()
    [log] = [line for line in logs if OUTSIDE in line]
    assert log.startswith("runlora: 2 of 3 LoRA modules (block.first, …) ran outside")
    assert log.endswith(f"see {CHECKPOINT_DOC}") and CHECKPOINT_REMEDY not in log
    outside = backend.reports[0].outside
    assert outside is not None and outside.paths == ("block.first", "block.second")
    [cause] = outside.causes
    assert (cause.kind, cause.reason) == ("checkpoint", "HOP: Non-nullified side effect")
    assert cause.remedy is None and "test_coverage.py" in cause.where
    assert sum(r.sites_rewritten for r in backend.reports) == 1  # the head


def test_graphs_reused_across_layers_cover_every_layer():
    """Only the first layer reaches the backend; the others run through its graph, and count
    as covered."""
    backend = runlora_fx.Backend(EAGER)
    with said() as (logs, python):
        torch.compile(Layers(), backend=backend)(x_input()).backward()
    assert not logs and not python
    assert {r.outside for r in backend.reports} == {Outside(3)}


def test_accounting_failures_never_fail_the_compile(monkeypatch):
    """A fault in the accounting (injected into coverage's own function) is a DEBUG line; the
    compile and the step go on. Strict raises."""

    def broken(*args: object) -> set[str]:
        raise KeyError("injected")

    monkeypatch.setattr(coverage, "covered", broken)
    backend = runlora_fx.Backend({**EAGER, "strict": False})
    with said() as (logs, python):
        torch.compile(Checkpointed(), backend=backend)(x_input()).backward()
    assert not logs and not python
    assert all(r.outside is None and r.failure is None for r in backend.reports)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="injected"):
        torch.compile(Checkpointed(), backend=runlora_fx.Backend({**EAGER, "strict": True}))(
            x_input())


def test_a_copy_of_a_model_is_accounted_on_its_own():
    """The ledger lives on the model; a copy starts without one (and pickles do too)."""
    import copy
    import pickle

    model = Checkpointed()
    with said():
        torch.compile(model, backend=runlora_fx.Backend(EAGER))(x_input()).backward()
    assert isinstance(vars(model)[coverage.LEDGER], coverage.Ledger)
    assert vars(copy.deepcopy(model))[coverage.LEDGER] is None
    assert vars(pickle.loads(pickle.dumps(model)))[coverage.LEDGER] is None
    torch._dynamo.reset()
    twin = copy.deepcopy(model)
    with said() as (logs, _):
        torch.compile(twin, backend=runlora_fx.Backend(EAGER))(x_input()).backward()
    assert [line for line in logs if OUTSIDE in line]


# ---- the pure parts ------------------------------------------------------------------------------


def test_source_paths_and_reuse_across_instances():
    model = Layers()
    index = coverage.LoraIndex.of(model)
    assert index.modules == ("layers.0", "layers.1", "layers.2")
    assert index.owner["layers.1.lora_A.weight"] == "layers.1"
    assert "layers.1.base.weight" not in index.owner  # not a LoRA parameter
    # read at `lora_A.weight` below a TinyLora root: every TinyLora
    assert index.marked("layers.0.lora_A.weight", "lora_A.weight") == set(index.modules)
    # below the model itself: that one only; no source: that one only
    assert index.marked("layers.2.lora_B.weight", "layers.2.lora_B.weight") == {"layers.2"}
    assert index.marked("layers.1.lora_B.weight", None) == {"layers.1"}
    # a fake in place of the Parameter (DDP's graph splitter): by the path its source reads
    assert index.read_at("layers.2.lora_A.weight") == {"layers.2"}
    assert index.read_at("lora_B.weight") == set(index.modules)
    assert index.read_at("base.weight") == set()

    node = torch.fx.Graph().placeholder("p")
    for name, path in [
        ("L['self']._modules['layers']._modules['0']._parameters['weight']", "layers.0.weight"),
        ("L['self'].__dict__['_modules']['q']._parameters['w']", "q.w"),
        ("G['model'].lm_head.weight", "lm_head.weight"),
        ("L['x']", ""),
        ("___stack0[0]", None),
    ]:
        node._dynamo_source = type("Source", (), {"name": name})()  # type: ignore[attr-defined]
        assert coverage.source_path(node) == path, name


def _frame(fn, offset: int = 1, line: str = "") -> traceback.FrameSummary:
    code = fn.__code__
    return traceback.FrameSummary(code.co_filename, code.co_firstlineno + offset, code.co_name,
                                  lookup_line=False, line=line)


class Reason:
    def __init__(self, reason: str, *stack: traceback.FrameSummary) -> None:
        self.reason, self.user_stack = reason, list(stack)


def dequantize_module_weight() -> None:  # peft's name
    pass


def test_breaks_are_kept_when_their_stack_runs_through_the_modules():
    own = forward_spans({TinyLora})
    holding = forward_spans({Block, Checkpointed})
    outer = _frame(Checkpointed.forward, 1, "x = checkpoint(self.block, x * 2)")
    side_effect = Reason("HOP: Unsafe side effect\n  Hint: … setting `torch._dynamo.config."
                         "skip_fwd_side_effects_in_bwd_under_checkpoint = True`", outer,
                         _frame(Block.forward, 1))
    inside = Reason("Unsupported method call", _frame(TinyLora.forward, 2),
                    _frame(dequantize_module_weight, 1))
    elsewhere = Reason("logging.Logger method not supported", _frame(Checkpointed.forward, 2))
    found = causes([side_effect, side_effect, inside, elsewhere], own, holding)
    assert [c.kind for c in found] == ["checkpoint", "dora"]  # each once; the logging one is not
    assert found[0].reason == "HOP: Unsafe side effect" and found[0].remedy == CHECKPOINT_REMEDY
    assert found[1].remedy is None and found[1].where.endswith("in dequantize_module_weight")
    assert CodeSpan.of(Block.forward) in holding

    message = Outside(3, ("a", "b"), found).message()
    assert message is not None and message.startswith("runlora: 2 of 3 LoRA modules (a, …)")
    assert message.endswith(f"see {CHECKPOINT_DOC}")
    assert NO_BREAK in (Outside(1, ("a",)).message() or "")
    assert Outside(3).message() is None and Outside(3).record()["outside"] == []
    assert Cause("graph break", "r", "f.py:1 in g", None).describe().startswith("graph break in")
