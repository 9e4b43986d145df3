"""Sparse dropout (runlora_fx/dropout.py): the sampler is exactly Bernoulli(p), the products
with the dropped entries are right in every dtype, and compiled steps use it at every LoRA
dropout site without keeping a dense mask or a dropped copy of x."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import runlora_fx
from runlora_fx.ir import dropout as D
from runlora_fx.ir import dropout_kernels as kernels
from runlora_fx.ir.execute import UnitCall, run_steps
from runlora_fx.ir.plans import Dropout, Forward, plans_for
from runlora_fx.ir.program import metas_of, program_operands
from runlora_fx.ir.site import Adapter, LoraSite, SiteGroup, WeightLayout
from runlora_fx.ir.steps import mm_dims

from conftest import ALL_TARGETS, peft_llama, twin
from replay import RecordRunloraOps, keep_mask, replayed_positions

CPU = torch.device("cpu")


def buffer_for(numel: int, p: float, seed: int, slots: int | None = None) -> torch.Tensor:
    slots = D.capacity(numel, p) if slots is None else slots
    return D.dropped_positions(torch.tensor(seed), numel, p, slots, CPU)


# ---- the sampler ---------------------------------------------------------------------------


def test_a_buffer_holds_sorted_positions_padded_with_the_last_then_the_count():
    numel, p = 4000, 0.1
    buffer = buffer_for(numel, p, seed=3)
    count, slots = int(buffer[-1]), buffer.numel() - 1
    positions = buffer[:count]
    assert slots == D.capacity(numel, p) and 0 < count <= slots
    assert (positions.diff() > 0).all() and positions[0] >= 0 and positions[-1] < numel
    assert (buffer[count:slots] == positions[-1]).all()
    assert torch.equal(buffer, buffer_for(numel, p, seed=3))  # a pure function of the seed
    assert not torch.equal(buffer, buffer_for(numel, p, seed=4))


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_each_element_is_dropped_independently_with_probability_p(p):
    """Over many draws: the overall rate, every position's rate, and pairs of neighbours
    (which a gap sampler could couple) within binomial bounds."""
    numel, draws = 600, 3000
    masks = torch.zeros(draws, numel, dtype=torch.bool)
    for k in range(draws):
        buffer = buffer_for(numel, p, seed=k)
        masks[k, buffer[: int(buffer[-1])].long()] = True
    total = masks.numel()
    assert abs(masks.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / total)
    per_position = masks.float().mean(0)
    bound = 5.5 * math.sqrt(p * (1 - p) / draws)  # 600 positions: P(any beyond) ≈ 2e-5
    assert (per_position - p).abs().max().item() < bound
    pairs = (masks[:, 1:] & masks[:, :-1]).float().mean().item()
    assert abs(pairs - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (draws * (numel - 1)))


@pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the torch draw runs")
@pytest.mark.parametrize("numel,p", [(4000, 0.1), (50_000, 0.05), (10**6, 0.01), (2000, 0.5),
                                     (50, 1e-9), (100, 1e-20)])
def test_the_c_draw_is_the_device_draw(numel, p):
    """One sampler on every device: the CPU's C loop draws the very buffer `device_buffer`
    draws in torch ops (as a GPU does) for the same seed, tiny p's huge gaps included."""
    for seed in (0, 3, 2**61 + 12_345, 2**62 - 1):
        slots = D.capacity(numel, p)
        assert torch.equal(buffer_for(numel, p, seed),
                           D.device_buffer(torch.tensor(seed), numel, p, slots))


def test_a_draw_that_does_not_fit_keeps_the_first_positions():
    """With a capacity about the mean, half the draws overflow: each keeps the first `slots`
    positions of the same process, never a shifted or redrawn set."""
    numel, p = 2000, 0.1
    slots = int(numel * p)
    overflowed = 0
    for seed in range(40):
        small, whole = buffer_for(numel, p, seed, slots), buffer_for(numel, p, seed)
        count = int(whole[-1])
        kept = min(count, slots)
        assert int(small[-1]) == kept and torch.equal(small[:kept], whole[:kept])
        assert (small[kept:slots] == small[kept - 1]).all()
        overflowed += count > slots
    assert 5 < overflowed < 35


