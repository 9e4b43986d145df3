"""The measured precision rule for 16-bit plans (runlora_fx/precision.py), re-measured at the
corners of experiments/precision_exp.py's grid with the programs the rewritten graph runs
(experiments/precision_plans.py): every feature the rule makes legal meets it at every corner,
and every feature it makes illegal misses it at one corner at least, beyond measurement noise.

d = 1024 and 4096 live in the committed grid (experiments/results/precision_cpu): 16-bit GEMMs are
emulated on this CPU, so the test's corners are d = 64 with N = 4096 (the statistics of a large
layer), W normal at r 4 and 64 over four decades of update size, and W uniform (nn.Linear's own
init) where the grid found merging keeps least of the adapter's effect.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import load_script
from runlora_fx.ir.precision import RULE, Precision, kind, precision_reason
from runlora_fx.ir.rounding import Rounding
from runlora_fx.ir.site import Adapter, LoraSite

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))  # precision_plans imports as precision_exp's plugin
exp = load_script(EXPERIMENTS / "precision_exp.py", "precision_exp")
plans = load_script(EXPERIMENTS / "precision_plans.py", "precision_plans")

pytestmark = pytest.mark.rounding  # `make test` runs these again on the AVX2 code paths

FEATURES = {
    "merged-nearest": "runlora:merged-nearest",
    "merged-stochastic": "runlora:merged-stochastic",
    "branch-base": "runlora:branch-base",
}
CORNERS = [exp.Point(64, 4096, r, rel) for r in (4, 64) for rel in (1e-2, 1e-3, 1e-4, 1e-5)]
CORNERS += [exp.Point(64, 4096, 4, rel, "uniform") for rel in (1e-3, 1e-4)]


def verdicts(points, kinds) -> dict[tuple[str, str], list[dict]]:
    """(kind, feature) → the rule's judgement at each point, from a real measurement."""
    exp.VARIANTS.update(plans.VARIANTS)
    names = ["peft", *FEATURES.values()]
    found: dict[tuple[str, str], list[dict]] = {}
    for point in points:
        for row in exp.run_point(point, [exp.KINDS[k] for k in kinds], names, 2.0, 0):
            feature = next((f for f, v in FEATURES.items() if v == row["variant"]), None)
            if feature is not None:
                found.setdefault((row["kind"], feature), []).append(row)
    return found


def meets(row: dict) -> bool:
    return row["pass"] or row["kept_fail_within_noise"]


@pytest.fixture(scope="module")
def corners():
    return verdicts(CORNERS, list(exp.KINDS))


@pytest.mark.parametrize("entry", sorted(e for e in RULE if e[1] in FEATURES),
                         ids=lambda e: f"{e[0]}-{e[1]}")
def test_the_rule_holds_at_the_grid_corners(corners, entry):
    rows = corners[entry]
    assert len(rows) == len(CORNERS)
    if RULE[entry].legal:
        assert all(meets(r) for r in rows), [(r["d"], r["r"], r["rel"], r["fails"]) for r in rows]
    else:
        assert not all(meets(r) for r in rows)


def test_sparse_dropout_meets_the_rule_where_it_is_legal():
    """RULE's sparse-dropout rows (experiments/dropout_precision_exp.py) at the corners: the
    program with sparse dropout against PEFT's dense path with the same mask."""
    dropout_exp = load_script(EXPERIMENTS / "dropout_precision_exp.py", "dropout_precision_exp")
    kinds = [exp.KINDS[k] for k, feature in RULE if feature == "sparse-dropout"]
    assert kinds and all(RULE[(k.name, "sparse-dropout")].legal for k in kinds)
    for point in (exp.Point(64, 4096, 4, 1e-3), exp.Point(64, 4096, 16, 1e-4)):
        for p in (0.05, 0.1):
            for row in dropout_exp.run_point(point, p, kinds, 2.0, 0):
                if row["variant"] == "sparse-split":
                    assert meets(row), (row["kind"], p, row["fails"])


def test_split_programs_are_pefts_own_path():
    """runlora's PEFT-order program in the site's dtypes computes what PEFT computes: its
    output, dA and dB errors are PEFT's, and dx's no larger (under autocast runlora's dx is
    the more precise: 0.82–0.95× PEFT's on the AVX2 path). Each figure is an error norm over
    a 4096×64 output or a 4×64 grad, so a ratio of them is steady across CPUs; dB is where a
    plan that rounds h to 16 bits (PEFT keeps it in fp32) shows, by 200–1200×."""
    exp.VARIANTS.update(plans.VARIANTS)
    for row in exp.run_point(CORNERS[1], list(exp.KINDS.values()),
                             ["peft", "runlora:split"], 2.0, 0):
        if row["variant"] == "runlora:split":
            assert row["out_err_ratio"] == pytest.approx(1.0, abs=1e-3), row["kind"]
            assert row["dA_err_ratio"] == pytest.approx(1.0, abs=1e-2), row["kind"]
            assert row["dB_err_ratio"] == pytest.approx(1.0, abs=1e-2), row["kind"]
            assert row["dx_err_ratio"] <= 1.0 + 1e-2, row["kind"]


def _site(**dtypes) -> LoraSite:
    return LoraSite("s", 4096, 64, 64, (Adapter(4, 0.0, 1.0, True, True),), torch.bfloat16,
                    False, False, True, True, **dtypes)


def test_kinds_and_reasons():
    peft_default = _site(adapter_dtype=torch.float32, lora_dtype=torch.float32,
                         result_dtype=torch.bfloat16)
    autocast = LoraSite("s", 4096, 64, 64, (Adapter(4, 0.0, 1.0, True, True),), torch.float32,
                        False, False, True, True, base_dtype=torch.bfloat16)
    assert (kind(_site()), kind(peft_default), kind(autocast)) == ("bf16", "bf16-peft", "autocast")
    assert "uniform W" in precision_reason(_site(), True, Rounding.NEAREST, None)
    assert "1.295" in precision_reason(peft_default, True, Rounding.STOCHASTIC, Precision.SITE)
    assert precision_reason(autocast, True, Rounding.NEAREST, None) is None
    assert precision_reason(autocast, True, Rounding.STOCHASTIC, None) is None
    assert "dA, dB" in precision_reason(peft_default, False, None, Precision.BASE)
