"""The merge check (runlora_fx/merge_check.py): at a 16-bit site merging is legal where the
site's own frozen W passes the measured rule's thresholds, and the verdict follows W when W
changes after compiling (passes/frozen_weights.py, runlora_fx/weight_guard.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time

import pytest
import torch
import torch.fx as fx
from peft import LoraConfig, get_peft_model

import runlora_fx
from conftest import enable_checkpointing, peft_llama
from runlora_fx.passes.frozen_weights import WeightSource, resolve
from runlora_fx.weight_guard import StaleMergeCheck
from runlora_fx.ir.merge_check import MergeCheck, check_site
from runlora_fx.ir.plans import Forward, plans_for
from runlora_fx.ir.precision import precision_reason
from runlora_fx.ir.rounding import Rounding
from runlora_fx.ir.site import Adapter, LoraSite, SiteGroup, WeightLayout

BF16, FP16, F32 = torch.bfloat16, torch.float16, torch.float32
KINDS = {  # x / W dtype, then the dtype fields as the matcher records them
    "bf16-peft": (BF16, dict(adapter_dtype=F32, lora_dtype=F32, result_dtype=BF16)),
    "bf16": (BF16, {}),
    "fp16-peft": (FP16, dict(adapter_dtype=F32, lora_dtype=F32, result_dtype=FP16)),
}


def site_of(kind: str, d_out: int, d_in: int, r: int = 8, n: int = 4096) -> LoraSite:
    dtype, fields = KINDS[kind]
    return LoraSite("s", n, d_in, d_out, (Adapter(r, 0.0, 2.0, True, True),), dtype, False,
                    False, True, True, **fields)


def weight(distribution: str, d_out: int, d_in: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if distribution == "normal":  # transformers' _init_weights
        w = torch.randn(d_out, d_in, generator=gen) * 0.02
    else:  # nn.Linear's own init
        w = (torch.rand(d_out, d_in, generator=gen) * 2 - 1) / math.sqrt(d_in)
    return w.to(dtype)


@pytest.mark.rounding  # the check's figures come from this CPU's 16-bit GEMMs
@pytest.mark.parametrize("kind", KINDS)
def test_a_normal_weight_passes_and_a_uniform_one_refuses_with_its_figures(kind):
    site = site_of(kind, 256, 256)
    dtype = KINDS[kind][0]
    normal = check_site(site, weight("normal", 256, 256, dtype), Rounding.NEAREST)
    uniform = check_site(site, weight("uniform", 256, 256, dtype), Rounding.NEAREST)
    assert normal.legal and not normal.reason
    assert [f.rel for f in normal.figures] == [1e-3, 1e-4]
    for f in normal.figures:
        assert f.out_ratio <= 1.1 and f.kept >= f.kept_peft - 0.05
    assert not uniform.legal
    # a uniform W keeps less of a small update than PEFT's path, by more than the slack
    worst = min(uniform.figures, key=lambda f: f.kept - f.kept_peft)
    assert worst.kept - worst.kept_peft < -0.05 and not worst.passes
    assert f"kept share {worst.kept:.3f} vs PEFT's {worst.kept_peft:.3f}" in uniform.reason
    assert "output error" in uniform.reason and "s·BA/W" in uniform.reason


@pytest.mark.rounding  # the check's figures come from this CPU's 16-bit GEMMs
def test_stochastic_rounding_keeps_the_update_at_more_output_noise():
    site = site_of("bf16-peft", 256, 256)
    for distribution in ("normal", "uniform"):
        check = check_site(site, weight(distribution, 256, 256, BF16), Rounding.STOCHASTIC)
        assert check.legal, check.describe()
        at_1e3 = check.figures[0]
        assert 0.9 <= at_1e3.kept <= 1.1  # unbiased, where nearest keeps ~0.5
        assert 1.1 <= at_1e3.out_ratio <= 1.5  # p(1−p)·ulp² of noise per weight


def test_the_verdict_is_reproducible_and_reads_a_transposed_layout():
    site = site_of("bf16-peft", 96, 160)
    w = weight("normal", 96, 160, BF16)
    first, again = check_site(site, w, Rounding.NEAREST), check_site(site, w, Rounding.NEAREST)
    assert first.figures == again.figures
    conv1d = dataclasses.replace(site, weight_layout=WeightLayout.IN_OUT)
    assert check_site(conv1d, w.t(), Rounding.NEAREST).figures == first.figures
    assert "does not fit" in check_site(site, w.t(), Rounding.NEAREST).reason
    zeros = check_site(site, torch.zeros(96, 160, dtype=BF16), Rounding.NEAREST)
    assert not zeros.legal and "did not run" in zeros.reason


def test_cost_of_a_4096_square_weight():
    """Reported, not asserted: the check reads a sample of W (merge_check.Sample)."""
    site = site_of("bf16-peft", 4096, 4096)
    w = weight("normal", 4096, 4096, BF16)
    check_site(site, w, Rounding.NEAREST)
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        check = check_site(site, w, Rounding.NEAREST)
        seconds.append(time.perf_counter() - start)
    print(f"\n[merge check, 4096×4096 bf16 W, {torch.get_num_threads()} thread(s)] "
          f"{min(seconds) * 1e3:.1f} ms (best of 5); {check.sample}")
    assert check.legal


def test_precision_reason_follows_the_site_check():
    site = site_of("bf16-peft", 64, 64)
    passed = dataclasses.replace(site, merge_check=MergeCheck("nearest", True))
    refused = dataclasses.replace(site, merge_check=MergeCheck("nearest", False, reason="why"))
    branch = runlora_fx.Precision.SITE
    assert precision_reason(passed, True, Rounding.NEAREST, branch) is None
    assert precision_reason(refused, True, Rounding.NEAREST, branch) == (
        "merged-nearest on a bf16-peft site: why")
    assert "ran for merge_rounding='nearest'" in precision_reason(
        passed, True, Rounding.STOCHASTIC, branch)
    # unchecked: the measured rule over the grid's worst W decides, as before
    assert "uniform W" in precision_reason(site, True, Rounding.NEAREST, branch)
    assert any(p.merges for p in plans_for(SiteGroup((passed,))))
    assert not any(p.merges for p in plans_for(SiteGroup((refused,))))
    assert not any(p.merges for p in plans_for(SiteGroup((site,))))


def test_a_weight_the_graph_computes_is_not_read():
    def f(x, w):
        return torch.nn.functional.linear(x, w.to(torch.bfloat16))

    gm = fx.symbolic_trace(f)
    x_node, w_node = [n for n in gm.graph.nodes if n.op == "placeholder"]
    cast = next(iter(w_node.users))
    w = torch.randn(4, 4)
    found = {x_node: "no tensor", w_node: [WeightSource(1, w)]}
    assert resolve(w_node, gm, found)[0].tensor is w
    assert "computed in the graph" in resolve(cast, gm, found)


# ---- in a compiled model -----------------------------------------------------------------------


def peft_default_llama(init: str) -> torch.nn.Module:
    """A 1-layer Llama, h 64, in PEFT's bf16 default (fp32 adapters), its base linears drawn by
    transformers' init ("normal") or nn.Linear's own ("uniform")."""
    model = peft_llama(layers=1, hidden=64)
    if init == "uniform":
        torch.manual_seed(1)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lora_" not in name:
                module.reset_parameters()
    for name, param in model.named_parameters():
        if "lora_" not in name:
            param.data = param.data.to(BF16)
    return model


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))


def test_the_verdict_lands_in_the_report_sites_json_and_explain(tmp_path):
    model = peft_default_llama("normal")
    backend = runlora_fx.Backend({"inner": "eager", "debug_dir": str(tmp_path)})
    torch.compile(model, backend=backend)(input_ids=ids(), labels=ids()).loss.backward()
    [report] = backend.reports
    sites = [s for d in report.decisions for s in d.sites]
    assert len(sites) == 7 and all(s.merge_check is not None for s in sites)
    merged = [s for d in report.decisions if d.chosen.plan.merges for s in d.sites]
    assert merged and all(s.merge_check.legal for s in merged)

    records = json.loads(next(tmp_path.glob("graph_*/sites.json")).read_text())["sites"]
    members = [m for r in records for m in r.get("members", [r])]
    by_path = {m["path"]: m["merge_check"] for m in members}
    for site in sites:
        record = by_path[site.path]
        assert record["legal"] == site.merge_check.legal
        assert [f["kept"] for f in record["figures"]] == [f.kept for f in site.merge_check.figures]
    report_md = next(tmp_path.glob("graph_*/report.md")).read_text()
    legal = sum(s.merge_check.legal for s in sites)
    assert f"{legal} of 7 16-bit sites may merge" in report_md

    explained = runlora_fx.explain(model, input_ids=ids(), labels=ids(), options={})
    again = {s.path: s.merge_check for d in explained.decisions for s in d.sites}
    assert {s.path: s.merge_check.figures for s in sites} == {
        p: c.figures for p, c in again.items()}


def test_nn_linear_init_refuses_everywhere_with_the_figures():
    backend = runlora_fx.Backend({"inner": "eager"})
    model = peft_default_llama("uniform")
    torch.compile(model, backend=backend)(input_ids=ids(), labels=ids()).loss.backward()
    [report] = backend.reports
    sites = [s for d in report.decisions for s in d.sites]
    assert len(sites) == 7 and not any(d.chosen.plan.merges for d in report.decisions)
    for site in sites:
        assert not site.merge_check.legal
        assert "kept share" in site.merge_check.reason
    printed = str(runlora_fx.explain(model, input_ids=ids(), labels=ids()))
    assert "0 of 7 16-bit sites may merge" in printed and "why merging is refused" in printed


def test_sites_in_a_checkpointed_region_read_the_outer_weights(compilable_checkpointing):
    model = enable_checkpointing(peft_default_llama("normal")).train()
    explained = runlora_fx.explain(model, input_ids=ids(), labels=ids())
    sites = [s for d in explained.decisions for s in d.sites]
    assert len(sites) == 7
    for site in sites:
        assert site.merge_check.figures, site.merge_check.reason  # it ran on the real W


# ---- when W changes after compiling --------------------------------------------------------------

D, N = 64, 4096  # N >> d: merging wins by FLOPs


def single_linear() -> torch.nn.Module:
    """One PEFT linear in PEFT's bf16 default, W drawn as transformers draws it."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(D, D, bias=False))
    torch.nn.init.normal_(base[0].weight, std=0.02)
    model = get_peft_model(base.to(BF16), LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    torch.nn.init.normal_(model.base_model.model[0].lora_B.default.weight, std=0.1)
    return model


def base_weight(model: torch.nn.Module) -> torch.nn.Parameter:
    return model.base_model.model[0].base_layer.weight


def step(compiled, x):
    y = compiled(x)
    y.float().square().mean().backward()
    return y


def test_a_new_weight_is_rechecked_and_a_refused_one_stops_the_merged_plan():
    model = single_linear()
    backend = runlora_fx.Backend({"inner": "eager"})
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1)).to(BF16)
    step(compiled, x)
    [report] = backend.reports
    [decision] = report.decisions
    assert decision.chosen.plan.forward is Forward.MERGED and decision.site.merge_check.legal

    # a new normal W (another checkpoint): re-checked, passes, training goes on
    normal = {"base_model.model.0.base_layer.weight": weight("normal", D, D, BF16)}
    model.load_state_dict(normal, strict=False)
    y = step(compiled, x)
    assert len(report.merge_rechecks) == 1 and "passes" in report.merge_rechecks[0]
    eager = copy.deepcopy(model)(x)
    assert ((y.float() - eager.float()).norm() / eager.float().norm()).item() < 1e-2
    step(compiled, x)
    assert len(report.merge_rechecks) == 1  # checked once per change

    # nn.Linear's uniform W: the merged plan may not run with it
    uniform = {"base_model.model.0.base_layer.weight": weight("uniform", D, D, BF16)}
    model.load_state_dict(uniform, strict=False)
    with pytest.raises(StaleMergeCheck, match="changed after compiling.*kept share"):
        step(compiled, x)

    # as the message says: recompile, and the new compile does not merge there
    torch.compiler.reset()
    step(compiled, x)
    last = backend.reports[-1].decisions[0]
    assert last.chosen.plan.forward is Forward.SPLIT and not last.site.merge_check.legal


