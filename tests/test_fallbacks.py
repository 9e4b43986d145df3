"""The fallback contract: a LoRA-shaped pattern that cannot be rewritten exactly is left to the
inner compiler untouched, with its reason in `report.skipped` — no crash, no wrong gradient.

One test per reason `passes/find_sites.py` can give (README "Fallbacks" lists the same), plus
weight tying, hooks that mutate and non-contiguous tensors (which are rewritten, exactly).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import runlora_fx
from conftest import rel_err

FP32_TOL = 1e-5
D_IN, D_OUT, R = 6, 5, 2


def _param(*shape: int, grad: bool = True) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape) * 0.5, requires_grad=grad)


class Pattern(torch.nn.Module):
    """A frozen W (d_out×d_in) and bias, two adapters (A, B), (A2, B2); `body` is the forward."""

    def __init__(self, body: Callable, w_grad: bool = False) -> None:
        super().__init__()
        self.body = body
        self.W = _param(D_OUT, D_IN, grad=w_grad)
        self.b = _param(D_OUT, grad=False)
        self.A, self.B = _param(R, D_IN), _param(D_OUT, R)
        self.A2, self.B2 = _param(R + 1, D_IN), _param(D_OUT, R + 1)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.W, self.b)

    def lora(self, x: torch.Tensor, s: float = 0.5) -> torch.Tensor:
        return s * F.linear(F.linear(x, self.A), self.B)

    def lora2(self, x: torch.Tensor, s: float = 2.0) -> torch.Tensor:
        return s * F.linear(F.linear(x, self.A2), self.B2)

    def forward(self, *args):
        return self.body(self, *args)


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _step(model, args, seed: int):
    torch.manual_seed(seed)  # the same dropout masks in eager and compiled runs
    outs = _outputs(model(*args))
    sum(o.square().sum() + o.sum() for o in outs).backward()
    return outs


def compare(model: torch.nn.Module, x: torch.Tensor, *extra, x_grad: bool = True,
            seed: int = 3, **compile_kw) -> runlora_fx.Backend:
    """Compile a deep copy with runlora (eager inner); outputs and all grads equal eager's."""
    compiled_model = copy.deepcopy(model)
    backend = runlora_fx.Backend({"inner": "eager"})
    x_e, x_c = x.clone().requires_grad_(x_grad), x.clone().requires_grad_(x_grad)
    with torch._inductor.config.patch(fallback_random=True):
        expected = _step(model, (x_e, *extra), seed)
        got = _step(torch.compile(compiled_model, backend=backend, **compile_kw), (x_c, *extra),
                    seed)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and rel_err(g, e) <= FP32_TOL
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    have = {n: p.grad for n, p in compiled_model.named_parameters() if p.grad is not None}
    assert want.keys() == have.keys() and want
    for name in want:
        assert rel_err(have[name], want[name]) <= FP32_TOL, name
    if x_grad:
        assert rel_err(x_c.grad, x_e.grad) <= FP32_TOL
    return backend


def reasons(backend: runlora_fx.Backend) -> list[str]:
    return [s.reason for report in backend.reports for s in report.skipped]


def rewritten(backend: runlora_fx.Backend) -> int:
    return sum(report.sites_rewritten for report in backend.reports)


def assert_skipped(backend: runlora_fx.Backend, reason: str, count: int = 1) -> None:
    found = reasons(backend)
    assert sum(reason in r for r in found) == count, found
    assert rewritten(backend) == 0


def x3d() -> torch.Tensor:
    return torch.randn(2, 3, D_IN, generator=torch.Generator().manual_seed(0))


# --- one test per reason -----------------------------------------------------------------------


def test_branch_reads_a_different_input():
    model = Pattern(lambda m, x: m.base(x) + m.lora(x * 2.0))
    assert_skipped(compare(model, x3d()), "a LoRA branch reads a different input")


def test_base_weight_requires_grad():
    model = Pattern(lambda m, x: m.base(x) + m.lora(x), w_grad=True)
    assert_skipped(compare(model, x3d()), "the base weight requires grad")


def test_one_dimensional_x():
    model = Pattern(lambda m, x: m.base(x) + m.lora(x))
    backend = compare(model, torch.randn(D_IN))
    assert_skipped(backend, f"x({D_IN},) and W({D_OUT}, {D_IN}) are not a 2-D linear")


