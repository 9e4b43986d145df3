"""Precision of 16-bit plans: how a merged W_eff is rounded, and the measured legality rule.

In 16 bits no reordering is bit-exact, so "equivalent" means "no worse than PEFT's own path":
a plan is legal for a site when, on that site's kind (below), it keeps the output error vs an
fp64 truth within 1.25× PEFT's, the kept share of the true adapter effect within 0.05 of
PEFT's, and each of dx, dA, dB within 2× PEFT's error (docs/precision.md, "Measuring a
plan's precision"). Which plan features meet
that was measured by experiments/precision_exp.py over a grid of shapes, ranks and update
sizes (experiments/results/precision_cpu/precision_summary.md); `RULE` is that table, and
tests/test_precision.py re-measures it at the grid's corners.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from runlora_fx.ir.rounding import Rounding
from runlora_fx.ir.site import LoraSite


class Precision(enum.Enum):
    """The dtype the LoRA products run in, where the site runs them in another than its base
    product (PEFT on a 16-bit model keeps A, B in fp32 and casts the branch input up)."""

    SITE = "LoRA in its own dtype"  # as the site runs it: PEFT's order of roundings
    BASE = "LoRA in the base dtype"  # A, B, D(x) rounded to the base product's dtype


def kind(site: LoraSite) -> str | None:
    """The site's precision kind, as precision_exp.py names it; None in 32 bits or more."""
    if not site.is_low_precision:
        return None
    low = "bf16" if site.base_dtype == torch.bfloat16 else "fp16"
    if site.lora_dtype != site.base_dtype:
        return f"{low}-peft"  # base in 16 bits, LoRA products in the adapters' fp32
    if site.dtype.itemsize >= 4 or site.adapter_dtype.itemsize >= 4:
        # 32-bit storage, products in autocast's dtype (CPU autocast: bf16)
        return "autocast" if low == "bf16" else f"autocast-{low}"
    return low


@dataclass(frozen=True)
class Verdict:
    legal: bool
    evidence: str  # the worst measured figure, for the reason text


# (kind, feature) → verdict, from experiments/results/precision_cpu/: precision_summary.md (50
# points per kind: d 64…4096, N 64…4096, r 4…256, s·BA/W 1e-2…1e-5, W ~ normal) and
# uniform_weights/ (24 points, W ~ U(±1/√d), nn.Linear's own init). Features:
# "merged-nearest", "merged-stochastic" (W_eff rounded so), "branch-base" (the LoRA products
# in the base dtype where PEFT runs them in fp32). Missing entries are illegal (not measured).
# Rounding W + s·BA to nearest loses an update where |s·BA| < ulp(W)/2, and a uniform W has
# fewer small elements (small ulps) than a normal one: there it keeps up to 0.15 less of the
# adapter's effect than PEFT's output rounding does. Under autocast W is fp32, off the 16-bit
# grid, so rounding W + s·BA is as good as dithered and merging beats PEFT.
_NEAREST = ("kept share down to PEFT's − {} with a uniform W (nn.Linear's init; −0.054 ± 0.021 "
            "with a normal W), beyond the 0.05 slack; output error ≤ 1.03×")
_STOCHASTIC_OUT = "output error up to {}× PEFT's (bound 1.25×: any unbiased rounding adds " \
    "p(1−p)·ulp² per weight where nearest leaves W as it is)"
_BRANCH = "dA, dB errors {}× PEFT's: its fp32 branch gets them to ~1e-7, 16 bits to ~1e-3"
# "sparse-dropout": D(x)·Aᵀ as (x·Aᵀ − S·Aᵀ)/q with the corrections in fp32 (dropout.py),
# against PEFT's dense mask with the same mask: experiments/dropout_precision_exp.py,
# results/dropout_precision_cpu (32 points per kind, p 0.05 and 0.1, d 64…1024, r 4…64).
_SPARSE = ("every point within the rule: output error ≤ {}× PEFT's, kept share ≥ PEFT's − "
           "0.000, dA, dB ≤ {}× PEFT's")