def test_the_capacity_bound_holds_for_every_mean():
    """P(count > capacity) ≤ exp(−t²/(2(μ + t/3))) (Bernstein) stays below e⁻⁴⁹."""
    for numel in (1, 100, 10**4, 10**5, 262_144, 10**6, 10**8):
        for p in (0.01, 0.05, 0.1, 0.3, 0.5):
            mu = numel * p
            t = D.capacity(numel, p) - mu
            if D.capacity(numel, p) == numel:
                continue  # every element fits: no overflow possible
            assert t * t / (2 * (mu + t / 3)) >= 49, (numel, p)


# ---- the products with S ---------------------------------------------------------------------


def _operands(n: int, d: int, r: int, dtype: torch.dtype, strided: bool):
    """x, A, L and a dense N×d, the N×d ones as column slices of wider tensors if `strided`."""
    gen = torch.Generator().manual_seed(0)
    extra = 5 if strided else 0
    x = torch.randn(n, d + extra, generator=gen).to(dtype)[:, :d]
    a = torch.randn(r, d, generator=gen).to(dtype)
    left = torch.randn(n, r, generator=gen).to(dtype)
    dense = torch.randn(n, d + extra, generator=gen).to(dtype)[:, :d]
    return x, a, left, dense


@pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the torch versions run")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("r", [5, 8, 16])  # a run-time rank; ranks the kernels' dot unrolls
def test_the_c_kernels_equal_the_torch_versions(dtype, strided, r):
    n, d = 70, 40
    x, a, left, dense = _operands(n, d, r, dtype, strided)
    for p in (0.2, 1e-9):  # some positions; none (count 0)
        buffer = buffer_for(n * d, p, seed=1)
        tol = {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(D.s_times_at(x, buffer, a),
                                   D.reference_s_times_at(x, buffer, a), **tol)
        torch.testing.assert_close(D.lt_times_s(left, buffer, x),
                                   D.reference_lt_times_s(left, buffer, x), **tol)
        z1, z2 = dense.clone(), dense.clone()
        D.zero_at_(z1, buffer)
        D.reference_zero_at_(z2, buffer)
        assert torch.equal(z1, z2)
        m1, m2 = dense.clone(), dense.clone()
        D.minus_dots_at_(m1, buffer, left, a, 1.25)
        D.reference_minus_dots_at_(m2, buffer, left, a, 1.25)
        changed = buffer[: int(buffer[-1])].long()
        unchanged = torch.ones(n * d, dtype=torch.bool)
        unchanged[changed] = False
        for m in (m1, m2):  # only the dropped elements change
            assert torch.equal(m.reshape(-1)[unchanged], dense.reshape(-1)[unchanged])
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # 16 bits: one rounding apart
        torch.testing.assert_close(m1.float(), m2.float(), rtol=tol, atol=tol)


def test_the_products_equal_the_dense_mask_in_fp64():
    n, d, r, p = 50, 30, 4, 0.3
    x, a, left, dense = (t.double() for t in _operands(n, d, r, torch.float32, False))
    buffer = buffer_for(n * d, p, seed=5)
    dropped = 1 - keep_mask(buffer[: int(buffer[-1])], (n, d), p, torch.float64) * (1 - p)
    s = x * dropped
    torch.testing.assert_close(D.s_times_at(x, buffer, a), s @ a.t())
    torch.testing.assert_close(D.lt_times_s(left, buffer, x), left.t() @ s)
    zeroed = dense.clone()
    D.zero_at_(zeroed, buffer)
    torch.testing.assert_close(zeroed, dense * (1 - dropped))
    minus = dense.clone()
    D.minus_dots_at_(minus, buffer, left, a, 0.5)
    torch.testing.assert_close(minus, dense - 0.5 * (left @ a) * dropped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_the_draw_and_its_product_in_one_call_equal_them_apart(dtype, strided):
    """drawn_s_times_at (one C call on the CPU, the torch ops where no compiler works) gives the
    buffer dropped_positions draws from the seed and S·Aᵀ at its positions, bit for bit."""
    n, d, r, p = 70, 40, 8, 0.2
    x, a, _, _ = _operands(n, d, r, dtype, strided)
    slots = D.capacity(n * d, p)
    seed = torch.tensor(11)
    buffer, product = D.drawn_s_times_at(seed, n * d, p, slots, x, a)
    apart = D.dropped_positions(seed, n * d, p, slots, CPU)
    assert torch.equal(buffer, apart)
    assert torch.equal(product, D.s_times_at(x, apart, a))


def test_a_cpu_forward_draws_and_multiplies_in_one_call_a_site():
    """execute.run_steps runs a positions step and the S·Aᵀ that reads it as one op on the
    CPU: each adapter's forward makes a seed and one drawn_s_times_at, and its values are the
    two steps' apart."""
    n, d, p = 16, 12, 0.25
    members = tuple(LoraSite(f"m{m}", n, d, 8, (Adapter(4, p, 2.0, True, True),),
                             torch.float32, False, False, True, True) for m in range(2))
    unit = SiteGroup(members)
    plan = next(plan for plan in plans_for(unit) if plan.dropout is Dropout.SPARSE)
    program = UnitCall("unit", unit, plan).program
    gen = torch.Generator().manual_seed(0)
    env = {op.name: torch.randn(*op.shape, generator=gen)
           for op in program_operands(unit, program)}
    placement = {name: (t.shape, t.device) for name, t in env.items()}
    record = RecordRunloraOps()
    with record:
        run_steps(program.forward, env, [2.0, 2.0], "unit", placement)
    assert record.calls["drawn_s_times_at"] == record.calls["draw_seed"] == 2, plan.describe()
    assert "dropped_positions" not in record.calls and "s_times_at" not in record.calls
    for step in program.forward:
        if step.op == "s_times_at":
            x, positions, a = (env[name] for name in step.args)
            seed = env[next(s.args[0] for s in program.forward if s.out == step.args[1])]
            assert torch.equal(positions, D.dropped_positions(seed, n * d, p,
                                                              D.capacity(n * d, p), CPU))
            assert torch.equal(env[step.out], D.s_times_at(x, positions, a))


# ---- a group's programs ----------------------------------------------------------------------


def test_every_group_plan_equals_the_dense_math_with_the_same_masks():
    """q/k/v-like sites with dropout, as one unit: one dense GEMM, one correction each, and
    every output and gradient equal to the dense formula in fp64 with the masks drawn."""
    n, d, p, s = 12, 10, 0.25, 2.0
    members = tuple(LoraSite(f"m{m}", n, d, 6 + m, (Adapter(3, p, s, True, True),),
                             torch.float64, False, False, True, True) for m in range(3))
    unit = SiteGroup(members)
    plans = [plan for plan in plans_for(unit) if plan.groups_members]
    assert plans and all(plan.dropout.is_sparse for plan in plans)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(site.d_out, d, generator=gen, dtype=torch.float64)
               for site in members]
    a = [torch.randn(3, d, generator=gen, dtype=torch.float64, requires_grad=True)
         for _ in members]
    b = [torch.randn(site.d_out, 3, generator=gen, dtype=torch.float64, requires_grad=True)
         for site in members]
    dys = [torch.randn(n, site.d_out, generator=gen, dtype=torch.float64) for site in members]
    leaves = [x, *a, *b]
    for plan in plans:
        planned = UnitCall("group", unit, plan)
        by_name = {"x": x}
        for m in range(3):
            by_name.update({f"W{m}": weights[m], f"A{m}.0": a[m], f"B{m}.0": b[m]})
        torch.manual_seed(7)
        ys = planned([by_name[op.name] for op in planned.operands], [s, s, s])
        got = torch.autograd.grad(ys, leaves, dys)
        drawn = replayed_positions(planned.program, 7, n * d)
        masks = [keep_mask(drawn[f"P{m}.0"], (n, d), p, torch.float64) for m in range(3)]
        expected_ys = [x @ w.t() + s * (x * mk) @ am.t() @ bm.t()
                       for w, mk, am, bm in zip(weights, masks, a, b)]
        expected = torch.autograd.grad(expected_ys, leaves, dys)
        for y, e in zip(ys, expected_ys):
            torch.testing.assert_close(y, e, msg=plan.describe())
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, msg=plan.describe())
        assert len({tuple(drawn[f"P{m}.0"].tolist()) for m in range(3)}) == 3  # own masks


