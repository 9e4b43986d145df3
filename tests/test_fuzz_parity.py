"""Property-based parity: random LoRA models, in every style users write, compiled with runlora,
match eager — outputs, every parameter grad and the input grad (fp32, rel err ≤ 1e-5).

Every style is rewritten (each example asserts how many sites were) — also weights stored
in×out and used as `x @ W_t`, and a matmul base with a separate bias add — but for a scale
applied before lora_B, which is not LoRA-shaped: it is left to the inner compiler untouched and
must be exact all the same.

Profiles (environment variable RUNLORA_FUZZ_PROFILE):
  ci        (default) eager inner compiler, ≥ 200 examples in total
  inductor  Inductor as the inner compiler, fewer examples (slow: Inductor codegen per example)
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model

import runlora_fx
from conftest import rel_err

FP32_TOL = 1e-5


@dataclass(frozen=True)
class FuzzProfile:
    inner: str
    examples_per_style: int  # each custom style and the PEFT test
    peft_examples: int


PROFILES = {
    "ci": FuzzProfile(inner="eager", examples_per_style=22, peft_examples=46),
    "inductor": FuzzProfile(inner="inductor", examples_per_style=3, peft_examples=6),
}
PROFILE_NAME = os.environ.get("RUNLORA_FUZZ_PROFILE", "ci")
if PROFILE_NAME not in PROFILES:
    raise ValueError(
        f"RUNLORA_FUZZ_PROFILE={PROFILE_NAME!r}; choose one of {', '.join(PROFILES)}"
    )
PROFILE = PROFILES[PROFILE_NAME]

for _name, _profile in PROFILES.items():
    settings.register_profile(
        f"runlora-fuzz-{_name}",
        deadline=None,
        derandomize=True,  # CI sees the same examples every run: a failure reproduces
        database=None,
        phases=[Phase.explicit, Phase.generate],  # shrinking recompiles: minutes per failure
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
FUZZ = settings.get_profile(f"runlora-fuzz-{PROFILE_NAME}")


# --- LoRA written in the styles users write ---------------------------------------------------


def _param(*shape: int, grad: bool = True) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape) * shape[-1] ** -0.5, requires_grad=grad)


@dataclass(frozen=True)
class SiteSpec:
    d_in: int
    d_out: int
    ranks: tuple[int, ...]
    scales: tuple[float, ...]
    bias: bool
    bias_trainable: bool
    dropout: float
    freeze_first_a: bool


class HandLoRA(torch.nn.Module):
    """One LoRA linear, its forward written in `style`; W frozen, A and B trainable."""

    def __init__(self, spec: SiteSpec, style: str) -> None:
        super().__init__()
        self.style, self.scales = style, spec.scales
        transposed = style == "transposed"
        w_shape = (spec.d_in, spec.d_out) if transposed else (spec.d_out, spec.d_in)
        if style == "tt_modules":  # torchtune's LoRALinear: nn.Linear sub-modules
            self.base = torch.nn.Linear(spec.d_in, spec.d_out, bias=spec.bias)
            self.base.weight.requires_grad_(False)
            if spec.bias:
                self.base.bias.requires_grad_(spec.bias_trainable)
            self.lora_a = torch.nn.ModuleList(
                torch.nn.Linear(spec.d_in, r, bias=False) for r in spec.ranks
            )
            self.lora_b = torch.nn.ModuleList(
                torch.nn.Linear(r, spec.d_out, bias=False) for r in spec.ranks
            )
            with torch.no_grad():
                for b in self.lora_b:
                    b.weight.normal_(0, 0.3)
        else:
            self.weight = _param(*w_shape, grad=False)
            self.bias = _param(spec.d_out, grad=spec.bias_trainable) if spec.bias else None
            a_shapes = [(spec.d_in, r) if transposed else (r, spec.d_in) for r in spec.ranks]
            b_shapes = [(r, spec.d_out) if transposed else (spec.d_out, r) for r in spec.ranks]
            self.lora_a = torch.nn.ParameterList(_param(*s) for s in a_shapes)
            self.lora_b = torch.nn.ParameterList(_param(*s) for s in b_shapes)
        if spec.freeze_first_a:
            first = self.lora_a[0]
            (first.weight if isinstance(first, torch.nn.Linear) else first).requires_grad_(False)
        self.dropouts = torch.nn.ModuleList(
            torch.nn.Dropout(spec.dropout) if spec.dropout else torch.nn.Identity()
            for _ in spec.ranks
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        style = self.style
        if style == "tt_modules":
            out = self.base(x)
        elif style == "matmul":
            out = torch.matmul(x, self.weight.t())
            out = out + self.bias if self.bias is not None else out
        elif style == "transposed":
            out = x @ self.weight
            out = out + self.bias if self.bias is not None else out
        else:
            out = F.linear(x, self.weight, self.bias)
        for a, b, s, drop in zip(self.lora_a, self.lora_b, self.scales, self.dropouts):
            xd = drop(x)
            if style == "functional":  # hand-written F.linear, PEFT's graph shape
                out = out + s * F.linear(F.linear(xd, a), b)
            elif style == "tt_modules":
                out = out + s * b(a(xd))
            elif style == "tt_params":  # torchtune-like LoRALinear with its own Parameters
                out = out + (xd @ a.T @ b.T) * s
            elif style == "loralib":
                out = out + (xd @ a.transpose(0, 1) @ b.transpose(0, 1)) * s
            elif style == "matmul":
                out = out + s * torch.matmul(torch.matmul(xd, a.t()), b.t())
            elif style == "transposed":  # weights stored d_in×d_out, A d_in×r, B r×d_out
                out = out + (xd @ a) @ b * s
            elif style == "scale_inside":  # the scale applied before lora_B
                out = out + F.linear(F.linear(xd, a) * s, b)
            else:
                raise AssertionError(style)
        return out


# style → is a site of that style (and spec) rewritten by runlora, or left to the inner compiler
STYLES = {
    "functional": lambda spec: True,
    "tt_modules": lambda spec: True,
    "tt_params": lambda spec: True,  # `x @ A.T @ B.T`: a matmul by a transposed 2-D weight
    "loralib": lambda spec: True,
    # `matmul(x, W.t()) + b`: a product by W's transposed view, plus a bias of d_out elements
    "matmul": lambda spec: True,
    # `x @ W_t` with W_t, A, B stored in×out: read through their transposed views
    "transposed": lambda spec: True,
    "scale_inside": lambda spec: False,  # `linear(s · h, B)` is not LoRA-shaped
}

TOPOLOGIES = ("single", "sequence", "qkv", "feeds_other")


class Net(torch.nn.Module):
    """Sites wired as `topology`: alone, in sequence, sharing one input, or with x used twice."""

    def __init__(self, sites: list[torch.nn.Module], topology: str) -> None:
        super().__init__()
        self.sites = torch.nn.ModuleList(sites)
        self.topology = topology

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.topology == "sequence":
            return (self.sites[1](torch.tanh(self.sites[0](x))),)
        if self.topology == "qkv":
            return tuple(site(x) for site in self.sites)
        if self.topology == "feeds_other":
            return self.sites[0](x), torch.sin(x) * 0.5
        return (self.sites[0](x),)


def site_dims(topology: str, d_in: int, d_outs: list[int]) -> list[tuple[int, int]]:
    if topology == "sequence":
        return [(d_in, d_outs[0]), (d_outs[0], d_outs[1])]
    if topology == "qkv":
        return [(d_in, d) for d in d_outs]
    return [(d_in, d_outs[0])]


# --- strategies ------------------------------------------------------------------------------

dims = st.integers(1, 24)
dropouts = st.sampled_from([0.0, 0.0, 0.1, 0.5])


@st.composite
def site_specs(draw, d_in: int, d_out: int) -> SiteSpec:
    n = draw(st.integers(1, 3))
    ranks = tuple(draw(st.lists(st.integers(1, 8), min_size=n, max_size=n)))
    scales = tuple(
        draw(st.lists(st.floats(0.25, 4.0), min_size=n, max_size=n, unique=True))
    )
    bias = draw(st.booleans())
    return SiteSpec(
        d_in=d_in,
        d_out=d_out,
        ranks=ranks,
        scales=scales,
        bias=bias,
        bias_trainable=bias and draw(st.booleans()),
        dropout=draw(dropouts),
        freeze_first_a=draw(st.booleans()),
    )


@st.composite
def models(draw) -> dict:
    topology = draw(st.sampled_from(TOPOLOGIES))
    d_in = draw(dims)
    d_outs = draw(st.lists(dims, min_size=3, max_size=3))
    specs = [draw(site_specs(i, o)) for i, o in site_dims(topology, d_in, d_outs)]
    batch = draw(st.sampled_from([(), (1,), (2,), (3,)]))  # () gives a 2-D x
    seq = draw(st.integers(1, 5))
    return {
        "topology": topology,
        "specs": specs,
        "x_shape": (*batch, seq, d_in),
        "x_grad": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


# --- the parity check ------------------------------------------------------------------------


def run_step(model: torch.nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)  # the same dropout masks in the eager and the compiled run
    outs = model(x)
    sum(o.square().mean() + o.sum() * 0.1 for o in outs).backward()
    return outs


class Fp32Masks(torch.overrides.TorchFunctionMode):
    """Dropout in an fp64 run with the masks an fp32 run draws from the same seed."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x, p = args[0], kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            mask = F.dropout(torch.ones(x.shape), p, training)  # fp32 draw: same RNG stream
            return x * mask.to(x.dtype)
        return func(*args, **kwargs)


