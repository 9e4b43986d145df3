"""The merge check: at one 16-bit site, is `x·round(W + s·BA)ᵀ` as precise as PEFT's own path,
judged from that site's own frozen W (docs/precision.md, "The merge check").

Rounding `W + s·BA` to a 16-bit grid loses an update element below half an ulp of its W
element; PEFT's path loses an effect below half an ulp of the output. Which loses more depends
on how W's magnitudes are spread compared with the output's: a normal W (transformers' init,
and trained weights, whose tails are heavier still) loses no more than PEFT; a uniform W
(`nn.Linear`'s init) loses up to 0.15 more of a small update. W is frozen in LoRA, so the
check reads it once, at compile time.

What it runs, on a sample of the site (`Sample`; rows and columns of W drawn by a fixed-seed
generator, so a verdict is reproducible): x ~ N(0, 1) stored in x's dtype, and `updates` random
updates E = B·A of the site's rank (A ~ U(±1/√d_in) as PEFT initialises lora_A, B ~ N(0, 1)),
each scaled so that mean|E| = rel·mean|W|, at every rel of `RELS`. PEFT's path runs as the
site runs it (the base product rounded to its dtype, the LoRA products in theirs, the sum
rounded to the result's dtype); the merged path rounds W + E (summed in fp32) as the plan
would, then its product. Truth is fp32 from the stored values. Figures per rel:

- `out_ratio`: the merged output's error against the truth over PEFT's (‖·‖ over the sample);
- `kept_peft`: PEFT's kept share of the effect e = x·Eᵀ, ⟨y − round(x·Wᵀ), e⟩ / ⟨e, e⟩;
- `kept`: the merged path's, ⟨round(W + E) − W, E⟩ / ⟨E, E⟩: the same share averaged over x
  (the merged output's own rounding is dithered by the base's low bits, so it is unbiased; only
  W_eff's rounding loses the update), which needs no output sample and has far less noise.

The rule is the measured one's (docs/precision.md, "The measured rule for 16-bit plans"):
nearest rounding passes at a rel when out_ratio ≤ 1.25 and kept ≥ kept_peft − 0.05; stochastic
rounding (the user's choice of unbiased rounding at the cost of noise) when out_ratio ≤ 1.5 and
0.8 ≤ kept ≤ 1.2. A site passes when every rel passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from runlora_fx.ir.rounding import Rounding, stochastic_round
from runlora_fx.ir.site import LoraSite, WeightLayout

F32 = torch.float32
RELS = (1e-3, 1e-4)  # s·BA relative to W: where the grid found nearest rounding worst
OUT_BOUND = {Rounding.NEAREST: 1.25, Rounding.STOCHASTIC: 1.5}
KEPT_SLACK = 0.05  # nearest: kept ≥ PEFT's − this
STOCHASTIC_KEPT = (0.8, 1.2)
MAX_RANK = 64  # above it an update's elements are as good as normal: the cost stays bounded
SEED = 0


@dataclass(frozen=True)
class Sample:
    """How much of a site the check runs: a 4096×4096 W costs a few ms on one CPU core.

    Each kept share averages over at least `draws` random values (weight elements × updates for
    the merged path's, outputs × updates for PEFT's), however small W is: its noise is then
    ~0.005 (one standard deviation). The output errors, far less noisy, use `updates` updates."""

    rows: int = 256  # of W's output rows
    cols: int = 256  # of W's input columns
    inputs: int = 128  # rows of x
    updates: int = 2  # random updates E per size for the output errors
    draws: int = 1 << 18
    max_updates: int = 256

    def updates_for(self, values: int) -> int:
        """Updates that make `values` per update at least `draws` in all."""
        return max(self.updates, min(-(-self.draws // values), self.max_updates))


@dataclass(frozen=True)
class Figures:
    """The check at one size of update (rel = mean|s·BA| / mean|W|)."""

    rel: float
    out_ratio: float  # merged output error / PEFT's
    kept: float  # the merged path's kept share of the update's effect
    kept_peft: float  # PEFT's path's
    passes: bool

    def describe(self) -> str:
        delta = self.kept - self.kept_peft
        return (f"at s·BA/W {self.rel:g}: output error {self.out_ratio:.3f}× PEFT's, kept share "
                f"{self.kept:.3f} vs PEFT's {self.kept_peft:.3f} (Δ {delta:+.3f})")


@dataclass(frozen=True)
class MergeCheck:
    """A site's verdict on merged plans with one rounding, from its own W.

    Equality and hashing are the verdict's (rounding, legal): that is all a plan's legality
    reads, so sites with equal verdicts share the chooser's caches; the figures ride along."""

    rounding: str  # Rounding.value the check ran for
    legal: bool
    figures: tuple[Figures, ...] = field(default=(), compare=False)
    reason: str = field(default="", compare=False)  # why it refuses (figures, or why not run)
    sample: str = field(default="", compare=False)  # what of W it read

    def refusal(self, rounding: Rounding) -> str | None:
        """Why a plan merging with `rounding` is not legal at the site, or None."""
        if rounding.value != self.rounding:
            return f"the merge check of its W ran for merge_rounding={self.rounding!r}"
        return None if self.legal else self.reason

    def describe(self) -> str:
        verdict = "passes" if self.legal else "refuses"
        figures = "; ".join(f.describe() for f in self.figures)
        return f"merge check ({self.rounding}) {verdict}" + (f": {figures}" if figures else
                                                             f": {self.reason}")