@pytest.mark.parametrize("layout", list(WeightLayout))
def test_a_merged_forward_adds_its_corrections_into_its_gemm_and_every_plan_is_exact(layout):
    """A site with two dropout adapters, in both weight layouts: every sparse plan equals the
    dense formula in fp64 with the masks drawn, and a merged forward not shared with another
    product runs one N×d_out GEMM, x·W_effᵀ, and adds both corrections c_k·B_kᵀ into its
    result in place, one after the other (no N×d_out product besides it)."""
    n, d_in, d_out, p, s = 12, 10, 7, 0.25, 2.0
    adapters = (Adapter(3, p, s, True, True), Adapter(2, p, s / 2, True, True))
    site = LoraSite("m", n, d_in, d_out, adapters, torch.float64, True, True, True, True,
                    weight_layout=layout)
    unit = SiteGroup((site,))
    plans = [plan for plan in plans_for(unit) if plan.dropout.is_sparse]
    merged = [plan for plan in plans if plan.forward is Forward.MERGED
              and not (plan.fold_x or plan.stack_w)]
    assert merged
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    bias = torch.randn(d_out, generator=gen, dtype=torch.float64, requires_grad=True)
    a = [torch.randn(ad.r, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
         for ad in adapters]
    b = [torch.randn(d_out, ad.r, generator=gen, dtype=torch.float64, requires_grad=True)
         for ad in adapters]
    dy = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    stored = w if layout is WeightLayout.OUT_IN else w.t().contiguous()
    by_name = {"x": x, "W0": stored, "b0": bias, "A0.0": a[0], "B0.0": b[0], "A0.1": a[1],
               "B0.1": b[1]}
    leaves = [x, bias, *a, *b]
    for plan in plans:
        planned = UnitCall("site", unit, plan)
        assert {op.name for op in planned.operands} <= set(by_name)
        torch.manual_seed(7)
        y = planned([by_name[op.name] for op in planned.operands], [s, s / 2])
        got = torch.autograd.grad(y, leaves, dy)
        drawn = replayed_positions(planned.program, 7, n * d_in)
        masks = [keep_mask(drawn[f"P0.{k}"], (n, d_in), p, torch.float64) for k in range(2)]
        expected_y = x @ w.t() + bias + sum(
            sk * (x * mk) @ ak.t() @ bk.t() for sk, mk, ak, bk in zip((s, s / 2), masks, a, b))
        torch.testing.assert_close(y, expected_y, msg=plan.describe())
        for g, e in zip(got, torch.autograd.grad(expected_y, leaves, dy)):
            torch.testing.assert_close(g, e, msg=plan.describe())
        if plan in merged:
            metas = metas_of(planned.program, unit)
            wide = [step for step in planned.program.forward if step.op in ("mm", "add_mm")
                    and metas[step.out][0] == (n, d_out)]
            assert [step.op for step in wide] == ["mm", "add_mm", "add_mm"], plan.describe()
            assert [mm_dims(step, metas)[1] for step in wide] == [d_in, 3, 2], plan.describe()
            assert [step.args[0] for step in wide[1:]] == [wide[0].out, wide[1].out]


def test_inductor_adds_the_correction_into_the_gemms_own_buffer():
    """add_mm_ on a fresh GEMM result, compiled by Inductor: the GEMM writes one N×d_out buffer
    and the correction is added into it in place — no addmm copying it to another, no second
    N×d_out buffer — and the result is the eager one."""
    from torch._inductor.utils import run_and_get_code

    def merged(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, b: torch.Tensor):
        y = torch.mm(x, w.t())
        D.add_mm_(y, c, b.t())
        return y

    gen = torch.Generator().manual_seed(0)
    x, w, c, b = (torch.randn(*shape, generator=gen)
                  for shape in ((40, 24), (56, 24), (40, 3), (56, 3)))
    torch._dynamo.reset()
    got, (code,) = run_and_get_code(torch.compile(merged, backend="inductor"), x, w, c, b)
    torch.testing.assert_close(got, x @ w.t() + c @ b.t())
    (out,) = re.findall(r"extern_kernels\.mm\(.*out=(\w+)\)", code)
    assert re.findall(r"runlora\.add_mm_\.default\((\w+),", code) == [out], code
    assert "addmm" not in code.replace("add_mm_", ""), code
    assert code.count("empty_strided_cpu((40, 56)") == 1, code


# ---- compiled steps --------------------------------------------------------------------------


class Probe(nn.Module):
    """Two LoRA linears on one x whose outputs are their branches' D(x): W = 0, A = B = I."""

    def __init__(self, d: int, p: float) -> None:
        super().__init__()
        self.p = p
        self.base = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(2))
        self.a = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(2))
        self.b = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(2))
        with torch.no_grad():
            for base, a, b in zip(self.base, self.a, self.b):
                base.weight.zero_()
                base.weight.requires_grad_(False)
                a.weight.copy_(torch.eye(d))
                b.weight.copy_(torch.eye(d))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(base(x) + b(a(nn.functional.dropout(x, self.p, self.training)))
                     for base, a, b in zip(self.base, self.a, self.b))


