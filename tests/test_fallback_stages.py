"""Failures are contained: an exception inside one of runlora's own stages (find, choose,
rewrite, tag) never stops training. That graph is compiled as plain torch.compile compiles it,
with one warning naming the stage and the exception, recorded in the report and the dump;
options strict=True (or RUNLORA_STRICT=1, which the test suite sets) raises instead.

Faults are injected into runlora's own stage functions — never into torch or PEFT.
"""

from __future__ import annotations

import json

import pytest
import torch

import runlora_fx
import runlora_fx.backend as backend_module
import runlora_fx.passes.recompute_tags as tags_module
from runlora_fx.choice.chooser import Chooser
from conftest import PlainCompile, assert_grads_match, peft_llama, rel_err, twin


class Injected(RuntimeError):
    pass


def boom(*args, **kwargs):
    raise Injected("injected fault")


STAGES = {  # stage → (module, attribute) to make raise
    "find": (backend_module, "find_sites"),
    "choose": (Chooser, "decide"),
    "rewrite": (backend_module, "rewrite_unit"),
    "tag": (tags_module, "tag_recompute"),
}


def step(model, backend, ids):
    out = torch.compile(model, backend=backend)(input_ids=ids, labels=ids)
    out.loss.backward()
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_a_failing_stage_falls_back_to_plain_compile(stage, monkeypatch, tmp_path):
    monkeypatch.delenv("RUNLORA_STRICT")
    module, name = STAGES[stage]
    monkeypatch.setattr(module, name, boom)
    model = peft_llama(layers=1)
    plain_model = twin(model)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = runlora_fx.Backend({"inner": "eager", "debug_dir": str(tmp_path)})
    with pytest.warns(RuntimeWarning, match=f"the {stage} stage raised Injected"):
        got = step(model, ours, ids)
    expected = step(plain_model, PlainCompile(), ids)
    assert rel_err(got.loss, expected.loss) == 0.0  # the very graph plain compile runs
    assert_grads_match(plain_model, model, 0.0)
    [report] = ours.reports
    assert report.failure == f"{stage}: Injected: injected fault" and not report.decisions
    [dump] = tmp_path.glob("graph_*/sites.json")
    doc = json.loads(dump.read_text())
    assert doc["failures"] == [{"graph": doc["graphs"][0], "failure": report.failure}]
    assert "runlora failed, plain torch.compile used" in (dump.parent / "report.md").read_text()


def test_strict_raises(monkeypatch):
    monkeypatch.setattr(Chooser, "decide", boom)
    model = peft_llama(layers=1)
    ids = torch.randint(0, 128, (2, 24))
    with pytest.raises(Exception, match="injected fault"):
        step(model, runlora_fx.Backend({"inner": "eager", "strict": True}), ids)


def test_strict_comes_from_the_environment_when_not_given(monkeypatch):
    monkeypatch.setenv("RUNLORA_STRICT", "1")
    assert runlora_fx.Backend().options.strict
    monkeypatch.delenv("RUNLORA_STRICT")
    assert not runlora_fx.Backend().options.strict
    assert runlora_fx.Backend({"strict": True}).options.strict
    with pytest.raises(ValueError, match="strict"):
        runlora_fx.Backend({"strict": "yes"})
