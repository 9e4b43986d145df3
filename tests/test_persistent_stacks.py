"""Persistent stacks (runlora_fx/ir/stacks.py, runlora_fx/stack_refresh.py): a shared GEMM's
stack of a frozen W with A or s·B is built once and refreshed in place — A's rows after each
optimizer step, W's rows when W changes — so no step copies a W-sized tensor; and training
matches eager throughout."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import runlora_fx
from conftest import assert_grads_match, peft_llama, rel_err, twin
from runlora_fx.cost.cost import cost_of, step_costs
from runlora_fx.ir.plans import plans_for
from runlora_fx.ir.program import program_for
from runlora_fx.ir.site import Adapter, LoraSite, SiteGroup
from runlora_fx.passes.frozen_weights import MergeChecks

# 8 tokens, h 32: "flops" picks split plans that fold A into x·[W;A]ᵀ and s·B into dy·[W|sB]
BATCH, SEQ = 1, 8
# A held stack keeps a copy of its W: without a memory budget no plan may keep more than eager
# PEFT saves at the site (criteria.pick), so these tests give a budget with room (100 MB).
OPTIONS = {"inner": "eager", "criterion": "flops", "memory_budget": 10**8}
COPIES = {torch.ops.aten.cat.default, torch.ops.aten.clone.default, torch.ops.aten.copy.default,
          torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


def ids_for(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def loss_of(model, ids) -> torch.Tensor:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


def frozen_weights(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.endswith("base_layer.weight")]


def optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def w_sized_copies(report, numel: int) -> list[str]:
    """cat / copy nodes of the partitioned graphs with at least `numel` elements."""
    return [f"{part}: {node.name} {tuple(node.meta['val'].shape)}"
            for part, gm in (("forward", report.forward), ("backward", report.backward))
            for node in gm.graph.nodes
            if node.target in COPIES and node.meta["val"].numel() >= numel]


def smallest_stacked_w(report) -> int:
    stacked = [s for d in report.decisions
               if program_for(d.chosen.plan, d.unit).stacks for s in d.sites]
    assert stacked, [d.chosen.plan.describe() for d in report.decisions]
    return min(s.d_in * s.d_out for s in stacked)


def check_step(eager, ours, compiled, ids, tol) -> None:
    expected, got = loss_of(eager, ids), loss_of(compiled, ids)
    assert rel_err(got, expected) <= tol
    assert_grads_match(eager, ours, tol)


def train_and_change_weights(inner: str, tol: float, steps: int = 3) -> runlora_fx.Backend:
    """AdamW steps, then a frozen W changed in place, then one replaced: each step matches
    eager (a stack not refreshed after the optimizer step, or not rebuilt after W changed,
    would not)."""
    eager = peft_llama(layers=1)
    ours = twin(eager)
    backend = runlora_fx.Backend({**OPTIONS, "inner": inner})
    compiled = torch.compile(ours, backend=backend)
    opts = optimizer(eager), optimizer(ours)
    for step in range(steps):
        check_step(eager, ours, compiled, ids_for(step), tol)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        for model in (eager, ours):
            for w in frozen_weights(model):
                w.mul_(1.01)
    check_step(eager, ours, compiled, ids_for(3), tol)
    for model in (eager, ours):
        for w in frozen_weights(model):
            w.data = w.data * 0.99  # a new tensor: another storage
        model.zero_grad()
    check_step(eager, ours, compiled, ids_for(4), tol)
    assert len(backend.reports) == 1  # one compiled graph, its stacks refreshed throughout
    return backend


def test_training_with_persistent_stacks_matches_eager_and_copies_no_w():
    backend = train_and_change_weights("eager", 1e-5)
    [report] = backend.reports
    assert report.stack_bytes > 0
    assert any(d.chosen.plan.fold_x for d in report.decisions)
    assert any(d.chosen.plan.fold_dy for d in report.decisions)
    assert not w_sized_copies(report, smallest_stacked_w(report))


def test_stacks_of_sites_not_held_are_cats_each_step(monkeypatch):
    """The control: the same plans with no site held build their stacks with a W-sized cat."""
    monkeypatch.setattr(MergeChecks, "hold", lambda self, matches, part: matches)
    model = peft_llama(layers=1)
    backend = runlora_fx.Backend(OPTIONS)
    loss_of(torch.compile(model, backend=backend), ids_for())
    [report] = backend.reports
    assert report.stack_bytes == 0
    assert any(d.chosen.plan.fold_x for d in report.decisions)
    assert w_sized_copies(report, 32 * 32)


def test_training_with_persistent_stacks_under_inductor():
    train_and_change_weights("inductor", 1e-4, steps=2)


def held_site(held: bool) -> SiteGroup:
    site = LoraSite("s", 16, 64, 48, (Adapter(4, 0.0, 2.0, True, True),), torch.float32,
                    True, False, True, True)
    return SiteGroup((replace(site, weights_held=held),))


@pytest.mark.parametrize("fold", ["fold_x", "fold_dy"])
def test_a_held_stack_costs_its_trainable_parts_not_w(fold):
    held, not_held = held_site(True), held_site(False)
    plan = next(p for p in plans_for(held) if getattr(p, fold) and len(p.sharing) == 1)
    w_bytes, r_bytes = 64 * 48 * 4, 4 * 64 * 4 if fold == "fold_x" else 48 * 4 * 4
    cats = [s for s in (*program_for(plan, not_held).forward, *program_for(plan, not_held).backward)
            if s.op == "cat"]
    assert len(cats) == 1 and not program_for(plan, not_held).stacks
    program = program_for(plan, held)
    assert not [s for s in (*program.forward, *program.backward) if s.op == "cat"]
    [stack] = program.stacks
    assert stack.meta[0] in ((48 + 4, 64), (48, 64 + 4))
    # a cat reads W and the r-wide part and writes both, after s·B is made (read B, write
    # s·B); the held stack rewrites the r-wide part only, as a pseudo-step
    saving = cost_of(plan, not_held).bytes_moved - cost_of(plan, held).bytes_moved
    assert saving == 2 * w_bytes + (0 if fold == "fold_x" else 2 * r_bytes)
    assert cost_of(plan, held).flops == cost_of(plan, not_held).flops
    [refresh] = [c for c in step_costs(program, held) if c.step.op == "refresh"]
    assert refresh.bytes_moved == 2 * r_bytes
