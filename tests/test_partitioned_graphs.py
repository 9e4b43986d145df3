"""The plans' claims, checked on what really runs: the partitioned aten graphs."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

import runlora_fx
from conftest import PlainCompile, peft_llama, twin
from runlora_fx.cost.cost import cost_of
from runlora_fx.ir.plans import Forward, Hidden, InputGrad, reference_plan
from runlora_fx.cost.partitioned import graph_flops, saved_activation_bytes, saved_tensors

BATCH, SEQ = 2, 40  # N = 80 tokens > d/2: merging is cheaper
# the flops criterion without GEMM sharing: its picks here are the plans these tests check
OPTIONS = {"inner": "eager", "fusions": False, "criterion": "flops"}


def llama_step(model, ids):
    model(input_ids=ids, labels=ids).loss.backward()


def compiled_step(backend, model, ids):
    llama_step(torch.compile(model, backend=backend), ids)
    [report] = backend.reports
    assert report.forward is not None and report.backward is not None
    return report


def test_saved_set_follows_the_chosen_plans():
    model = peft_llama(layers=2)
    ids = torch.randint(0, 128, (BATCH, SEQ))
    report = compiled_step(runlora_fx.Backend(OPTIONS), model, ids)
    assert len(report.decisions) == 14 and not report.skipped
    saved = [t for t in saved_tensors(report.forward, report.backward, report.parameter_inputs)
             if not t.is_parameter]
    n = BATCH * SEQ
    for decision in report.decisions:
        plan = decision.chosen.plan
        assert plan.forward is Forward.MERGED
        assert plan.hidden is Hidden.RECOMPUTE
        assert plan.input_grad in (None, InputGrad.MERGED_RECOMPUTE)
    # recompute h: no N×r activation crosses from forward to backward
    assert not [t for t in saved if t.shape == (n, 4)]
    # W_eff recomputed: no d_out×d_in activation is saved
    weights = {(d.site.d_out, d.site.d_in) for d in report.decisions}
    assert not [t for t in saved if t.shape in weights]
    # merged forward: the forward runs no x·Aᵀ (N×r) matmul
    mms = [n_ for n_ in report.forward.graph.nodes if n_.target == torch.ops.aten.mm.default]
    assert not [m for m in mms if tuple(m.meta["val"].shape) == (n, 4)]


def test_split_plans_save_h_when_they_say_so():
    model = peft_llama(layers=1, lora_dropout=0.1)  # dropout: split, and h saved by "flops"
    ids = torch.randint(0, 128, (BATCH, SEQ))
    with torch._inductor.config.patch(fallback_random=True):
        report = compiled_step(runlora_fx.Backend(OPTIONS), model, ids)
    saved = saved_tensors(report.forward, report.backward, report.parameter_inputs)
    saving_h = [d for d in report.decisions if d.chosen.plan.hidden is Hidden.SAVE]
    assert len(saving_h) == 7
    assert len([t for t in saved if t.shape == (BATCH * SEQ, 4)]) == len(saving_h)


def test_step_flops_fall_by_the_analytic_saving_and_memory_falls():
    model = peft_llama(layers=2)
    ids = torch.randint(0, 128, (BATCH, SEQ))
    ours, plain, eager = twin(model), twin(model), model
    backend, plain_backend = runlora_fx.Backend(OPTIONS), PlainCompile()
    ours_c = torch.compile(ours, backend=backend)
    plain_c = torch.compile(plain, backend=plain_backend)
    llama_step(ours_c, ids)  # one step: compiles and records the partitioned graphs
    llama_step(plain_c, ids)

    def step_flops(report):  # what the partitioned graphs that ran compute
        return graph_flops(report.forward) + graph_flops(report.backward)

    with FlopCounterMode(display=False) as counter:
        llama_step(eager, ids)
    flops_ours, flops_plain = step_flops(backend.reports[0]), step_flops(plain_backend.reports[0])
    saving = sum(
        cost_of(reference_plan(d.unit), d.unit).flops - d.chosen.cost.flops
        for d in backend.reports[0].decisions
    )
    assert saving > 0
    assert flops_plain == counter.get_total_flops()  # plain compile computes what PEFT eager does
    assert flops_plain - flops_ours == saving

    [ours_report], [plain_report] = backend.reports, plain_backend.reports
    saved_ours = saved_activation_bytes(ours_report.forward, ours_report.backward,
                                        ours_report.parameter_inputs)
    saved_plain = saved_activation_bytes(plain_report.forward, plain_report.backward,
                                         plain_report.parameter_inputs)
    h_bytes = 14 * BATCH * SEQ * 4 * 4  # one N×r fp32 h per site
    assert saved_plain - saved_ours == h_bytes