def _setitem_then_site(m, x):
    x = x * 1.0
    x[..., 0] = 0.0
    return m.base(x) + m.lora(x)


def test_x_mutated_in_place():
    model = Pattern(_setitem_then_site)
    assert_skipped(compare(model, x3d()), "x is mutated in place")


def _mutate_view_inside(m, x):
    x = x * 1.0
    y = m.base(x)
    x.view(-1)[:4].mul_(0.0)  # eager: the base read x before, the LoRA branch after
    return y + m.lora(x)


def test_in_place_op_inside_the_site():
    """Before this check the rewrite read x at the sum: the base saw the mutated x too."""
    backend = compare(Pattern(_mutate_view_inside), x3d())
    assert_skipped(backend, "runs between the site's reads and its sum")


def _base_used_twice(m, x):
    y = m.base(x)
    return y + m.lora(x), y


def test_base_linear_used_outside():
    backend = compare(Pattern(_base_used_twice), x3d())
    assert_skipped(backend, "the base linear (")


def _partial_sum_used_twice(m, x):
    partial = m.base(x) + m.lora(x)
    return partial + m.lora2(x), partial


def test_partial_sum_used_outside():
    backend = compare(Pattern(_partial_sum_used_twice), x3d())
    assert_skipped(backend, "a partial sum")


def _hidden_used_twice(m, x):
    h = F.linear(x, m.A)
    return m.base(x) + 0.5 * F.linear(h, m.B), h.sum(-1)


def test_lora_intermediate_used_outside():
    backend = compare(Pattern(_hidden_used_twice), x3d())
    assert_skipped(backend, "a LoRA intermediate")


class TwoSites(torch.nn.Module):
    """q- and v-like sites on one input; `tie` shares the base W or lora_A between them."""

    def __init__(self, tie: str) -> None:
        super().__init__()
        self.q, self.v = Pattern(None), Pattern(None)
        if tie == "base":
            self.v.W = self.q.W
        elif tie == "lora_A":
            self.v.A = self.q.A

    def forward(self, x: torch.Tensor):
        return self.q.base(x) + self.q.lora(x), self.v.base(x) + self.v.lora(x, 1.5)


def test_shared_adapter_weights():
    backend = compare(TwoSites("lora_A"), x3d())
    assert_skipped(backend, "lora_A weight (shared adapter weights)", count=2)


def _transposed_view_used_twice(m, x):
    a_t = m.A.T  # `x @ A.T` reads A through this view; the view is also used elsewhere
    return m.base(x) + (x @ a_t @ m.B.T) * 0.5, a_t.sum(0)


def test_shared_transposed_adapter_view():
    backend = compare(Pattern(_transposed_view_used_twice), x3d())
    assert_skipped(backend, "lora_A weight (shared adapter weights) (a_t)")


def _matmul_forms(m, x):
    return (m.base(x) + (x @ m.A.T @ m.B.t()) * 0.5
            + 2.0 * torch.matmul(torch.matmul(x, m.A2.transpose(0, 1)), m.B2.permute(1, 0)))


def test_matmul_forms_are_rewritten():
    """`x @ A.T`, `.t()`, `.transpose(0, 1)`, `.permute(1, 0)` read A in F.linear's layout."""
    backend = compare(Pattern(_matmul_forms), x3d())
    assert rewritten(backend) == 1 and not reasons(backend)
    [report] = backend.reports
    assert len(report.decisions[0].site.adapters) == 2


def test_tied_frozen_base_weight_is_rewritten():
    """A frozen W read by two sites is only read: both sites are rewritten, exactly."""
    backend = compare(TwoSites("base"), x3d())
    assert rewritten(backend) == 2 and not reasons(backend)


