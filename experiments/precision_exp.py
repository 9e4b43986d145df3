"""Numerics of 16-bit LoRA plans against PEFT's own path: the measured legality rule (issue 11.3).

One LoRA linear (no bias, no dropout) per grid point and site kind, tensors stored in the kind's
dtypes, truth in fp64 from the stored values (docs/precision.md). Each variant runs forward and
backward. Rule, per point: output error ≤ 1.25× PEFT's, kept share of the adapter effect ≥ PEFT's
− 0.05, each of dx, dA, dB error ≤ 2× PEFT's (errors floored at 1e-7). Kept share = ⟨y − base, e⟩
/ ⟨e, e⟩ with base = x·Wᵀ, e = s·(x·Aᵀ)·Bᵀ in fp64; kept_cv = ⟨y − y0, e⟩ / ⟨e, e⟩ (y0 = PEFT's
output with the adapter disabled) has the same mean for random data and far less noise;
kept_delta = ⟨y − y_peft, e⟩ / ⟨e, e⟩ = kept − PEFT's kept. Each comes with a standard error
(two-way cluster-robust: rows share x's rounding, output columns share the weight's).

Data: x ~ N(0, 1), W ~ N(0, 1/d), A ~ U(±1/√d) (PEFT's kaiming init), B ~ N(0, 1) scaled so that
mean|s·B·A| = rel·mean|W|, dy ~ N(0, 1) stored in the output dtype; s = --scale, a power of two
so that scaling never rounds. A (d, N, r) has the same x, W, A and B direction at every rel.

Stochastic rounding of W_eff (fp32): to bf16, add 16 uniform random low bits (torch.randint with
a torch.Generator) to the fp32 bit pattern and truncate them; to fp16, take the upper of the two
neighbouring fp16 values with probability (w − lo)/(hi − lo) (torch.rand, same generator), else
the lower. Both are unbiased: E[round(w)] = w.

A Variant is (x, W, A, B, s, dy, kind, gen) -> (y, dx, dA, dB) in the kind's dtypes; --plugin
MODULE adds the module's VARIANTS (name -> Variant), e.g. ones built on runlora's executor. The
default grid (issue 11) is sized for a fast machine; on a 2-core AVX2 CPU (16-bit GEMMs emulated,
PEFT's dy·W in the slow no-transpose layout) pick points, as experiments/results/precision_cpu did:

    python experiments/precision_exp.py --points 64:256,4096:4,16,64:1e-2,1e-3,1e-4,1e-5 \
        256:1024:4,64,256:1e-2,1e-3,1e-4,1e-5 1024:256:4,64,256:1e-2,1e-3,1e-4,1e-5 \
        4096:64:16:1e-3,1e-5 -o experiments/results/precision_cpu
"""

from __future__ import annotations

import argparse
import csv
import importlib
import itertools
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn

F32, F64, BF16, FP16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
FLOOR = 1e-7  # absolute floor of every error before taking a ratio
OUT_BOUND, KEPT_SLACK, GRAD_BOUND = 1.25, 0.05, 2.0
METRICS = ("out_err", "kept", "dx_err", "dA_err", "dB_err")


@dataclass(frozen=True)
class Kind:
    """How a site stores its tensors and which dtype each product runs in."""

    name: str
    store: torch.dtype  # x and W as stored
    adapter: torch.dtype  # A and B as stored
    compute: torch.dtype  # base GEMMs and the output (and dy)
    branch: torch.dtype  # the dtype PEFT's LoRA branch products run in
    autocast: bool = False


KINDS = {k.name: k for k in (
    Kind("bf16", BF16, BF16, BF16, BF16),
    Kind("fp16", FP16, FP16, FP16, FP16),
    Kind("bf16-peft", BF16, F32, BF16, F32),  # get_peft_model on a bf16 model (PEFT's default)
    Kind("fp16-peft", FP16, F32, FP16, F32),
    Kind("autocast", F32, F32, BF16, BF16, autocast=True),  # fp32 module under autocast(bf16)
)}


