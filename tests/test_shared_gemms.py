"""Plans that share GEMMs — a site's x·[W; A]ᵀ and dy·[W | s·B], a group's x·[A_q; A_k; A_v]ᵀ
and [dh_q | dh_k | dh_v]ᵀ·x, stacked W's — checked on what really runs: the GEMMs of the
partitioned graphs are exactly plain torch.compile's, less the PEFT order's and plus the chosen
programs', and every grad matches eager."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

import runlora_fx
from conftest import PlainCompile, assert_grads_match, load_script, peft_llama, rel_err, twin
from runlora_fx.cost.partitioned import graph_flops
from runlora_fx.ir.plans import reference_plan
from runlora_fx.cost.cost import cost_of
from runlora_fx.ir.program import metas_of, program_for

BATCH, SEQ = 2, 40
MM = (torch.ops.aten.mm.default,)


def gemms(report) -> Counter:
    """Output shapes of the matmuls in the partitioned graphs, up to orientation."""
    found: Counter = Counter()
    for gm in (report.forward, report.backward):
        for node in gm.graph.nodes:
            if node.target in MM:
                found[tuple(sorted(node.meta["val"].shape))] += 1
    return found


def program_gemms(plan, unit) -> Counter:
    program = program_for(plan, unit)
    metas = metas_of(program, unit)
    return Counter(
        tuple(sorted(metas[s.out][0])) for s in (*program.forward, *program.backward)
        if s.op == "mm"
    )


def step(model, ids, backend=None):
    run = torch.compile(model, backend=backend) if backend is not None else model
    out = run(input_ids=ids, labels=ids)
    out.loss.backward()
    return out


def test_group_plans_run_the_gemms_they_say_and_match_eager():
    eager = peft_llama(layers=1)
    ours, plain = twin(eager), twin(eager)
    ids = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    backend, plain_backend = runlora_fx.Backend({"inner": "eager"}), PlainCompile()
    expected = step(eager, ids)
    got = step(ours, ids, backend)
    step(plain, ids, plain_backend)
    assert rel_err(got.loss, expected.loss) <= 1e-5 and rel_err(got.logits, expected.logits) <= 1e-5
    assert_grads_match(eager, ours, 1e-5)

    [report], [plain_report] = backend.reports, plain_backend.reports
    assert report.sites_rewritten == 7 and not report.skipped
    groups = [d for d in report.decisions if len(d.sites) > 1]
    paths = sorted(tuple(s.path.rsplit(".", 1)[-1] for s in d.sites) for d in groups)
    assert paths == [("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj")]
    assert all(d.chosen.plan.groups_members for d in groups)

    assert gemms(report) == expected_gemms(report, plain_report)
    n, r = BATCH * SEQ, 4
    qkv = next(d for d in groups if len(d.sites) == 3)
    if qkv.chosen.plan.group_h:  # one GEMM makes the three h's (N × 3r), alone or with the W's
        widths = {w for shape in gemms(report) for w in shape if n in shape}
        assert any(w >= 3 * r and w % r == 0 for w in widths - {n})

    saving = sum(
        program_flops(reference_plan(d.unit), d.unit) - program_flops(d.chosen.plan, d.unit)
        for d in report.decisions
    )
    flops = graph_flops(report.forward) + graph_flops(report.backward)
    plain_flops = graph_flops(plain_report.forward) + graph_flops(plain_report.backward)
    assert plain_flops - flops == saving


def expected_gemms(report, plain_report) -> Counter:
    """Plain compile's GEMMs, the PEFT order's taken out and the chosen programs' put in."""
    found = gemms(plain_report)
    for d in report.decisions:
        found.subtract(program_gemms(reference_plan(d.unit), d.unit))
        found.update(program_gemms(d.chosen.plan, d.unit))
    return +found


def program_flops(plan, unit) -> int:
    return cost_of(plan, unit).flops


@pytest.mark.parametrize("fold", ["fold_x", "fold_dy"])
def test_a_folded_site_runs_one_gemm_for_two(fold):
    """x·[W;A]ᵀ: the forward's N×(d_out + r) GEMM replaces N×d_out and N×r ones;
    dy·[W|sB]: the backward's N×(d_in + r) one replaces N×d_in and N×r ones."""
    eager = peft_llama(layers=1, target_modules=["o_proj", "down_proj"])  # no two read one x
    ours, plain = twin(eager), twin(eager)
    ids = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    backend = runlora_fx.Backend({"inner": "eager"})
    plain_backend = PlainCompile()
    expected = step(eager, ids)
    got = step(ours, ids, backend)
    step(plain, ids, plain_backend)
    assert rel_err(got.loss, expected.loss) <= 1e-5
    assert_grads_match(eager, ours, 1e-5)
    [report], [plain_report] = backend.reports, plain_backend.reports
    folded = [d for d in report.decisions if getattr(d.chosen.plan, fold)]
    assert folded, [d.chosen.plan.describe() for d in report.decisions]
    shapes = gemms(report)
    assert shapes == expected_gemms(report, plain_report)
    n, r = BATCH * SEQ, 4
    for d in folded:
        width = (d.site.d_out if fold == "fold_x" else d.site.d_in) + r
        assert shapes[tuple(sorted((n, width)))] >= 1


def kept_storage_bytes(run, model) -> int:
    """What the benchmark reports as activations kept: the storages saved for the backward, each
    once, weights excluded — a saved view keeps its whole storage alive, which a list of saved
    shapes hides."""
    bench_lib = load_script(Path(__file__).resolve().parents[1] / "experiments" / "bench_lib.py",
                            "bench_lib")
    return bench_lib.saved_activation_bytes(run, bench_lib.state_storages(model))


def test_a_group_keeps_no_more_storage_than_plain_compile():
    """q/k/v merged and stacked into one GEMM in fp32: v goes into attention, which saves it;
    a slice of the group's result would keep q's and k's columns (pre-rotary) alive with it."""
    ours = peft_llama(layers=1, hidden=64)
    ours.config.use_cache = False  # as in training: k and v are not copied into a cache
    plain = twin(ours)
    ids = torch.randint(0, 128, (4, 256), generator=torch.Generator().manual_seed(0))
    backend, plain_backend = runlora_fx.Backend({"inner": "eager", "criterion": "flops"}), PlainCompile()
    step(ours, ids, backend)  # compile
    step(plain, ids, plain_backend)
    decisions = [d for r in backend.reports for d in r.decisions]
    assert any(d.chosen.plan.stack_w and d.chosen.plan.merges for d in decisions)
    ours_kept = kept_storage_bytes(lambda: step(ours, ids, backend), ours)
    plain_kept = kept_storage_bytes(lambda: step(plain, ids, plain_backend), plain)
    assert ours_kept <= plain_kept