RULE: dict[tuple[str, str], Verdict] = {
    ("bf16", "merged-nearest"): Verdict(False, _NEAREST.format("0.151 ± 0.035")),
    ("fp16", "merged-nearest"): Verdict(False, _NEAREST.format("0.162 ± 0.028")),
    ("bf16-peft", "merged-nearest"): Verdict(False, _NEAREST.format("0.154 ± 0.034")),
    ("fp16-peft", "merged-nearest"): Verdict(False, _NEAREST.format("0.162 ± 0.028")),
    ("autocast", "merged-nearest"): Verdict(True, "output error ≤ 1.004× PEFT's, kept share "
                                                  "≥ PEFT's − 0.005 ± 0.006"),
    ("bf16", "merged-stochastic"): Verdict(False, _STOCHASTIC_OUT.format(1.295)),
    ("fp16", "merged-stochastic"): Verdict(False, _STOCHASTIC_OUT.format(1.274)),
    ("bf16-peft", "merged-stochastic"): Verdict(False, _STOCHASTIC_OUT.format(1.295)),
    ("fp16-peft", "merged-stochastic"): Verdict(False, _STOCHASTIC_OUT.format(1.274)),
    ("autocast", "merged-stochastic"): Verdict(True, "output error ≤ 1.183× PEFT's, kept "
                                                     "share within the slack"),
    ("bf16-peft", "branch-base"): Verdict(False, _BRANCH.format("up to 12099")),
    ("bf16", "sparse-dropout"): Verdict(True, _SPARSE.format(1.000, 1.095)),
    ("fp16", "sparse-dropout"): Verdict(True, _SPARSE.format(1.001, 1.157)),
    ("bf16-peft", "sparse-dropout"): Verdict(True, _SPARSE.format(1.000, 1.237)),
    ("fp16-peft", "sparse-dropout"): Verdict(True, _SPARSE.format(1.000, 1.166)),
    ("autocast", "sparse-dropout"): Verdict(True, _SPARSE.format(1.000, 1.189)),
    ("fp16-peft", "branch-base"): Verdict(False, _BRANCH.format("up to 49327")),
}


# Kinds whose merged verdict depends on W (its spread against the output's, above): where the
# backend read the site's W (site.merge_check, merge_check.py), that check decides merging
# there; RULE's verdict stands for sites that were not checked. Under autocast W is fp32, off
# the 16-bit grid, and the measured verdict holds for any W.
CHECKED_KINDS = ("bf16", "fp16", "bf16-peft", "fp16-peft")


def feature_names(merges: bool, rounding: Rounding | None, branch: Precision | None,
                  sparse_dropout: bool = False) -> list[str]:
    found = []
    if merges and rounding is not None:
        found.append(f"merged-{rounding.value}")
    if branch is Precision.BASE:
        found.append("branch-base")
    if sparse_dropout:
        found.append("sparse-dropout")
    return found


def precision_reason(
    site: LoraSite, merges: bool, rounding: Rounding | None, branch: Precision | None,
    sparse_dropout: bool = False,
) -> str | None:
    """Why a plan with these features is not legal at `site` by the measured rule, or None."""
    site_kind = kind(site)
    if site_kind is None:
        return None
    if sparse_dropout and all(a.reads_base_input for a in site.adapters):
        sparse_dropout = False  # this member has no dropout branch: nothing is corrected
    for feature in feature_names(merges, rounding, branch, sparse_dropout):
        if feature.startswith("merged-") and site_kind in CHECKED_KINDS \
                and site.merge_check is not None and rounding is not None:
            refusal = site.merge_check.refusal(rounding)
            if refusal is not None:
                return f"{feature} on a {site_kind} site: {refusal}"
            continue  # the site's own W passed: the check decides, not the grid's worst W
        verdict = RULE.get((site_kind, feature))
        if verdict is None:
            return f"{feature} on a {site_kind} site was not measured (precision_exp.py)"
        if not verdict.legal:
            return f"{feature} on a {site_kind} site is worse than PEFT's own path: {verdict.evidence}"
    return None