def fp64_reference(model: torch.nn.Module, x: torch.Tensor, seed: int):
    """Outputs, parameter grads and the x grad of an fp64 eager run with the fp32 masks."""
    model = copy.deepcopy(model).double()
    x = x.detach().double().requires_grad_(x.requires_grad)
    with Fp32Masks():
        outs = run_step(model, x, seed)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return outs, grads, x.grad


class Parity:
    """`got` matches eager fp32 within FP32_TOL (norm-wise) — or, where eager fp32 itself is
    that far from the fp64 truth (cancellation in a tiny grad), `got` is no farther from it than
    4× eager's own error. A wrong rewrite is off by O(1), never by a rounding-sized amount."""

    def __init__(self, reference) -> None:
        self._reference, self._fp64 = reference, None
        self.worst = 0.0

    def check(self, got: torch.Tensor, eager: torch.Tensor, where, what: str) -> None:
        assert got.shape == eager.shape, what
        err = rel_err(got, eager)
        if err <= FP32_TOL:
            return
        if self._fp64 is None:
            self._fp64 = self._reference()
        truth = where(self._fp64)
        eager_err, got_err = rel_err(eager, truth), rel_err(got, truth)
        assert got_err <= max(4 * eager_err, FP32_TOL), (
            f"{what}: rel err {err:.3g} vs eager fp32; vs fp64 ours {got_err:.3g}, "
            f"eager fp32 {eager_err:.3g}"
        )


