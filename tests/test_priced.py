"""The "priced" criterion and the choose stage at the widths people fine-tune.

"priced" is the roofline's formula on a fixed device model (roofline.NOMINAL): a pure function
of the shapes, so these tests can assert what it picks. At h 2048 a GEMM stack that copies W
each step costs megabytes moved for one GEMM call saved; at h 256 the copy is small and the
call is what counts (docs/choosing.md, "The priced criterion").
"""

from __future__ import annotations

import math

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import ALL_TARGETS
from runlora_fx import Backend, Chooser
from runlora_fx.choice.criteria import choose, counted_candidates, priced
from runlora_fx.cost.cost import cost_of, costs_at_0_and_1
from runlora_fx.cost.roofline import NOMINAL, nominal_model, plan_seconds
from runlora_fx.ir.plans import plans_for, sharing_across
from runlora_fx.ir.program import metas_of, program_for
from runlora_fx.ir.site import Adapter, LoraSite, SiteGroup
from runlora_fx.options import parse_options

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
COPIES = {torch.ops.aten.cat.default, torch.ops.aten.clone.default, torch.ops.aten.copy.default,
          torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


def site(path: str, n: int, d_in: int, d_out: int, r: int = 16, p: float = 0.0,
         dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoraSite:
    return LoraSite(path, n, d_in, d_out, (Adapter(r, p, 0.5, True, True),), dtype, False,
                    False, True, True, device=device)


def qkv(n: int, h: int, kv: int, p: float = 0.0) -> SiteGroup:
    return SiteGroup((site("q", n, h, h, p=p), site("k", n, h, kv, p=p),
                      site("v", n, h, kv, p=p)))


def copies_a_weight(plan, unit: SiteGroup) -> bool:
    """Whether the plan's program concatenates a W-sized tensor each step."""
    program = program_for(plan, unit)
    metas = metas_of(program, unit)
    smallest_w = min(s.d_in * s.d_out for s in unit.members)
    return any(step.op == "cat" and math.prod(metas[step.out][0]) >= smallest_w
               for step in (*program.forward, *program.backward))


def test_priced_is_the_default_and_flops_stays_by_name():
    """The shape matrix (docs/benchmarks.md) decided the default (issue 25)."""
    assert parse_options(None).criterion == "priced"
    assert parse_options({"criterion": "flops"}).criterion == "flops"


@pytest.mark.parametrize("p", [0.0, 0.05])
def test_the_default_step_copies_no_frozen_weight_at_real_width(p):
    """On the partitioned graphs of a Llama-3.2-1B-wide layer (h 2048, i 8192, 8 KV heads;
    256 tokens), default options: no cat or copy as large as the smallest frozen W runs in the
    step. Under "flops" the same step (p 0) stacks [W; A] and [W | s·B] with a cat each step."""
    config = LlamaConfig(**json.loads((CONFIGS / "llama3.2_1b_1layer.json").read_text()))
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=p, target_modules=ALL_TARGETS)
    model = get_peft_model(LlamaForCausalLM(config), lora)
    ids = torch.randint(0, config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    smallest_w = config.hidden_size * config.num_key_value_heads * config.head_dim
    copies = {}
    for criterion in ("default", "flops") if p == 0 else ("default",):
        options = {"inner": "eager"} | ({} if criterion == "default" else {"criterion": criterion})
        backend = Backend(options)
        torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss.backward()
        [report] = backend.reports
        assert sum(len(d.sites) for d in report.decisions) == 7 and not report.skipped
        copies[criterion] = [
            f"{part}: {node.target} {tuple(node.meta['val'].shape)}"
            for part, gm in (("forward", report.forward), ("backward", report.backward))
            for node in gm.graph.nodes
            if node.target in COPIES and node.meta["val"].numel() >= smallest_w]
        torch._dynamo.reset()
    assert not copies["default"], copies["default"]
    if "flops" in copies:  # the control: the check sees the copies it is there to forbid
        assert copies["flops"]


@pytest.mark.parametrize("n", [512, 2048])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_no_w_sized_copy_each_step_at_real_widths(n, p):
    """Llama-3.2-1B's q/k/v (h 2048, 8 KV heads) and MLP: "priced" copies no W per step,
    where the flops criterion does (it counts the copy only as a tie-break)."""
    chooser, flops = Chooser("priced"), Chooser("flops")
    units = [qkv(n, 2048, 512, p), SiteGroup((site("o", n, 2048, 2048, p=p),)),
             SiteGroup((site("gate", n, 2048, 8192, p=p), site("up", n, 2048, 8192, p=p)))]
    flops_copies = False
    for unit in units:
        for decision in chooser.decide(unit, n):
            assert not copies_a_weight(decision.chosen.plan, decision.unit), decision.unit.path
        flops_copies |= any(copies_a_weight(d.chosen.plan, d.unit) for d in flops.decide(unit, n))
    assert flops_copies  # the regression this criterion fixes


def test_small_weights_still_share_gemms():
    """Config A's shapes (h 256, N 1024): a W copy is ~0.5 MB, a GEMM call is dearer, and
    "priced" keeps sharing GEMMs."""
    unit = qkv(1024, 256, 256)
    decisions = Chooser("priced").decide(unit, 1024)
    assert any(d.chosen.plan.sharing for d in decisions)


def test_priced_seconds_are_the_roofline_formula_on_the_nominal_device():
    unit = SiteGroup((site("o", 512, 2048, 2048),))
    model = nominal_model("cpu", torch.float32)
    assert model == NOMINAL[("cpu", False)]
    assert nominal_model("cuda:1", torch.bfloat16) == NOMINAL[("cuda", True)]
    for candidate in priced(unit, counted_candidates(unit)):
        assert candidate.seconds == plan_seconds(candidate.plan, unit, model)
        assert 0 < candidate.seconds < math.inf
    # the same answer from choose() (no Chooser) and from the backend's Chooser
    assert choose(unit, "priced").chosen.plan == Chooser("priced").choose(unit).chosen.plan


def test_a_gpu_site_is_priced_on_the_gpu_model():
    """At the same shape an H100-class device makes bytes dearer relative to FLOPs: the choice
    may differ, and it is made without a GPU (nothing is measured)."""
    unit = SiteGroup((site("o", 2048, 2048, 2048, dtype=torch.bfloat16, device="cuda:0"),))
    decision = choose(unit, "priced")
    model = NOMINAL[("cuda", True)]
    assert decision.chosen.seconds == plan_seconds(decision.chosen.plan, unit, model)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_group_plans_are_those_sharing_across_members_on_a_members_plan(p):
    """sharing_across builds a group's few candidates directly; they are exactly the plans
    of plans_for that share across members and run the template in each member."""
    unit = SiteGroup((site("q", 24, 20, 12, r=3, p=p), site("k", 24, 20, 8, r=3, p=p)))
    every = plans_for(unit)
    for template in {plan.within_members() for plan in plans_for(unit.alone()[0])}:
        expected = {plan for plan in every
                    if plan.groups_members and plan.within_members() == template}
        assert set(sharing_across(template, unit)) == expected


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_a_program_does_not_depend_on_n(p):
    """The chooser builds each plan's program once and prices it at every N."""
    unit = SiteGroup((site("q", 24, 20, 12, r=3, p=p), site("k", 24, 20, 8, r=3, p=p)))
    for plan in plans_for(unit):
        program = program_for(plan, unit)
        for n in (0, 1, 7):
            assert cost_of(plan, unit.with_n(n), program) == cost_of(plan, unit.with_n(n))
        assert costs_at_0_and_1(plan, unit, program) == (cost_of(plan, unit.with_n(0)),
                                                         cost_of(plan, unit.with_n(1)))