@dataclass(frozen=True)
class Point:
    d: int
    n: int
    r: int
    rel: float
    weights: str = "normal"  # W's distribution, one of WEIGHTS


Result = tuple[Tensor, Tensor, Tensor, Tensor]  # y, dx, dA, dB in the kind's dtypes
Result3 = tuple[Tensor, Tensor, Tensor]


class Variant(Protocol):
    def __call__(self, x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float, dy: Tensor,
                 kind: Kind, gen: torch.Generator) -> Result: ...


# ---- rounding ----------------------------------------------------------------------------------

def round_nearest(w: Tensor, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    return w.to(dtype)


def round_stochastic(w: Tensor, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """Unbiased stochastic rounding of an fp32 tensor to bf16 or fp16 (see the module docstring)."""
    w = w.to(F32).contiguous()
    if dtype == BF16:
        noise = torch.randint(0, 1 << 16, w.shape, generator=gen, dtype=torch.int32)
        return ((w.view(torch.int32) + noise) & -65536).view(F32).to(BF16)
    if dtype != FP16:
        raise ValueError(f"stochastic rounding to {dtype}")
    near = w.to(FP16)
    away = torch.where(near.to(F32) > w, -torch.inf, torch.inf).to(FP16)
    other = torch.nextafter(near, away)
    lo, hi = torch.minimum(near, other).to(F64), torch.maximum(near, other).to(F64)
    p_hi = ((w.to(F64) - lo) / (hi - lo)).nan_to_num(0.0)  # exact values: near == w, p = 0
    up = torch.rand(w.shape, generator=gen, dtype=F64) < p_hi
    return torch.where(up, hi, lo).to(FP16)


# ---- variants ----------------------------------------------------------------------------------

def mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with b laid out column-major: on CPUs without native bf16/fp16 GEMMs the row-major
    (no-transpose) layout runs ~30x slower; the values are the same."""
    return a @ b.T.contiguous().T


def adapter_grads(x: Tensor, A: Tensor, B: Tensor, s: float, dy: Tensor, dt: torch.dtype,
                  h: Tensor | None = None, dh: Tensor | None = None) -> Result3:
    """dA, dB (in A's / B's dtype) and dh as PEFT computes them, with products in `dt`; h and dh
    are recomputed in `dt` unless given (then only cast to `dt`)."""
    xb = x.to(dt)
    h = xb @ A.to(dt).T if h is None else h.to(dt)
    g = dy.to(dt) * s
    dh = mm(g, B.to(dt)) if dh is None else dh.to(dt)
    return (dh.T @ xb).to(A.dtype), (g.T @ h).to(B.dtype), dh


def with_autograd(forward: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
                  ) -> Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Result]:
    """(x, W, A, B, dy) -> (y, dx, dA, dB): `forward` on grad-requiring copies, then backward."""
    def run(x: Tensor, W: Tensor, A: Tensor, B: Tensor, dy: Tensor) -> Result:
        x, A, B = (t.detach().clone().requires_grad_() for t in (x, A, B))
        y = forward(x, W, A, B)
        y.backward(dy)
        assert x.grad is not None and A.grad is not None and B.grad is not None
        return y.detach(), x.grad, A.grad, B.grad
    return run


class _Merged(torch.autograd.Function):
    """y = x·W_effᵀ, dx = dy·W_eff (W_eff = W + s·B·A in fp32, rounded to the compute dtype);
    dA, dB as PEFT computes them, from h recomputed in the branch dtype."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float, kind: Kind,
                rounding: Callable[[Tensor, torch.dtype, torch.Generator], Tensor],
                gen: torch.Generator) -> Tensor:
        w_eff = rounding(W.to(F32) + s * (B.to(F32) @ A.to(F32)), kind.compute, gen)
        ctx.save_for_backward(x, A, B, w_eff)
        ctx.s, ctx.kind = s, kind
        return x.to(kind.compute) @ w_eff.T

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, A, B, w_eff = ctx.saved_tensors
        dx = mm(dy.to(ctx.kind.compute), w_eff).to(x.dtype)
        dA, dB, _ = adapter_grads(x, A, B, ctx.s, dy, ctx.kind.branch)
        return dx, None, dA, dB, None, None, None, None


class _Split(torch.autograd.Function):
    """Split form as the folded GEMMs x·[W; A]ᵀ and dy·[W | s·B] give it: h and dh come rounded
    to the compute dtype; h·Bᵀ, the sum, dA, dB and dh·A run in `br`, as PEFT runs its branch
    when br is the kind's branch dtype."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float, kind: Kind,
                br: torch.dtype) -> Tensor:
        c = kind.compute
        xc = x.to(c)
        base, h = xc @ W.to(c).T, xc @ A.to(c).T
        ctx.save_for_backward(x, W, A, B, h)
        ctx.s, ctx.kind, ctx.br = s, kind, br
        return (base.to(br) + (h.to(br) @ B.to(br).T) * s).to(c)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, W, A, B, h = ctx.saved_tensors
        c, br = ctx.kind.compute, ctx.br
        dyc = dy.to(c)
        dx_base, dh = mm(dyc, W.to(c)), mm(dyc, (B.to(F32) * ctx.s).to(c))
        dA, dB, dh = adapter_grads(x, A, B, ctx.s, dy, br, h=h, dh=dh)
        dx = dx_base.to(x.dtype) + mm(dh, A.to(br)).to(c).to(x.dtype)
        return dx, None, dA, dB, None, None, None


def peft_layer(kind: Kind, W: Tensor, A: Tensor, B: Tensor, s: float) -> nn.Module:
    """A real peft LoraLayer, built as a PEFT user builds it for this kind, holding W, A, B."""
    r, d = A.shape
    config = LoraConfig(r=r, lora_alpha=s * r, target_modules=["0"], lora_dropout=0.0)
    base = nn.Sequential(nn.Linear(d, d, bias=False, dtype=kind.store))
    model = get_peft_model(base, config, autocast_adapter_dtype=kind.adapter == F32)
    layer = model.base_model.model[0]
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert layer.scaling["default"] == s and (lora_a.dtype, lora_b.dtype) == (A.dtype, B.dtype)
    with torch.no_grad():
        for p, t in ((layer.base_layer.weight, W), (lora_a, A), (lora_b, B)):
            p.copy_(t)
    return model


def peft(x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float, dy: Tensor, kind: Kind,
         gen: torch.Generator) -> Result:
    model = peft_layer(kind, W, A, B, s)
    layer = model.base_model.model[0]
    xg = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=kind.compute, enabled=kind.autocast):
        y = model(xg)
    y.backward(dy)
    grads = (xg.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)
    assert all(g is not None for g in grads)
    return y.detach(), *grads  # type: ignore[return-value]


def merged(rounding: Callable[[Tensor, torch.dtype, torch.Generator], Tensor]) -> Variant:
    def variant(x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float, dy: Tensor, kind: Kind,
                gen: torch.Generator) -> Result:
        fwd = lambda x, W, A, B: _Merged.apply(x, W, A, B, s, kind, rounding, gen)  # noqa: E731
        return with_autograd(fwd)(x, W, A, B, dy)
    return variant


def split(branch_in_compute_dtype: bool) -> Variant:
    def variant(x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float, dy: Tensor, kind: Kind,
                gen: torch.Generator) -> Result:
        br = kind.compute if branch_in_compute_dtype else kind.branch
        fwd = lambda x, W, A, B: _Split.apply(x, W, A, B, s, kind, br)  # noqa: E731
        return with_autograd(fwd)(x, W, A, B, dy)
    return variant


BASELINE = "peft"
VARIANTS: dict[str, Variant] = {
    BASELINE: peft,
    "merged-nearest": merged(round_nearest),
    "merged-stochastic": merged(round_stochastic),
    "branch-base-dtype": split(branch_in_compute_dtype=True),  # x·[W; A]ᵀ with A rounded too
    "fold-fwd-bwd": split(branch_in_compute_dtype=False),  # only h and dh rounded
}


# ---- data, truth, metrics ----------------------------------------------------------------------

def point_seed(p: Point, seed: int) -> int:
    return seed * 1_000_003 + p.d * 10_007 + p.n * 101 + p.r  # the same at every rel


# W's distributions (--weights): each draws d×d fp64 values from a generator
WEIGHTS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "normal": lambda d, g: torch.randn(d, d, generator=g, dtype=F64) / d**0.5,  # N(0, 1/d)
    "normal-0.02": lambda d, g: torch.randn(d, d, generator=g, dtype=F64) * 0.02,  # transformers
    # heavy tails, as trained weights have (std 0.02): Laplace, and Student-t with 3 dof
    "laplace": lambda d, g: _laplace(d, g) * (0.02 / 2**0.5),
    "student-t3": lambda d, g: _student_t3(d, g) * (0.02 / 3**0.5),
    # nn.Linear's own init: U(±1/√d)
    "uniform": lambda d, g: (torch.rand(d, d, generator=g, dtype=F64) * 2 - 1) / d**0.5,
}


def _laplace(d: int, g: torch.Generator) -> Tensor:
    """Laplace(0, 1): the difference of two unit exponentials."""
    e = -torch.rand(2, d, d, generator=g, dtype=F64).clamp_min(1e-300).log()
    return e[0] - e[1]


def _student_t3(d: int, g: torch.Generator) -> Tensor:
    """Student-t with 3 degrees of freedom: z / sqrt(chi²₃ / 3)."""
    z = torch.randn(4, d, d, generator=g, dtype=F64)
    return z[0] / (z[1:].square().sum(0) / 3).sqrt()


def master(p: Point, s: float, seed: int) -> tuple[Tensor, ...]:
    """fp64 x, W, A, B, dy of a point; B scaled so that mean|s·B·A| = rel·mean|W|."""
    g = torch.Generator().manual_seed(point_seed(p, seed))
    d = p.d
    x = torch.randn(p.n, d, generator=g, dtype=F64)
    W = torch.randn(d, d, generator=g, dtype=F64) / d**0.5
    if p.weights != "normal":  # drawn after the normal one: x and the normal W stay as they were
        W = WEIGHTS[p.weights](d, g)
    A = (torch.rand(p.r, d, generator=g, dtype=F64) * 2 - 1) / d**0.5
    B = torch.randn(d, p.r, generator=g, dtype=F64)
    dy = torch.randn(p.n, d, generator=g, dtype=F64)
    B = B * (p.rel * W.abs().mean() / (s * B @ A).abs().mean())
    return x, W, A, B, dy


@dataclass
class Truth:
    base: Tensor
    effect: Tensor
    y: Tensor
    dx: Tensor
    dA: Tensor
    dB: Tensor
    y0: Tensor  # PEFT's output with the adapter disabled, in the kind's dtypes


def truth(x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float, dy: Tensor, kind: Kind) -> Truth:
    x64, W64, A64, B64, dy64 = (t.to(F64) for t in (x, W, A, B, dy))
    h = x64 @ A64.T
    base, effect = x64 @ W64.T, s * (h @ B64.T)
    g = s * dy64
    dh = g @ B64
    y0 = (x.to(kind.compute) @ W.to(kind.compute).T).to(F64)
    return Truth(base, effect, base + effect, dy64 @ W64 + dh @ A64, dh.T @ x64, g.T @ h, y0)


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a.to(F64) - b).norm() / b.norm()).item()


def share(y: Tensor, ref: Tensor, e: Tensor) -> tuple[float, float]:
    """⟨y − ref, e⟩ / ⟨e, e⟩ and its standard error, two-way cluster-robust (rows share x's
    rounding; output columns share the weight's, e.g. a merged W_eff's, which reaches every
    row): an element-wise SE would miss both and understate the noise."""
    ee = (e * e).sum()
    k = ((y - ref) * e).sum() / ee
    z = (y - ref - k * e) * e
    v = z.sum(1).square().sum() + z.sum(0).square().sum() - z.square().sum()
    return k.item(), (v.clamp_min(0) ** 0.5 / ee).item()


def measure(res: Result, t: Truth, y_peft: Tensor) -> dict[str, float]:
    y = res[0].to(F64)
    (kept, kept_se), (cv, cv_se) = share(y, t.base, t.effect), share(y, t.y0, t.effect)
    delta, delta_se = share(y, y_peft.to(F64), t.effect)  # kept − PEFT's kept, paired
    return {"out_err": rel_err(y, t.y), "kept": kept, "kept_se": kept_se, "kept_cv": cv,
            "kept_cv_se": cv_se, "kept_delta": delta, "kept_delta_se": delta_se,
            "dx_err": rel_err(res[1], t.dx), "dA_err": rel_err(res[2], t.dA),
            "dB_err": rel_err(res[3], t.dB)}


def judge(v: dict[str, float], p: dict[str, float]) -> dict[str, Any]:
    """The rule of issue 11.3 for variant metrics `v` against PEFT's `p` at the same point;
    'kept_fail_within_noise': it fails only on kept share, by less than 2 standard errors."""
    ratio = {m: max(v[m], FLOOR) / max(p[m], FLOOR) for m in METRICS if m != "kept"}
    fails = [m for m, q in ratio.items() if q > (OUT_BOUND if m == "out_err" else GRAD_BOUND)]
    if v["kept_delta"] < -KEPT_SLACK:
        fails.append("kept")
    within = fails == ["kept"] and v["kept_delta"] >= -KEPT_SLACK - 2 * v["kept_delta_se"]
    return {**{f"{m}_ratio": q for m, q in ratio.items()}, "pass": not fails,
            "fails": " ".join(fails), "kept_fail_within_noise": within}


# ---- the grid ----------------------------------------------------------------------------------

def grid(ds: Sequence[int], ns: Sequence[int], rs: Sequence[int], rels: Sequence[float],
         max_nd2: float) -> list[Point]:
    """Points with r ≤ d and N·d² ≤ max_nd2 (the smallest N is kept at every d)."""
    points = []
    for d in ds:
        n_ok = [n for n in ns if n * d * d <= max_nd2] or [min(ns)]
        points += [Point(d, n, r, rel) for n, r, rel in itertools.product(n_ok, rs, rels) if r <= d]
    return points


def parse_points(spec: str) -> list[Point]:
    """'D:N:R:REL', each field a comma list: their product (r ≤ d)."""
    d, n, r, rel = ([float(v) for v in f.split(",")] for f in spec.split(":"))
    return grid([int(v) for v in d], [int(v) for v in n], [int(v) for v in r], rel, float("inf"))


def run_point(p: Point, kinds: Sequence[Kind], names: Sequence[str], s: float,
              seed: int) -> list[dict[str, Any]]:
    x64, W64, A64, B64, dy64 = master(p, s, seed)
    rows = []
    for kind in kinds:
        x, W, dy = x64.to(kind.store), W64.to(kind.store), dy64.to(kind.compute)
        A, B = A64.to(kind.adapter), B64.to(kind.adapter)
        t = truth(x, W, A, B, s, dy, kind)
        rel_stored = ((s * B.to(F64) @ A.to(F64)).abs().mean() / W.to(F64).abs().mean()).item()
        results, seconds = {}, {}
        for name in names:
            gen = torch.Generator().manual_seed(point_seed(p, seed) + 1)
            t0 = time.perf_counter()
            results[name] = VARIANTS[name](x, W, A, B, s, dy, kind, gen)
            seconds[name] = time.perf_counter() - t0
        found = {name: measure(res, t, results[BASELINE][0]) for name, res in results.items()}
        for name in names:
            rows.append({"kind": kind.name, "variant": name, "weights": p.weights, "d": p.d,
                         "n": p.n, "r": p.r, "rel": p.rel, "rel_stored": rel_stored, **found[name],
                         **judge(found[name], found[BASELINE]), "seconds": seconds[name],
                         **merge_check_estimate(name, kind, W, p, s)})
    return rows


CHECKED = ("bf16", "fp16", "bf16-peft", "fp16-peft")  # precision.CHECKED_KINDS
CHECK_COLUMNS = ("check_out_ratio", "check_kept", "check_kept_peft", "check_pass")


def merge_check_estimate(variant: str, kind: Kind, W: Tensor, p: Point,
                         s: float) -> dict[str, Any]:
    """What runlora's merge check (runlora_fx/merge_check.py) estimates from this W alone at
    the point's rel, for a merged variant on a kind it checks; blanks otherwise."""
    rounding = variant.removeprefix("runlora:").removeprefix("merged-")
    if kind.name not in CHECKED or rounding not in ("nearest", "stochastic") \
            or not variant.removeprefix("runlora:").startswith("merged-"):
        return dict.fromkeys(CHECK_COLUMNS, "")
    from precision_plans import site_of
    from runlora_fx.ir.merge_check import estimate
    from runlora_fx.ir.rounding import Rounding

    site = site_of(kind, p.n, p.d, p.r, s)
    [f] = estimate(W, site, Rounding(rounding), rels=(p.rel,))
    return {"check_out_ratio": f.out_ratio, "check_kept": f.kept, "check_kept_peft": f.kept_peft,
            "check_pass": f.passes}


def fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def where(row: dict[str, Any]) -> str:
    w = "" if row.get("weights", "normal") == "normal" else f" W {row['weights']}"
    return f"d={row['d']} N={row['n']} r={row['r']} rel={row['rel']:g}{w}"


Rows = list[dict[str, Any]]


def group(rows: Rows, *keys: str) -> dict[tuple[Any, ...], Rows]:
    out: dict[tuple[Any, ...], Rows] = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in keys), []).append(row)
    return out