def check_parity(model: torch.nn.Module, x_shape: tuple[int, ...], x_grad: bool, seed: int):
    """Eager vs runlora on a deep copy; returns the backend for its reports."""
    torch._dynamo.reset()
    compiled_model, pristine = copy.deepcopy(model), copy.deepcopy(model)
    backend = runlora_fx.Backend({"inner": PROFILE.inner})
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(seed))
    x_eager, x_comp = x.clone().requires_grad_(x_grad), x.clone().requires_grad_(x_grad)
    with torch._inductor.config.patch(fallback_random=True):
        expected = run_step(model, x_eager, seed)
        got = run_step(torch.compile(compiled_model, backend=backend, dynamic=False), x_comp, seed)
    parity = Parity(lambda: fp64_reference(pristine, x_eager, seed))
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        parity.check(g, e, lambda ref, i=i: ref[0][i], f"output {i}")
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    have = {n: p.grad for n, p in compiled_model.named_parameters() if p.grad is not None}
    assert want.keys() == have.keys() and want
    for name in want:
        parity.check(have[name], want[name], lambda ref, n=name: ref[1][n], f"grad {name}")
    if x_grad:
        parity.check(x_comp.grad, x_eager.grad, lambda ref: ref[2], "grad x")
    return backend


def rewritten(backend: runlora_fx.Backend) -> int:
    return sum(report.sites_rewritten for report in backend.reports)