def test_a_replaced_parameter_is_rechecked():
    model = single_linear()
    backend = runlora_fx.Backend({"inner": "eager"})
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1)).to(BF16)
    step(compiled, x)
    base_weight(model).data = weight("uniform", D, D, BF16)  # new storage, same Parameter
    with pytest.raises(StaleMergeCheck):
        step(compiled, x)


def test_a_write_through_data_is_not_seen():
    """Documented (docs/precision.md): `.data` bypasses autograd's version counter, and the
    storage stays: the merged plan keeps running with the old verdict."""
    model = single_linear()
    backend = runlora_fx.Backend({"inner": "eager"})
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1)).to(BF16)
    step(compiled, x)
    base_weight(model).data.copy_(weight("uniform", D, D, BF16))
    step(compiled, x)
    assert backend.reports[0].merge_rechecks == []
    assert backend.reports[0].decisions[0].chosen.plan.merges


def test_without_inlined_modules_the_weight_is_read_and_watched_too():
    """Dynamo's older mode keeps module parameters as graph attributes (get_attr)."""
    with torch._dynamo.config.patch(inline_inbuilt_nn_modules=False):
        model = single_linear()
        backend = runlora_fx.Backend({"inner": "eager"})
        compiled = torch.compile(model, backend=backend)
        x = torch.randn(N, D, generator=torch.Generator().manual_seed(1)).to(BF16)
        step(compiled, x)
        [decision] = backend.reports[0].decisions
        assert decision.chosen.plan.merges and decision.site.merge_check.figures
        model.load_state_dict(
            {"base_model.model.0.base_layer.weight": weight("uniform", D, D, BF16)}, strict=False)
        with pytest.raises(StaleMergeCheck):
            step(compiled, x)