TITLE = "Precision of 16-bit LoRA plans vs PEFT's own path (issue 11.3)"


def write_points(path: Path, rows: Rows) -> None:
    """The rows as CSV, one per site kind, variant and point."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: fmt(v) for k, v in r.items()} for r in rows)


def summary(rows: Rows, command: str, seconds: float, title: str = TITLE) -> str:
    lines = [
        f"# {title}", "",
        f"`{command}` — {len(rows)} rows, {seconds:.0f} s.", "",
        f"Rule per point: out_err ≤ {OUT_BOUND}× PEFT's, kept ≥ PEFT's − {KEPT_SLACK}, dx/dA/dB "
        f"err ≤ {GRAD_BOUND}× PEFT's (floor {FLOOR:g}). Worst = the largest ratio over the points, "
        "and where; for kept share, the point where Δ = kept − PEFT's kept (paired, ± 2 standard "
        "errors) is most surely negative. 'noise' = points failing only on kept share, by less "
        "than 2 standard errors.",
        "", "| kind | variant | W | passes | noise | out ratio | kept Δ ±2se | dx ratio "
        "| dA ratio | dB ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (kind, name, weights), rs in group(rows, "kind", "variant", "weights").items():
        if name == BASELINE:
            continue
        worst = {m: max(rs, key=lambda r, m=m: r[f"{m}_ratio"]) for m in METRICS if m != "kept"}
        ratio = {m: f"{w[m + '_ratio']:.3f} at {where(w)}" for m, w in worst.items()}
        w = min(rs, key=lambda r: r["kept_delta"] + 2 * r["kept_delta_se"])
        cells = [kind, name, weights, f"{sum(r['pass'] for r in rs)}/{len(rs)}",
                 str(sum(r["kept_fail_within_noise"] for r in rs)), ratio["out_err"],
                 f"{w['kept_delta']:+.3f} ±{2 * w['kept_delta_se']:.3f} at {where(w)}",
                 ratio["dx_err"], ratio["dA_err"], ratio["dB_err"]]
        lines.append("| " + " | ".join(cells) + " |")
    rels = sorted({r["rel"] for r in rows}, reverse=True)
    lines += ["", "By rel: PEFT's output error (peft rows) or the variant's worst ratio to it "
              "(others); mean kept share ± its standard error [the same for kept_cv, the "
              "lower-noise estimate from the adapter-disabled output].", "",
              "| kind | variant | W | " + " | ".join(f"rel {r:g}" for r in rels) + " |",
              "|---|---|---|" + "---|" * len(rels)]
    for (kind, name, weights), rs in group(rows, "kind", "variant", "weights").items():
        per = group(rs, "rel")
        cells = []
        for rel in rels:
            g = per.get((rel,), [])
            mean = lambda k: sum(r[k] for r in g) / len(g)  # noqa: E731
            se = lambda k: sum(r[k] ** 2 for r in g) ** 0.5 / len(g)  # noqa: E731
            out = (f"err {mean('out_err'):.2e}" if name == BASELINE
                   else f"×{max(r['out_err_ratio'] for r in g):.3f}")
            cells.append(f"{out} · {mean('kept'):.3f} ±{se('kept_se'):.3f} [{mean('kept_cv'):.3f}"
                         f" ±{se('kept_cv_se'):.3f}]" if g else "")
        lines.append(f"| {kind} | {name} | {weights} | " + " | ".join(cells) + " |")
    return "\n".join(lines + check_summary(rows)) + "\n"


def meets_check_rule(row: dict[str, Any]) -> bool:
    """The measured row judged by the rule the check applies: the rule above for nearest
    rounding; for stochastic rounding (the user's choice of unbiased rounding at some noise)
    output error ≤ 1.5× PEFT's and a kept share within 0.8–1.2 (± 2 standard errors), with
    the gradients' bound as above."""
    if not row["variant"].endswith("stochastic"):
        return bool(row["pass"] or row["kept_fail_within_noise"])
    from runlora_fx.ir.merge_check import OUT_BOUND as BOUNDS, STOCHASTIC_KEPT
    from runlora_fx.ir.rounding import Rounding

    low, high = STOCHASTIC_KEPT
    slack = 2 * row["kept_se"]
    grads = all(row[f"{m}_ratio"] <= GRAD_BOUND for m in ("dx_err", "dA_err", "dB_err"))
    return (grads and row["out_err_ratio"] <= BOUNDS[Rounding.STOCHASTIC]
            and low - slack <= row["kept"] <= high + slack)


def check_summary(rows: Rows) -> list[str]:
    """runlora's merge check (its estimate from W alone, at each point's rel) against the full
    measurement: where they agree, and every point where they do not."""
    checked = [r for r in rows if r.get("check_pass", "") != ""]
    if not checked:
        return []
    lines = [
        "", "## The merge check against the full measurement", "",
        "The check (runlora_fx/merge_check.py) estimates, from the stored W alone, the merged "
        "plan's output error ratio and kept share and PEFT's kept share; here at each point's "
        "rel. 'measured' = the check's rule applied to the full measurement: for nearest "
        "rounding the rule above (a miss within 2 standard errors of the kept-share slack "
        "counts as a pass), for stochastic rounding output error ≤ 1.5× PEFT's and kept share "
        "within 0.8–1.2 (± 2 standard errors); 'stricter' = the check refuses where the "
        "measurement passes, 'more lenient' = the reverse. Δ = kept − PEFT's kept.", "",
        "| kind | variant | W | points | measured pass | check pass | agree | stricter "
        "| more lenient | Δ measured (mean) | Δ check (mean) "
        "| out ratio measured / check (worst) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    apart = []
    for (kind, name, weights), rs in group(checked, "kind", "variant", "weights").items():
        measured = [meets_check_rule(r) for r in rs]
        check = [bool(r["check_pass"]) for r in rs]
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        cells = [kind, name, weights, len(rs), sum(measured), sum(check),
                 sum(a == b for a, b in zip(measured, check)),
                 sum(b and not a for a, b in zip(check, measured)),
                 sum(a and not b for a, b in zip(check, measured)),
                 f"{mean([r['kept_delta'] for r in rs]):+.3f}",
                 f"{mean([r['check_kept'] - r['check_kept_peft'] for r in rs]):+.3f}",
                 f"{max(r['out_err_ratio'] for r in rs):.3f} / "
                 f"{max(r['check_out_ratio'] for r in rs):.3f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
        apart += [(r, m) for r, m, c in zip(rs, measured, check) if m != c]
    if apart:
        lines += ["", "Points where they disagree (measured: out ratio, kept Δ ±2se; check: out "
                  "ratio, kept Δ):", ""]
        lines += [f"- {r['kind']} {r['variant']} {where(r)}: measured "
                  f"{'pass' if m else 'fail'} ({r['out_err_ratio']:.3f}, "
                  f"{r['kept_delta']:+.3f} ±{2 * r['kept_delta_se']:.3f}); check "
                  f"{'refuses' if m else 'passes'} ({r['check_out_ratio']:.3f}, "
                  f"{r['check_kept'] - r['check_kept_peft']:+.3f})" for r, m in apart]
    else:
        lines += ["", "They agree at every point."]
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--variants", nargs="+", default=None, help="default: all (peft always runs)")
    ap.add_argument("--d", nargs="+", type=int, default=[64, 256, 1024, 4096])
    ap.add_argument("--n", nargs="+", type=int, default=[256, 4096])
    ap.add_argument("--r", nargs="+", type=int, default=[4, 16, 64, 256])
    ap.add_argument("--rel", nargs="+", type=float, default=[1e-2, 1e-3, 1e-4, 1e-5])
    ap.add_argument("--max_nd2", type=float, default=2.0**28, help="skip N·d² above (min N kept)")
    ap.add_argument("--points", nargs="+", default=None, metavar="D:N:R:REL",
                    help="instead of the product above: e.g. 256:4096:4,64:1e-3,1e-5 (comma lists)")
    ap.add_argument("--weights", nargs="+", default=["normal"], choices=list(WEIGHTS),
                    help="W's distribution(s): every point is run with each")
    ap.add_argument("--scale", type=float, default=2.0, help="s = alpha/r (use a power of two)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plugin", nargs="*", default=[], help="modules whose VARIANTS are added")
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args(argv)
    sys.modules.setdefault("precision_exp", sys.modules[__name__])  # one registry for plugins
    for module in args.plugin:
        VARIANTS.update(importlib.import_module(module).VARIANTS)
    names = [BASELINE] + [v for v in (args.variants or VARIANTS) if v != BASELINE]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}")
    kinds = [KINDS[k] for k in args.kinds]
    points = ([p for spec in args.points for p in parse_points(spec)] if args.points
              else grid(args.d, args.n, args.r, args.rel, args.max_nd2))
    points = [replace(p, weights=w) for w in args.weights for p in points]
    args.out.mkdir(parents=True, exist_ok=True)
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "experiments/precision_exp.py", *argv])
    rows: Rows = []
    start = time.perf_counter()
    for i, p in enumerate(points):
        rows += run_point(p, kinds, names, args.scale, args.seed)
        bad = [f"{r['kind']}/{r['variant']}" for r in rows[-len(kinds) * len(names):]
               if not r["pass"]]
        print(f"[{i + 1}/{len(points)} {time.perf_counter() - start:6.0f}s] {where(rows[-1])}"
              f" fails: {' '.join(bad) or '-'}", flush=True)
        write_points(args.out / "precision_points.csv", rows)  # each point: a cut run keeps its rows
    text = summary(rows, command, time.perf_counter() - start)
    (args.out / "precision_summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