def not_run(rounding: Rounding, why: str) -> MergeCheck:
    """A site whose W the check could not read: merging stays illegal there."""
    return MergeCheck(rounding.value, False, reason=f"the merge check did not run: {why}")


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(F32)


def _judge(rounding: Rounding, out_ratio: float, kept: float, kept_peft: float) -> bool:
    if not all(math.isfinite(v) for v in (out_ratio, kept, kept_peft)):
        return False
    if out_ratio > OUT_BOUND[rounding]:
        return False
    if rounding is Rounding.STOCHASTIC:
        return STOCHASTIC_KEPT[0] <= kept <= STOCHASTIC_KEPT[1]
    return kept >= kept_peft - KEPT_SLACK


def weight_out_in(site: LoraSite, weight: torch.Tensor) -> torch.Tensor:
    """W as d_out×d_in, whatever layout the site stores it in."""
    return weight.t() if site.weight_layout is WeightLayout.IN_OUT else weight


def _subsample(weight: torch.Tensor, sample: Sample, gen: torch.Generator) -> torch.Tensor:
    d_out, d_in = weight.shape
    rows = torch.randperm(d_out, generator=gen)[: sample.rows].to(weight.device)
    cols = torch.randperm(d_in, generator=gen)[: sample.cols].to(weight.device)
    return weight.detach().index_select(0, rows).index_select(1, cols).to("cpu", F32)