def skipped(backend: runlora_fx.Backend) -> list:
    return [s for report in backend.reports for s in report.skipped]


@pytest.mark.parametrize("style", STYLES)
@settings(FUZZ, max_examples=PROFILE.examples_per_style)
@given(case=models())
def test_hand_written_styles(style, case):
    torch.manual_seed(case["seed"])
    model = Net([HandLoRA(spec, style) for spec in case["specs"]], case["topology"])
    backend = check_parity(model, case["x_shape"], case["x_grad"], case["seed"])
    expected_sites = sum(STYLES[style](spec) for spec in case["specs"])
    assert rewritten(backend) == expected_sites
    assert not skipped(backend)


# --- PEFT ------------------------------------------------------------------------------------

NAMES = {"single": ["q"], "sequence": ["up", "down"], "qkv": ["q", "k", "v"],
         "feeds_other": ["q"]}


class PeftBase(torch.nn.Module):
    def __init__(self, topology: str, dims_: list[tuple[int, int]], bias: bool) -> None:
        super().__init__()
        self.names = NAMES[topology]
        self.topology = topology
        for name, (i, o) in zip(self.names, dims_):
            setattr(self, name, torch.nn.Linear(i, o, bias=bias))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.topology == "sequence":
            return (self.down(torch.tanh(self.up(x))),)
        if self.topology == "qkv":
            return self.q(x), self.k(x), self.v(x)
        if self.topology == "feeds_other":
            return self.q(x), torch.sin(x) * 0.5
        return (self.q(x),)


@st.composite
def peft_models(draw) -> dict:
    case = draw(models())
    adapters = draw(st.integers(1, 3))
    configs = [
        {"r": draw(st.integers(1, 8)), "lora_alpha": draw(st.sampled_from([1, 2, 3, 8, 16])),
         "lora_dropout": draw(dropouts), "use_rslora": draw(st.booleans())}
        for _ in range(adapters)
    ]
    return {**case, "adapters": configs, "bias": draw(st.booleans())}


@settings(FUZZ, max_examples=PROFILE.peft_examples)
@given(case=peft_models())
def test_peft(case):
    torch.manual_seed(case["seed"])
    dims_ = [(s.d_in, s.d_out) for s in case["specs"]]
    targets = NAMES[case["topology"]]
    base = PeftBase(case["topology"], dims_, case["bias"])
    first, *more = case["adapters"]
    model = get_peft_model(base, LoraConfig(target_modules=targets, **first))
    names = ["default"]
    for k, config in enumerate(more):
        model.add_adapter(f"extra{k}", LoraConfig(target_modules=targets, **config))
        names.append(f"extra{k}")
    model.base_model.set_adapter(names)
    gen = torch.Generator().manual_seed(case["seed"])
    for name, param in model.named_parameters():  # set_adapter leaves only one trainable
        param.requires_grad_("lora_" in name)
        if "lora_B" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    backend = check_parity(model, case["x_shape"], case["x_grad"], case["seed"])
    assert rewritten(backend) == len(targets)
    assert not skipped(backend)
    assert all(len(d.site.adapters) == len(names)
               for r in backend.reports for d in r.decisions)
