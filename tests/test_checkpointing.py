"""LoRA sites inside gradient-checkpointed regions (`tag_activation_checkpoint` bodies) are
rewritten: exact against eager, and the partitioned forward still saves only what plain
torch.compile saves with checkpointing (the region is recomputed in the backward)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint

import runlora_fx
from conftest import (
    PlainCompile, assert_grads_match, enable_checkpointing, peft_llama, rel_err, twin,
)
from runlora_fx.backend import chooser_for, decide, find, rewrite
from runlora_fx.choice.criteria import Decision
from runlora_fx.ir.execute import RECOMPUTE_ANNOTATION, UnitCall
from runlora_fx.options import parse_options
from runlora_fx.report.outside import Outside
from runlora_fx.cost.partitioned import saved_tensors
from runlora_fx.ir.plans import Hidden
from runlora_fx.report.graph_report import GraphReport

pytestmark = pytest.mark.usefixtures("compilable_checkpointing")

TOL = 1e-5
BATCH, SEQ = 2, 40  # N = 80 > d/2: merged plans that recompute h, so the tags are exercised
# GEMM sharing off: the flops criterion then recomputes h (with it, h comes out of the merged
# forward's GEMM and is saved), so these tests exercise the recompute tags inside bodies
OPTIONS = {"fusions": False, "criterion": "flops"}


class SubgraphPipeline(runlora_fx.Backend):
    """The backend (top-level graph and checkpoint bodies in one walk), eager inner."""

    def __init__(self, inner: str = "eager") -> None:
        super().__init__({"inner": inner, **OPTIONS})

    def decisions(self) -> list[Decision]:
        return [d for r in self.reports for d in r.decisions]

    def skipped(self) -> list[str]:
        return [s.reason for r in self.reports for s in r.skipped]

    def training_report(self) -> GraphReport:
        """The one graph holding the decoder layers (the embedding is a graph of its own)."""
        [report] = [r for r in self.reports if r.decisions or r.skipped]
        assert report.forward is not None and report.backward is not None
        return report


def checkpointed_llama(**lora: object) -> torch.nn.Module:
    return enable_checkpointing(peft_llama(layers=2, **lora))


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def step(model: torch.nn.Module, backend: Any | None = None, seed: int = 0):
    """One training step (eager when `backend` is None); the output, after backward."""
    runner = model if backend is None else torch.compile(model, backend=backend)
    torch.manual_seed(seed)  # the same dropout masks in eager and compiled steps
    out = runner(input_ids=ids(), labels=ids())
    out.loss.backward()
    return out


def assert_step_matches(eager: torch.nn.Module, model: torch.nn.Module, backend: Any) -> None:
    expected, got = step(eager), step(model, backend)
    assert rel_err(got.loss, expected.loss) <= TOL
    assert rel_err(got.logits, expected.logits) <= TOL
    assert_grads_match(eager, model, TOL)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_checkpointed_sites_are_rewritten_and_match_eager(inner, recwarn):
    eager = checkpointed_llama()
    model = twin(eager)
    backend = SubgraphPipeline(inner)
    assert_step_matches(eager, model, backend)
    assert len(backend.decisions()) == 14 and not backend.skipped()
    assert {d.chosen.plan.hidden for d in backend.decisions()} == {Hidden.RECOMPUTE}
    # with the remedy every LoRA module is in a graph: nothing said (tests/test_coverage.py)
    assert {(r.lora_modules, r.outside) for r in backend.reports} == {(14, Outside(14))}
    assert not [w for w in recwarn if str(w.message).startswith("runlora")]


def test_forward_saves_what_plain_compile_saves_with_checkpointing():
    """Checkpointing semantics kept: the rewritten forward saves exactly the tensors plain
    torch.compile saves (each region's inputs, no LoRA activation), and the region — the
    planned calls included — is recomputed in the backward."""
    model = checkpointed_llama()
    plain_model = twin(model)
    backend, plain = SubgraphPipeline(), PlainCompile()
    step(model, backend)
    step(plain_model, plain)

    def saved(report: GraphReport) -> list[tuple[str, tuple[int, ...]]]:
        if report.backward is None:
            return []
        found = saved_tensors(report.forward, report.backward, report.parameter_inputs)
        return [(t.name, t.shape) for t in found if not t.is_parameter]

    assert len(backend.reports) == len(plain.reports)  # the same graphs (embedding, layers, loss)
    for report, plain_report in zip(backend.reports, plain.reports):
        assert saved(report) == saved(plain_report)
    ours = backend.training_report()
    h_shapes = {(BATCH * SEQ, 4), (BATCH, SEQ, 4)}  # r = 4
    assert not [shape for _, shape in saved(ours) if shape in h_shapes]

    # passes/recompute_tags works inside the bodies: the planned recomputes are tagged in the
    # forward, and the backward runs them again (annotated nodes appear there too).
    def annotated(gm: fx.GraphModule) -> list[fx.Node]:
        return [n for n in gm.graph.nodes if RECOMPUTE_ANNOTATION in (n.meta.get("custom") or {})]

    tagged = [n.meta.get("recompute") for n in annotated(ours.forward)]
    assert tagged and set(tagged) == {CheckpointPolicy.MUST_RECOMPUTE}
    assert annotated(ours.backward)


def test_dropout_inside_checkpointed_regions_replays_the_same_mask(exact_dropout):
    """The recomputed region draws the forward's dropout mask again (split plans, D(x) from the
    graph's own dropout node)."""
    eager = checkpointed_llama(lora_dropout=0.1)
    model = twin(eager)
    backend = SubgraphPipeline()
    assert_step_matches(eager, model, backend)
    decisions = backend.decisions()
    assert len(decisions) == 14 and not backend.skipped()
    assert {d.site.adapters[0].dropout_p for d in decisions} == {0.1}


class Lora(torch.nn.Module):
    """A frozen linear plus one adapter, hand-written: `x Wᵀ + b + 0.5 · (x Aᵀ) Bᵀ`."""

    def __init__(self, d_in: int = 6, d_out: int = 5, r: int = 2) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.W = torch.nn.Parameter(torch.randn(d_out, d_in, generator=gen), requires_grad=False)
        self.b = torch.nn.Parameter(torch.randn(d_out, generator=gen), requires_grad=False)
        self.A = torch.nn.Parameter(torch.randn(r, d_in, generator=gen) * 0.5)
        self.B = torch.nn.Parameter(torch.randn(d_out, r, generator=gen) * 0.5)

    def site(self, x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
        return F.linear(x, self.W, self.b) + scale * F.linear(F.linear(x, self.A), self.B)


class NestedCheckpoints(Lora):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def outer(x: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.site, x, use_reentrant=False).sin()

        return checkpoint(outer, x, use_reentrant=False)


class Cond(Lora):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(
            x.sum() > 0, lambda x: self.site(x, 0.5), lambda x: self.site(x, 2.0), (x,)
        )


def compare_small(model: torch.nn.Module) -> SubgraphPipeline:
    """One step of `model` eager and through the pipeline (eager inner): outputs, all grads."""
    compiled_model, backend = copy.deepcopy(model), SubgraphPipeline()
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(0))
    x_e, x_c = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = model(x_e)
    got = torch.compile(compiled_model, backend=backend, fullgraph=True)(x_c)
    (expected.square().sum() + expected.sum()).backward()
    (got.square().sum() + got.sum()).backward()
    assert rel_err(got, expected) <= TOL and rel_err(x_c.grad, x_e.grad) <= TOL
    for name in ("A", "B"):
        actual = getattr(compiled_model, name).grad
        assert rel_err(actual, getattr(model, name).grad) <= TOL, name
    return backend


def test_nested_checkpoints_are_rewritten():
    backend = compare_small(NestedCheckpoints())
    assert len(backend.decisions()) == 1 and not backend.skipped()


def test_find_and_choose_leave_the_bodies_and_rewrite_changes_them():
    """The backend's debug dump shows the bodies as captured, then as rewritten: find and choose
    leave the graph untouched; `rewrite` puts one planned call, named after its body, in
    place."""
    captured: list[fx.GraphModule] = []

    def capture(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        captured.append(gm)
        return gm.forward

    torch.compile(NestedCheckpoints(), backend=capture, fullgraph=True)(torch.randn(2, 3, 6))
    [gm] = captured
    before = gm.print_readable(print_output=False)

    def planned_calls() -> list[str]:
        return [n.target.__name__ for _, m in gm.named_modules() for n in m.graph.nodes
                if isinstance(n.target, UnitCall)]

    report = GraphReport(0)
    options = parse_options(OPTIONS)
    chosen = decide(find(gm, report), report, chooser_for(options), None)
    assert len(report.decisions) == 1 and not report.skipped
    assert gm.print_readable(print_output=False) == before and not planned_calls()
    rewrite(chosen)
    [name] = planned_calls()  # in the inner body: runlora_<outer body>_<inner body>_0
    assert name.startswith("runlora_wrap_body_") and name.count("wrap_body_") == 2


def test_sites_inside_other_higher_order_ops_stay_skipped_with_where():
    """A cond branch is traced by cond's own rules: its sites are left alone and reported."""
    backend = compare_small(Cond())
    assert not backend.decisions()
    reasons = backend.skipped()
    assert len(reasons) == 2, reasons
    for reason in reasons:
        assert reason.startswith("inside the cond subgraph ")
        assert reason.endswith(
            "sites inside cond subgraphs are not rewritten (only tag_activation_checkpoint "
            "bodies are)"
        )