def estimate(
    weight: torch.Tensor,
    site: LoraSite,
    rounding: Rounding,
    rels: tuple[float, ...] = RELS,
    sample: Sample = Sample(),
) -> tuple[Figures, ...]:
    """The check's figures for `weight` (d_out×d_in, as stored) at `site`'s dtypes; ValueError
    when its sample has no finite nonzero element (no size of update to scale to)."""
    gen = torch.Generator().manual_seed(SEED)
    w = _subsample(weight, sample, gen)
    m, k = w.shape
    rank = max(1, min(sum(a.r for a in site.adapters), MAX_RANK, m, k))
    base, lora, result = site.base_dtype, site.lora_dtype, site.result_dtype
    adapter = site.adapter_dtype
    x = _round(torch.randn(sample.inputs, k, generator=gen), site.dtype)
    b = x @ w.T
    y0 = _round(b, base)  # PEFT's base product, on the base dtype's grid
    w_mean = w.abs().mean()
    if not (torch.isfinite(w_mean) and w_mean > 0):
        raise ValueError("W's sample has no finite nonzero element")
    q_w, q_o, q_e = sample.updates_for(m * k), sample.updates_for(len(x) * m), sample.updates
    q = max(q_w, q_o)
    a_draw = (torch.rand(q, rank, k, generator=gen) * 2 - 1) / math.sqrt(weight.shape[1])
    b_draw = torch.randn(q, m, rank, generator=gen)
    unit = b_draw[:q_w] @ a_draw[:q_w]
    scale = 1 / unit.abs().mean()  # one scale for all draws: mean|E| = rel·mean|W| on average
    sums = {}
    for rel in rels:
        c = scale * rel * w_mean
        a_, b_ = _round(a_draw, adapter), _round(b_draw * c, adapter)
        # PEFT's path, over q_o updates
        effect = (x @ a_[:q_o].mT) @ b_[:q_o].mT  # q_o × n × m, in fp32: the truth's effect
        if lora.itemsize < 4:  # the LoRA products in 16 bits, each rounded
            branch = _round(_round(_round(x, lora) @ a_[:q_o].mT, lora) @ b_[:q_o].mT, lora)
        else:
            branch = effect
        y_peft = _round(y0 + branch, result)
        # the merged path's W_eff, over q_w updates
        update = unit * c if adapter.itemsize >= 4 else b_[:q_w] @ a_[:q_w]  # q_w × m × k
        summed = w + update
        if rounding is Rounding.STOCHASTIC:
            w_eff = stochastic_round(summed, base, gen).to(F32)
        else:
            w_eff = _round(summed, base)
        # both outputs against the truth, over the first q_e updates
        y_merged = _round(_round(x @ w_eff[:q_e].mT, base), result)
        truth = b + effect[:q_e]
        sums[rel] = torch.stack([
            ((y_peft - y0) * effect).sum(), (effect * effect).sum(),
            ((w_eff - w) * update).sum(), (update * update).sum(),
            (y_peft[:q_e] - truth).square().sum(), (y_merged - truth).square().sum(),
        ]).double()
    figures = []
    for rel, s in sums.items():
        kept_peft, kept = (s[0] / s[1]).item(), (s[2] / s[3]).item()
        out_ratio = (s[5] / s[4]).sqrt().item() if s[4] > 0 else math.inf
        figures.append(Figures(rel, out_ratio, kept, kept_peft,
                               _judge(rounding, out_ratio, kept, kept_peft)))
    return tuple(figures)


def check_site(
    site: LoraSite, weight: torch.Tensor, rounding: Rounding, sample: Sample = Sample()
) -> MergeCheck:
    """The verdict on merging at `site` with `rounding`, read from its real W (as stored)."""
    if isinstance(weight, torch._subclasses.FakeTensor) or weight.is_meta:
        return not_run(rounding, "W is a fake tensor (no values to read)")
    w = weight_out_in(site, weight)
    if tuple(w.shape) != (site.d_out, site.d_in):
        return not_run(rounding, f"W{tuple(weight.shape)} does not fit the site")
    try:
        figures = estimate(w, site, rounding, sample=sample)
    except ValueError as why:
        return not_run(rounding, str(why))
    m, k = min(sample.rows, site.d_out), min(sample.cols, site.d_in)
    read = (f"{m} of {site.d_out} rows × {k} of {site.d_in} columns of W, {sample.inputs} rows "
            f"of x, {max(sample.updates_for(m * k), sample.updates_for(sample.inputs * m))} random "
            "updates per size")
    legal = all(f.passes for f in figures)
    failed = [f for f in figures if not f.passes]
    bound = (f"output error ≤ {OUT_BOUND[rounding]}× PEFT's and kept share "
             + (f"in {STOCHASTIC_KEPT[0]}–{STOCHASTIC_KEPT[1]}" if rounding is Rounding.STOCHASTIC
                else f"≥ PEFT's − {KEPT_SLACK}"))
    reason = "" if legal else (
        f"the merge check of its frozen W refuses ({bound}): "
        + "; ".join(f.describe() for f in failed))
    return MergeCheck(rounding.value, legal, figures, reason, read)