def test_masks_are_independent_across_sites_and_steps_in_a_compiled_step():
    d, p, n, steps = 32, 0.2, 64, 12
    backend = runlora_fx.Backend({"inner": "eager"})
    probe = torch.compile(Probe(d, p), backend=backend)
    x = torch.ones(n, d, requires_grad=True)
    torch.manual_seed(0)
    dropped = []
    for _ in range(steps):
        y1, y2 = probe(x)
        dropped.append(torch.stack([y1 == 0, y2 == 0]))
    [report] = backend.reports
    assert all(dec.chosen.plan.sparse_dropout for dec in report.decisions)
    masks = torch.stack(dropped).float()  # steps × 2 × n × d
    rate = masks.mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / masks.numel())
    both_sites = (masks[:, 0] * masks[:, 1]).mean().item()
    both_steps = (masks[1:] * masks[:-1]).mean().item()
    for joint, count in ((both_sites, masks[:, 0].numel()), (both_steps, masks[1:].numel())):
        assert abs(joint - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / count)
    outputs = torch.stack([y1, y2])  # D(x) of ones: 1/q where kept
    torch.testing.assert_close(outputs[outputs != 0],
                               torch.full_like(outputs[outputs != 0], 1 / (1 - p)))


def _llama(dtype: torch.dtype, p: float = 0.1) -> nn.Module:
    model = peft_llama(layers=1, hidden=32, lora_dropout=p)
    if dtype != torch.float32:  # PEFT's default on a 16-bit model: adapters stay fp32
        for name, param in model.named_parameters():
            if "lora_" not in name:
                param.data = param.data.to(dtype)
    return model