class LinearModules(torch.nn.Module):
    def __init__(self, lora_bias: bool, b_rows: int = D_OUT) -> None:
        super().__init__()
        self.base = torch.nn.Linear(D_IN, D_OUT).requires_grad_(False)
        self.lora_A = torch.nn.Linear(D_IN, R, bias=lora_bias)
        self.lora_B = torch.nn.Linear(R, b_rows, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + 0.5 * self.lora_B(self.lora_A(x))


def test_lora_linear_with_bias():
    assert_skipped(compare(LinearModules(lora_bias=True), x3d()), "a LoRA linear has a bias")


def test_adapter_shapes_that_broadcast():
    """lora_B with one output row broadcasts over d_out: not LoRA, and not rewritten."""
    backend = compare(LinearModules(lora_bias=False, b_rows=1), x3d())
    assert_skipped(backend, f"adapter shapes A({R}, {D_IN}) B(1, {R}) do not fit")


class TensorScale(Pattern):
    def __init__(self) -> None:
        super().__init__(None)
        self.scale = torch.nn.Parameter(torch.tensor(0.7))  # a learned 0-d scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.A), self.B)


def test_tensor_scale():
    assert_skipped(compare(TensorScale(), x3d()), "the LoRA scale is a tensor")


def _dropout_p_argument(m, x, p):
    return m.base(x) + m.lora(F.dropout(x, p))


def test_non_constant_dropout_p():
    """A float argument stays symbolic only with specialize_float off and dynamic shapes."""
    model = Pattern(_dropout_p_argument)
    with torch._dynamo.config.patch(specialize_float=False):
        backend = compare(model, x3d(), 0.3, dynamic=True)
    found = reasons(backend)
    assert "dropout with a non-constant p or training flag, or in place" in found, found


def _in_place_dropout(m, x):
    x = x * 1.0
    y = m.base(x)
    return y + m.lora(F.dropout(x, 0.3, True, True))


def test_in_place_dropout():
    """nn.Dropout(inplace=True) on the branch mutates x after the base read it."""
    assert_skipped(compare(Pattern(_in_place_dropout), x3d()), "x is mutated in place")


def _cut_after_the_branch(m, x):
    y, branch = m.base(x), m.lora(x)
    torch._dynamo.graph_break()  # graph 1 returns the scaled branch, graph 2 adds it
    return y + branch


def _cut_before_the_base(m, x):
    branch = m.lora(x)
    torch._dynamo.graph_break()  # graph 2 adds the base linear to the branch from graph 1
    return m.base(x) + branch


def _cut_before_the_scale(m, x):
    y, branch = m.base(x), F.linear(F.linear(x, m.A), m.B)
    torch._dynamo.graph_break()
    return y + 0.5 * branch


def _cut_between_lora_a_and_lora_b(m, x):
    h = F.linear(x, m.A)
    torch._dynamo.graph_break()  # graph 2 holds `base + 0.5 · linear(h, B)`, h a graph input
    return m.base(x) + 0.5 * F.linear(h, m.B)


@pytest.mark.parametrize(
    "body",
    [_cut_after_the_branch, _cut_before_the_base, _cut_before_the_scale,
     _cut_between_lora_a_and_lora_b],
    ids=["after-branch", "before-base", "before-scale", "between-A-and-B"],
)
def test_site_cut_by_a_graph_break(body):
    """A graph break (or a DDP bucket boundary, tests/test_distributed.py) inside a site: each
    graph holds a part of it; the site is reported once."""
    backend = compare(Pattern(body), x3d())
    assert len(backend.reports) == 2
    assert_skipped(backend, "the site is cut across graphs (a DDP bucket boundary or a graph "
                   "break): its LoRA branch and the sum with its base linear are compiled apart")


def test_a_factorized_layer_is_not_reported_as_a_cut_site():
    """An unscaled `linear(linear(x, W1), W2)` returned as is, with no linear beside it reading
    x, is a factorized layer as likely as a cut LoRA branch: nothing is reported."""
    model = Pattern(lambda m, x: F.linear(F.linear(x, m.A), m.B))
    backend = compare(model, x3d())
    assert rewritten(backend) == 0 and not reasons(backend)


# --- hooks, non-contiguous tensors ------------------------------------------------------------


class Pair(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(D_IN, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


def peft_pair() -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(Pair(), LoraConfig(r=R, lora_alpha=4, target_modules=["up"]))
    with torch.no_grad():
        model.base_model.model.up.lora_B["default"].weight.normal_()
    return model


def test_forward_hook_mutating_the_base_output():
    """The hook returns None: the sum reads the mutated linear node, which has two users."""
    model = peft_pair()

    def double(module, args, out):
        out.mul_(2)

    model.base_model.model.up.base_layer.register_forward_hook(double)
    assert_skipped(compare(model, x3d()), "the base linear (")


def test_forward_hook_returning_the_mutated_output():
    """The hook's result replaces the output: the sum reads `mul_`, no longer LoRA-shaped."""
    model = peft_pair()
    model.base_model.model.up.base_layer.register_forward_hook(lambda m, a, out: out.mul_(2))
    backend = compare(model, x3d())
    assert rewritten(backend) == 0 and not reasons(backend)


def test_forward_pre_hook_mutating_x():
    """A pre-hook on lora_A halves part of x after the base layer read it (x through a view)."""
    model = peft_pair()

    def halve(module, args):
        args[0][..., :2].mul_(0.5)

    model.base_model.model.up.lora_A["default"].register_forward_pre_hook(halve)
    backend = compare(model, x3d(), x_grad=False)
    assert_skipped(backend, "runs between the site's reads and its sum")


# --- dtypes the matcher reads but cannot rewrite exactly ---------------------------------------

BF16 = torch.bfloat16


def test_branch_casts_x_down_before_fp32_products():
    """`x.to(bf16).float()` rounds x, then multiplies in fp32: not one cast to the products'
    dtype, so no plan reproduces its rounding."""
    model = Pattern(lambda m, x: m.base(x) + 0.5 * F.linear(F.linear(x.to(BF16).float(), m.A),
                                                            m.B))
    assert_skipped(compare(model, x3d()), "the LoRA branch casts x down to bfloat16 before its "
                                          "products run in float32")


def test_term_cast_to_a_third_dtype():
    model = Pattern(lambda m, x: m.base(x) + (0.5 * F.linear(F.linear(x, m.A), m.B)).to(BF16))
    assert_skipped(compare(model, x3d()), "a LoRA term is cast to another dtype than the base "
                                          "result's")


class MixedAdapters(torch.nn.Module):
    """A bf16 base with two adapters as PEFT runs them when one is fp32 and one bf16."""

    def __init__(self) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(D_OUT, D_IN, dtype=BF16), requires_grad=False)
        self.A, self.B = _param(R, D_IN), _param(D_OUT, R)
        self.A2 = torch.nn.Parameter(torch.randn(R, D_IN, dtype=BF16))
        self.B2 = torch.nn.Parameter(torch.randn(D_OUT, R, dtype=BF16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.W)
        out = out + 0.5 * F.linear(F.linear(x.float(), self.A), self.B)
        out = out + 2.0 * F.linear(F.linear(x, self.A2), self.B2)
        return out.to(BF16)


def test_adapters_stored_in_several_dtypes():
    backend = compare(MixedAdapters(), x3d().to(BF16))
    assert_skipped(backend, "the adapters are stored in several dtypes: ['bfloat16', 'float32']")


class AutocastHalfCast(Pattern):
    """lora_A cast to bf16 and lora_B left fp32, run under autocast (both products in bf16)."""

    def __init__(self) -> None:
        super().__init__(lambda m, x: m.base(x) + m.lora(x))
        self.A = torch.nn.Parameter(self.A.detach().to(BF16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=BF16):
            return super().forward(x)


def test_adapter_weights_differ_in_dtype():
    # x's grad is left out: under autocast eager and AOTAutograd round its bf16 backward in
    # different orders (plain torch.compile differs from eager there too, runlora aside)
    backend = compare(AutocastHalfCast(), x3d(), x_grad=False)
    assert_skipped(backend, "lora_A and lora_B weights differ in dtype")


class StoredTransposed(torch.nn.Module):
    """Weights stored d_in×d_out / d_in×r and read through `.t()` by F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.W_t = _param(D_IN, D_OUT, grad=False)
        self.A_t, self.B_t = _param(D_IN, R), _param(R, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.W_t.t()) + 0.5 * F.linear(F.linear(x, self.A_t.t()), self.B_t.t())


@pytest.mark.parametrize("model", [StoredTransposed, lambda: Pattern(lambda m, x: m.base(x) +
                                                                    m.lora(x))],
                         ids=["transposed-weights", "plain"])
def test_non_contiguous_x_and_weights_are_rewritten(model):
    x = torch.randn(D_IN, 3, 2).permute(2, 1, 0)  # non-contiguous 3-D x
    backend = compare(model(), x)
    assert rewritten(backend) == 1 and not reasons(backend)
