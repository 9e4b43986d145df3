"""Every plan is exact, and its counted cost is what FlopCounterMode counts when it runs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from runlora_fx.choice.criteria import choose
from runlora_fx.cost.cost import cost_of
from runlora_fx.ir import operands as ops
from runlora_fx.ir.execute import UnitCall
from runlora_fx.ir.plans import (
    Dropout, Forward, GradB, Hidden, InputGrad, plans_for, reference_plan,
)
from runlora_fx.ir.site import Adapter, LoraSite, SiteGroup
from replay import keep_mask, replayed_positions


def make_site(
    n=24, d_in=20, d_out=12, ranks=(3,), p=0.0, bias=True, x_grad=True, bias_grad=False,
    scales=None,
) -> LoraSite:
    scales = scales or [2.0 / (k + 1) for k in range(len(ranks))]
    adapters = tuple(Adapter(r, p, s, True, True) for r, s in zip(ranks, scales))
    return LoraSite("site", n, d_in, d_out, adapters, torch.float64, bias, bias_grad, x_grad, True)


def alone(site: LoraSite) -> SiteGroup:
    """The site as a planning unit of its own."""
    return SiteGroup((site,))


SITES = {
    "plain": make_site(),
    "no-bias": make_site(bias=False),
    "dropout": make_site(p=0.25),
    "x-frozen": make_site(x_grad=False),
    "two-adapters": make_site(ranks=(3, 5)),
    "two-adapters-dropout": make_site(ranks=(2, 4), p=0.5),
    "wide": make_site(n=4, d_in=40, d_out=36, ranks=(8,)),
    "bias-grad": make_site(bias_grad=True),
}


def tensors_for(site: LoraSite, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=gen, dtype=site.dtype).requires_grad_(grad)

    x = rand(2, site.n // 2, site.d_in, grad=site.x_requires_grad)
    w = rand(site.d_out, site.d_in)
    b = rand(site.d_out, grad=site.bias_requires_grad) if site.has_bias else None
    a = [rand(ad.r, site.d_in, grad=True) for ad in site.adapters]
    bb = [rand(site.d_out, ad.r, grad=True) for ad in site.adapters]
    masks = [
        (torch.rand(x.shape, generator=gen) >= ad.dropout_p).to(site.dtype) / (1 - ad.dropout_p)
        for ad in site.adapters
    ]
    return x, w, b, a, bb, masks


def reference(site, x, w, b, a, bb, masks):
    """The math of docs/design.md ("The math"), as eager PEFT writes it."""
    y = torch.nn.functional.linear(x, w, b)
    for ad, a_k, b_k, m in zip(site.adapters, a, bb, masks):
        xd = x * m if ad.dropout_p > 0 else x
        y = y + (xd @ a_k.t() @ b_k.t()) * ad.scale
    return y


def operand_tensors(planned, site, x, w, b, a, bb, masks):
    """The site's tensors in the order its planned call takes them (operands.py)."""
    by_name = {ops.X: x, ops.weight(0): w, ops.bias(0): b}
    for k, ad in enumerate(site.adapters):
        by_name[ops.dropped(0, k)] = x * masks[k] if ad.dropout_p > 0 else None
        by_name[ops.lora_a(0, k)], by_name[ops.lora_b(0, k)] = a[k], bb[k]
    return [by_name[op.name] for op in planned.operands]


SEED = 1234  # what a sparse-dropout plan's seeds are drawn under


def masks_of(site, planned, masks):
    """The masks the plan applies: the given ones, or those its sparse dropout draws."""
    if planned.program.graph_dropout:
        return masks
    drawn = replayed_positions(planned.program, SEED, site.n * site.d_in)
    shape = (2, site.n // 2, site.d_in)
    return [keep_mask(drawn[f"P0.{k}"], shape, ad.dropout_p, site.dtype)
            if ad.dropout_p > 0 else m for k, (ad, m) in enumerate(zip(site.adapters, masks))]


def run_plan(site, plan, x, w, b, a, bb, masks):
    """The plan's output and the masks it applied."""
    planned = UnitCall("test_site", alone(site), plan)
    tensors = operand_tensors(planned, site, x, w, b, a, bb, masks)
    torch.manual_seed(SEED)
    return planned(tensors, [ad.scale for ad in site.adapters]), masks_of(site, planned, masks)


def leaves(x, b, a, bb):
    return [t for t in (x, b, *a, *bb) if t is not None and t.requires_grad]


@pytest.mark.parametrize("name", SITES)
def test_every_plan_matches_the_reference_math(name):
    site = SITES[name]
    plans = plans_for(alone(site))
    assert reference_plan(alone(site)) in plans
    inputs = tensors_for(site)
    x, w, b, a, bb, masks = inputs
    dy = torch.randn(*x.shape[:-1], site.d_out, dtype=site.dtype)
    for plan in plans:
        y, applied = run_plan(site, plan, *inputs)
        got = torch.autograd.grad(y, leaves(x, b, a, bb), dy)
        expected_y = reference(site, x, w, b, a, bb, applied)
        expected = torch.autograd.grad(expected_y, leaves(x, b, a, bb), dy)
        torch.testing.assert_close(y, expected_y, rtol=1e-10, atol=1e-10, msg=plan.describe())
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=plan.describe())