@pytest.mark.parametrize("setup", ["fp32", "bf16-peft", "autocast"])
def test_every_dropout_site_of_a_llama_runs_sparse(setup):
    model = _llama(torch.bfloat16 if setup == "bf16-peft" else torch.float32)
    backend = runlora_fx.Backend({"inner": "eager"})
    compiled = torch.compile(model, backend=backend)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup == "autocast"):
        loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    [report] = backend.reports
    paths = {site.path.rsplit(".", 1)[-1] for d in report.decisions for site in d.sites}
    assert paths == set(ALL_TARGETS) and not report.skipped
    for decision in report.decisions:
        assert decision.chosen.plan.dropout in (Dropout.SPARSE, Dropout.SPARSE_REDRAWN)
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for n, p in model.named_parameters() if "lora_" in n)


def test_fallback_random_keeps_the_graphs_dropout_and_eagers_masks(exact_dropout):
    model = _llama(torch.float32)
    eager, compiled_model = model, twin(model)
    backend = runlora_fx.Backend({"inner": "eager"})
    compiled = torch.compile(compiled_model, backend=backend)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    eager(input_ids=ids, labels=ids).loss.backward()
    torch.manual_seed(3)
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert all(d.chosen.plan.dropout is Dropout.GRAPH for d in backend.reports[0].decisions)
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_mean_loss_over_seeds_matches_peft():
    """Dropout draws differ from eager's, their distribution may not: over seeds the mean
    loss of a step matches eager PEFT's within its standard error."""
    model = _llama(torch.float32, p=0.3)
    eager, compiled = model, torch.compile(twin(model), backend=runlora_fx.Backend(
        {"inner": "eager"}))
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    losses: dict[str, list[float]] = {"eager": [], "runlora": []}
    for seed in range(40):
        for name, run in (("eager", eager), ("runlora", compiled)):
            torch.manual_seed(seed)
            losses[name].append(run(input_ids=ids, labels=ids).loss.item())
    e, r = (torch.tensor(v, dtype=torch.float64) for v in losses.values())
    se = math.sqrt(e.var() / len(e) + r.var() / len(r))
    assert e.std() > 0 and abs(e.mean() - r.mean()) < 4 * se


