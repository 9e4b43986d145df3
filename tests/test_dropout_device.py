"""Sparse dropout off the CPU (runlora_fx/ir/dropout.py `device_buffer`, counter_random.py):
no value is read back on the host, checked on fake CUDA tensors, which a CPU-only torch makes
and on which any `.item()`, `int()` or data-dependent shape raises; and the device draw is
Bernoulli(p), checked by running it on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import runlora_fx
from runlora_fx.ir import counter_random
from runlora_fx.ir import dropout as D
from runlora_fx.ir.execute import run_steps
from runlora_fx.ir.plans import illegal_reason, plans_for
from runlora_fx.ir.program import program_for, program_operands
from runlora_fx.ir.site import Adapter, LoraSite, SiteGroup

from conftest import grads, peft_llama, twin
from replay import RecordRunloraOps

CUDA = torch.device("cuda")


def exact_splitmix64(seed: int, count: int) -> list[int]:
    """SplitMix64 in Python's exact integers (the reference, after Vigna's C code)."""
    mask, out = 2**64 - 1, []
    for k in range(1, count + 1):
        z = (seed + k * counter_random.GAMMA) & mask
        for bits, multiplier in counter_random.MIX:
            z = ((z ^ (z >> bits)) * multiplier) & mask
        out.append(z ^ (z >> counter_random.FINAL_SHIFT))
    return out


def device_buffer(seed: int, numel: int, p: float, slots: int | None = None) -> torch.Tensor:
    slots = D.capacity(numel, p) if slots is None else slots
    return D.device_buffer(torch.tensor(seed), numel, p, slots)


# ---- the generator and the draw, run on the CPU ------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 123_456_789, 2**62 - 1])
def test_splitmix64_wraps_exactly_like_the_reference(seed):
    got = counter_random.splitmix64(torch.tensor(seed), 1000)
    assert [value & (2**64 - 1) for value in got.tolist()] == exact_splitmix64(seed, 1000)


def test_splitmix64_from_seed_0_starts_with_the_published_output():
    assert exact_splitmix64(0, 1) == [0xE220A8397B1DCDAF]


def test_a_device_buffer_holds_sorted_positions_padded_with_the_last_then_the_count():
    numel, p = 4000, 0.1
    buffer = device_buffer(3, numel, p)
    count, slots = int(buffer[-1]), buffer.numel() - 1
    positions = buffer[:count]
    assert buffer.dtype == D.position_dtype(numel) and slots == D.capacity(numel, p)
    assert 0 < count <= slots and (positions.diff() > 0).all()
    assert positions[0] >= 0 and positions[-1] < numel
    assert (buffer[count:slots] == positions[-1]).all()
    assert torch.equal(buffer, device_buffer(3, numel, p))  # a pure function of the seed
    assert not torch.equal(buffer, device_buffer(4, numel, p))
    none = device_buffer(3, 50, 1e-9)  # nothing dropped: padding is 0, the count 0
    assert int(none[-1]) == 0 and not none.any()


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_the_device_draw_drops_each_element_independently_with_probability_p(p):
    """As tests/test_dropout.py checks the CPU draw: the overall rate, every position's rate,
    and pairs of neighbours, within binomial bounds over 3000 seeds."""
    numel, draws = 600, 3000
    masks = torch.zeros(draws, numel, dtype=torch.bool)
    for k in range(draws):
        buffer = device_buffer(k, numel, p)
        masks[k, buffer[: int(buffer[-1])].long()] = True
    total = masks.numel()
    assert abs(masks.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / total)
    per_position = masks.float().mean(0)
    assert (per_position - p).abs().max().item() < 5.5 * math.sqrt(p * (1 - p) / draws)
    pairs = (masks[:, 1:] & masks[:, :-1]).float().mean().item()
    assert abs(pairs - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (draws * (numel - 1)))
    counts = masks.sum(1).double()  # Binomial(numel, p): its variance too
    assert abs(counts.var().item() / (numel * p * (1 - p)) - 1) < 5 * math.sqrt(2 / draws)


def test_a_device_draw_that_does_not_fit_keeps_the_first_positions():
    """Capacity about the mean: where the draw overflows it keeps the first `slots` positions of
    the same process (its law is off Bernoulli(p) only by P(overflow) ≤ e⁻⁴⁹ at the real
    capacity, tests/test_dropout.py::test_the_capacity_bound_holds_for_every_mean)."""
    numel, p = 2000, 0.1
    slots = int(numel * p)
    overflowed = 0
    for seed in range(40):
        small, whole = device_buffer(seed, numel, p, slots), device_buffer(seed, numel, p)
        count = int(whole[-1])
        kept = min(count, slots)
        assert int(small[-1]) == kept
        assert torch.equal(small[:kept], whole[:kept])
        overflowed += count > slots
    assert 5 < overflowed < 35


# ---- no host read: fake CUDA tensors -----------------------------------------------------------


class RunTheImplementations(TorchDispatchMode):
    """Runs runlora's ops by their implementations (dropout.IMPLS), not by their registered fake
    versions: over a FakeTensorMode, every op they call then runs on fake tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "runlora":
            return D.IMPLS[func._opname](*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def fake_cuda():
    with FakeTensorMode(allow_non_fake_inputs=False), RunTheImplementations():
        yield


def test_a_host_read_raises_on_fake_cuda_tensors(fake_cuda):
    """The premise: on these tensors a host read or a data-dependent shape is an error."""
    x = torch.randn(4, 8, device=CUDA)
    with pytest.raises(Exception):
        int(x.sum())
    with pytest.raises(Exception):
        x[x > 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [64 * 48, 2**31 + 64])  # int32 and int64 positions
def test_every_dropout_op_runs_on_cuda_without_a_host_read(fake_cuda, dtype, numel):
    n, d, r, p = (64, 48, 8, 0.1) if numel < 2**31 else (2**25 + 1, 64, 8, 0.05)
    x = torch.randn(n, d, device=CUDA, dtype=dtype)
    a = torch.randn(r, d, device=CUDA, dtype=dtype)
    left = torch.randn(n, r, device=CUDA, dtype=dtype)
    seed = D.draw_seed(x, "site")
    slots = D.capacity(n * d, p)
    buffer = D.dropped_positions(seed, n * d, p, slots, CUDA)
    assert (buffer.shape, buffer.dtype, buffer.device.type) == (
        (slots + 1,), D.position_dtype(n * d), "cuda")
    assert D.s_times_at(x, buffer, a).shape == (n, r)
    drawn, product = D.drawn_s_times_at(seed, n * d, p, slots, x, a)
    assert (drawn.shape, drawn.dtype, product.shape) == (buffer.shape, buffer.dtype, (n, r))
    assert D.lt_times_s(left, buffer, x).shape == (r, d)
    D.zero_at_(torch.randn(n, d, device=CUDA, dtype=dtype), buffer)
    D.minus_dots_at_(torch.randn(n, d, device=CUDA, dtype=dtype), buffer, left, a, 1.25)


def _units() -> list[SiteGroup]:
    """A site in fp32, one at PEFT's bf16 default (fp32 adapters), and a q/k/v-like group."""
    def site(path, d_out, dtype=torch.float32, adapter_dtype=None):
        return LoraSite(path, 24, 16, d_out, (Adapter(4, 0.1, 2.0, True, True),), dtype, False,
                        False, True, True, device="cuda:0", adapter_dtype=adapter_dtype,
                        lora_dtype=adapter_dtype, result_dtype=dtype)
    return [SiteGroup((site("o", 16),)),
            SiteGroup((site("o", 16, torch.bfloat16, torch.float32),)),
            SiteGroup(tuple(site(name, d_out) for name, d_out in (("q", 16), ("k", 8), ("v", 8))))]


def run_program_on_cuda(unit: SiteGroup, program) -> dict[str, torch.Tensor]:
    """The program's forward then backward steps (execute.run_steps, as the rewritten graph runs
    them) on CUDA operands, ones as tangents: every value by name."""
    env = {op.name: torch.randn(*op.shape, device=CUDA, dtype=op.dtype)
           for op in program_operands(unit, program)}
    placement = {name: (t.shape, t.device) for name, t in env.items()}
    run_steps(program.forward, env, [2.0] * len(unit.members), "site", placement)
    for name, out in zip(program.tangents, program.outputs):
        env[name] = torch.ones_like(env[out])
    run_steps(program.backward, env, [2.0] * len(unit.members), "site", placement)
    return env


@pytest.mark.parametrize("unit", _units(), ids=["fp32", "bf16-peft", "group"])
def test_every_sparse_dropout_plans_step_runs_on_cuda_without_a_host_read(fake_cuda, unit):
    """Each legal sparse-dropout plan's program, forward then backward, step by step as the
    rewritten graph runs it (execute.run_steps), on fake CUDA operands. Autograd itself cannot
    run on fake CUDA tensors in a CPU-only torch, so the backward steps get the tangents
    directly."""
    plans = [plan for plan in plans_for(unit)
             if plan.sparse_dropout and illegal_reason(plan, unit) is None]
    assert plans
    for plan in plans:
        program = program_for(plan, unit)
        env = run_program_on_cuda(unit, program)
        for leaf, grad in program.grads:
            assert env[grad].shape == env[leaf].shape, (plan.describe(), leaf)
        assert program.grads, plan.describe()


@pytest.mark.parametrize("unit", _units(), ids=["fp32", "bf16-peft", "group"])
def test_off_the_cpu_the_sparse_steps_are_torch_ops_inductor_can_fuse(unit):
    """Only the seed stays an opaque op on CUDA: the draw and the products are traced into the
    graph as aten ops (no host read: fake CUDA tensors), which Inductor lowers to its kernels."""
    plan = next(plan for plan in plans_for(unit) if plan.sparse_dropout)
    program = program_for(plan, unit)
    record = RecordRunloraOps()
    with FakeTensorMode(allow_non_fake_inputs=False), record:
        run_program_on_cuda(unit, program)
    assert set(record.calls) == {"draw_seed"}, plan.describe()


def _in_graph_steps(seed, x, a, left, dense, p):
    """The off-CPU implementations (dropout.positions_op / product_ops of a CUDA device) of a
    draw and every product, on whatever device the tensors are."""
    cuda_positions, cuda_products = D.positions_op(CUDA), D.product_ops(CUDA)
    numel = x.numel()
    buffer = cuda_positions(seed, numel, p, D.capacity(numel, p), x.device)
    zeroed, minus = dense.clone(), dense.clone()
    cuda_products["zero_at"](zeroed, buffer)
    cuda_products["minus_dots_at"](minus, buffer, left, a, 1.25)
    return (buffer, cuda_products["s_times_at"](x, buffer, a),
            cuda_products["lt_times_s"](left, buffer, x), zeroed, minus)


def test_inductor_lowers_the_off_cpu_steps_and_they_equal_the_cpu_kernels():
    """No GPU here, so Inductor's CPU backend compiles the very code a GPU's graph holds; its
    results equal the CPU's opaque ops (the C loops) on the same seed. Inductor's CPU
    vectorizer is off: torch 2.13's AVX2 code for int64 arange × constant corrupts the heap
    (Triton, on a GPU, is not that code)."""
    gen = torch.Generator().manual_seed(0)
    n, d, r, p = 64, 48, 4, 0.1
    x, dense = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    a, left = torch.randn(r, d, generator=gen), torch.randn(n, r, generator=gen)
    seed = torch.tensor(12_345)
    with torch._inductor.config.patch({"cpp.simdlen": 1}):
        compiled = torch.compile(_in_graph_steps, backend="inductor", fullgraph=True)
        got = compiled(seed, x, a, left, dense, p)
    cpu = D.product_ops(torch.device("cpu"))
    buffer = D.positions_op(torch.device("cpu"))(seed, n * d, p, D.capacity(n * d, p),
                                                 torch.device("cpu"))
    zeroed, minus = dense.clone(), dense.clone()
    cpu["zero_at"](zeroed, buffer)
    cpu["minus_dots_at"](minus, buffer, left, a, 1.25)
    want = (buffer, cpu["s_times_at"](x, buffer, a), cpu["lt_times_s"](left, buffer, x),
            zeroed, minus)
    assert torch.equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_compiled_step_with_the_off_cpu_steps_equals_the_one_with_the_cpu_ops(monkeypatch):
    """The path a GPU takes — the draw and the products traced into the joint graph, the
    in-place products functionalized, the graph partitioned (Inductor's lowering of these ops:
    the test above) — run here by handing the CPU the off-CPU implementations: the same seeds
    draw the same positions (one sampler), so loss and every gradient equal the step that runs
    the C loops behind the opaque ops."""
    model = peft_llama(layers=1, hidden=32, lora_dropout=0.1)
    inputs = torch.randint(0, 128, (2, 12))

    def step(m):
        torch.manual_seed(5)
        compiled = torch.compile(m, backend=runlora_fx.Backend({"inner": "eager"}))
        loss = compiled(input_ids=inputs, labels=inputs).loss
        loss.backward()
        return loss.detach()

    with_ops = twin(model)
    want = step(with_ops)
    torch._dynamo.reset()
    positions_op, product_ops, traced = D.positions_op, D.product_ops, []
    monkeypatch.setattr(D, "positions_op", lambda device: traced.append(device) or
                        positions_op(CUDA))
    monkeypatch.setattr(D, "product_ops", lambda device: product_ops(CUDA))
    in_graph = twin(model)
    got = step(in_graph)
    assert traced  # the rewritten graph was traced with them
    torch.testing.assert_close(got, want)
    expected, actual = grads(with_ops), grads(in_graph)
    assert expected.keys() == actual.keys() and expected
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6)