@pytest.mark.parametrize("name", SITES)
def test_counted_flops_equal_flop_counter(name):
    site = SITES[name]
    inputs = tensors_for(site)
    x, w, b, a, bb, masks = inputs
    dy = torch.randn(*x.shape[:-1], site.d_out, dtype=site.dtype)
    for plan in plans_for(alone(site)):
        run_plan(site, plan, *inputs)  # outside the counter: the masks' mul is not the plan's
        with FlopCounterMode(display=False) as counter:
            y, _ = run_plan(site, plan, *inputs)
            torch.autograd.grad(y, leaves(x, b, a, bb), dy)
        assert counter.get_total_flops() == cost_of(plan, alone(site)).flops, plan.describe()


def test_hand_computed_costs_of_the_reference_plan():
    n, d_in, d_out, r = 24, 20, 12, 3
    site = make_site(n, d_in, d_out, (r,))
    cost = cost_of(reference_plan(alone(site)), alone(site))
    forward = 2 * n * d_in * d_out + 2 * n * d_in * r + 2 * n * r * d_out
    backward = 2 * n * d_out * d_in + 2 * n * d_out * r * 2 + 2 * n * r * d_in * 2
    assert cost.flops == forward + backward
    assert cost.saved_bytes == (n * d_in + n * r) * 8  # x and h, float64


def test_merging_is_never_offered_with_the_graphs_dropout():
    plans = plans_for(alone(SITES["dropout"]))
    assert any(p.merges for p in plans)  # sparse dropout reads x: W + (s/q)·BA, corrected
    for plan in plans:
        if not plan.sparse_dropout:
            assert plan.forward is Forward.SPLIT
            assert plan.input_grad is InputGrad.SPLIT
    for plan in plans_for(alone(SITES["dropout"]), sparse_dropout=False):
        assert plan.dropout is Dropout.GRAPH and not plan.merges


def test_plans_only_compute_required_grads():
    for plan in plans_for(alone(SITES["x-frozen"])):
        assert plan.input_grad is None


def test_choose_flops_prefers_merging_when_tokens_outnumber_features():
    site = make_site(n=4096, d_in=256, d_out=256, ranks=(8,))
    chosen = choose(alone(site), "flops", fusions=False).chosen  # the orders before GEMMs were shared
    assert chosen.plan.forward is Forward.MERGED
    assert chosen.plan.input_grad is InputGrad.MERGED_RECOMPUTE  # keeping W_eff costs memory
    assert chosen.plan.grad_b is GradB.VIA_H and chosen.plan.hidden is Hidden.RECOMPUTE
    ref = cost_of(reference_plan(alone(site)), alone(site))
    assert chosen.cost.flops < ref.flops
    assert chosen.cost.saved_bytes < ref.saved_bytes


def test_flops_ties_go_to_fewer_gemm_calls():
    """With GEMM sharing, h comes out of the merged forward's GEMM x·[W_eff; A]ᵀ: the same FLOPs
    as recomputing it in the backward, one call fewer (and the x re-read saved)."""
    site = make_site(n=4096, d_in=256, d_out=256, ranks=(8,))
    unshared = choose(alone(site), "flops", fusions=False).chosen
    chosen = choose(alone(site), "flops").chosen
    assert chosen.plan.forward is Forward.MERGED and chosen.plan.fold_x
    assert chosen.plan.input_grad is InputGrad.MERGED_RECOMPUTE
    assert chosen.plan.hidden is Hidden.SAVE
    assert chosen.cost.flops == unshared.cost.flops
    assert chosen.cost.gemms < unshared.cost.gemms
    assert chosen.cost.saved_bytes <= cost_of(reference_plan(alone(site)), alone(site)).saved_bytes


def test_choose_never_saves_more_than_peft():
    for site in SITES.values():
        for criterion in ("flops", "memory"):
            decision = choose(alone(site), criterion)
            assert decision.chosen.cost.saved_bytes <= cost_of(reference_plan(alone(site)), alone(site)).saved_bytes


def test_memory_criterion_minimises_saved_bytes():
    site = make_site(n=4, d_in=40, d_out=36, ranks=(8,))
    decision = choose(alone(site), "memory")
    assert decision.chosen.cost.saved_bytes == min(c.cost.saved_bytes for c in decision.candidates)


def test_flops_ties_go_to_fewer_bytes_moved():
    # At N = d_in a merged forward with h recomputed costs exactly the FLOPs it saves, but it
    # moves more bytes: the PEFT order must win the tie.
    # (among the orders without GEMM sharing: with it, one GEMM less wins the tie first)
    site = make_site(n=512, d_in=512, d_out=512, ranks=(64,))
    merged = [c for c in choose(alone(site), "flops", fusions=False).candidates
              if c.plan.forward is Forward.MERGED and c.plan.input_grad is InputGrad.SPLIT
              and c.plan.hidden is Hidden.RECOMPUTE and c.plan.grad_a == reference_plan(alone(site)).grad_a]
    ref = cost_of(reference_plan(alone(site)), alone(site))
    assert merged and merged[0].cost.flops == ref.flops and merged[0].cost.bytes_moved > ref.bytes_moved
    assert choose(alone(site), "flops", fusions=False).chosen.plan == reference_plan(alone(site))