def test_a_checkpointed_region_replays_its_positions():
    """Recomputing a checkpointed body must drop the very positions its forward dropped: the
    input grad of y = D(x) is zero exactly where y is."""
    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.probe = Probe(16, 0.3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y1, y2 = torch.utils.checkpoint.checkpoint(self.probe, x, use_reentrant=False)
            return y1 + 2 * y2

    backend = runlora_fx.Backend({"inner": "eager"})
    model = torch.compile(Checkpointed(), backend=backend)
    x = torch.ones(32, 16, requires_grad=True)
    torch.manual_seed(1)
    y = model(x)
    y.sum().backward()
    decisions = [d for report in backend.reports for d in report.decisions]
    assert decisions and all(d.chosen.plan.sparse_dropout for d in decisions)
    q = 1 - 0.3
    # y = m1/q + 2·m2/q and dL/dx = m1/q + 2·m2/q: the same masks in both passes
    torch.testing.assert_close(x.grad, y.detach())
    assert (y == 0).any() and (y > 2 / q).any()


def test_a_shared_dropout_keeps_the_graphs_mask():
    """Two adapters reading one dropout's result: only the graph's mask gives both the same
    D(x), so the site is rewritten with the graph's dropout (and never merges)."""
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = nn.Linear(16, 16).requires_grad_(False)
            self.a1, self.b1 = nn.Linear(16, 2, bias=False), nn.Linear(2, 16, bias=False)
            self.a2, self.b2 = nn.Linear(16, 3, bias=False), nn.Linear(3, 16, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            d = nn.functional.dropout(x, 0.2, self.training)
            return self.base(x) + self.b1(self.a1(d)) + 0.5 * self.b2(self.a2(d))

    backend = runlora_fx.Backend({"inner": "eager"})
    torch.compile(Shared(), backend=backend)(torch.randn(8, 16)).sum().backward()
    [decision] = backend.reports[0].decisions
    assert not any(a.own_dropout for a in decision.site.adapters)
    assert decision.chosen.plan.dropout is Dropout.GRAPH and not decision.chosen.plan.merges
    assert all(not c.plan.sparse_dropout for c in decision.candidates)


@pytest.mark.parametrize("setup", ["fp32", "bf16-peft"])
def test_a_step_keeps_no_dense_mask_no_dropped_copy_and_x_in_its_storage_dtype(setup):
    """On the partitioned graphs: PEFT + torch.compile keeps a bool N×d mask and a dropped copy
    of x per dropout site (in fp32 at PEFT's bf16 default); runlora keeps neither — x once,
    as stored, and the positions (or a seed)."""
    from conftest import PlainCompile
    from runlora_fx.cost.partitioned import saved_tensors

    dtype = torch.bfloat16 if setup == "bf16-peft" else torch.float32
    model = _llama(dtype, p=0.1)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    n, widths = 2 * 16, {32, 64}  # tokens; hidden and intermediate sizes of the tiny Llama

    def kept(backend) -> list:
        torch.compile(twin(model), backend=backend)(input_ids=ids, labels=ids).loss.backward()
        report = backend.reports[0]
        return [t for t in saved_tensors(report.forward, report.backward,
                                         report.parameter_inputs) if not t.is_parameter]

    def activations(saved, of_dtype=None) -> list:  # N×width tensors, whatever their view
        return [t for t in saved if (of_dtype is None or t.dtype == of_dtype)
                and len(t.shape) >= 2 and t.shape[-1] in widths
                and math.prod(t.shape[:-1]) == n]

    def nbytes(saved) -> int:
        return sum(math.prod(t.shape) * t.dtype.itemsize for t in saved)

    plain = kept(PlainCompile())
    assert any(t.dtype == torch.bool for t in plain)  # the baseline's masks are there to see
    ours = kept(runlora_fx.Backend({"inner": "eager"}))
    assert not any(t.dtype == torch.bool for t in ours)
    assert nbytes(activations(ours)) < nbytes(activations(plain))
    if dtype == torch.float32:  # no dropped copies next to x
        assert len(activations(ours, dtype)) < len(activations(plain, dtype))
    else:  # x kept in bf16, not as PEFT's fp32 dropped copy of it
        assert activations(plain, torch.float32) and not activations(ours, torch.float32)
    assert any(t.dtype in (torch.int32, torch.int64) and len(t.shape) <= 1 for t in ours)
