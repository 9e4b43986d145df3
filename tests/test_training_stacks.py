"""runlora inside the training stacks users run: HF Trainer, gradient checkpointing, and
train/eval switching. Inner compiler "eager" throughout: the rewrite is what is under test."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Trainer, TrainingArguments

import runlora_fx
from conftest import assert_grads_match, enable_checkpointing, peft_llama, rel_err, twin
from runlora_fx.ir.plans import Forward

EAGER_INNER = {"inner": "eager"}


def tiny_dataset(rows: int = 16, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(rows):
        ids = torch.randint(0, 128, (seq,), generator=gen)
        data.append({"input_ids": ids, "labels": ids.clone()})
    return data


def trainer_args(out_dir, **extra) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out_dir), use_cpu=True, per_device_train_batch_size=4, max_steps=4,
        learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", seed=0,
        data_seed=0, dataloader_num_workers=0, disable_tqdm=True, **extra,
    )


def train(model, args) -> list[float]:
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


def test_trainer_torch_compile_backend_runlora_is_refused_by_accelerate(tmp_path):
    """Trainer compiles through accelerate, whose TorchDynamoPlugin accepts only the backends
    of its DynamoBackend enum: TrainingArguments(torch_compile_backend="runlora") cannot work.
    If accelerate opens the list, this test fails: then switch the test below to it."""
    args = trainer_args(tmp_path, torch_compile=True, torch_compile_backend="runlora")
    with pytest.raises(ValueError, match="'RUNLORA' is not a valid DynamoBackend"):
        Trainer(model=peft_llama(layers=1), args=args, train_dataset=tiny_dataset())


def test_trainer_on_a_model_compiled_with_runlora_matches_eager(tmp_path):
    """The supported route: `model.compile(backend="runlora")` before handing it to Trainer."""
    eager = peft_llama(layers=1)
    compiled = twin(eager)
    dump = tmp_path / "dump"
    compiled.compile(backend="runlora", options={**EAGER_INNER, "debug_dir": str(dump)})

    eager_losses = train(eager, trainer_args(tmp_path / "eager"))
    compiled_losses = train(compiled, trainer_args(tmp_path / "compiled"))

    assert len(eager_losses) == 4
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    expected, actual = lora_params(eager), lora_params(compiled)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert rel_err(actual[name], expected[name]) <= 1e-5, name
    # the backend really ran: one training graph, all 7 sites rewritten
    [sites_json] = dump.glob("graph_*/sites.json")
    doc = json.loads(sites_json.read_text())
    assert doc["totals"]["sites_rewritten"] == 7 and not doc["skipped"]


@pytest.mark.usefixtures("compilable_checkpointing")
def test_gradient_checkpointing_matches_eager():
    eager = enable_checkpointing(peft_llama(layers=2))
    model = twin(eager)
    backend = runlora_fx.Backend(EAGER_INNER)
    compiled = torch.compile(model, backend=backend)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))

    loss_e = eager(input_ids=ids, labels=ids).loss
    loss_e.backward()
    loss_c = compiled(input_ids=ids, labels=ids).loss
    loss_c.backward()

    assert rel_err(loss_c, loss_e) <= 1e-6
    assert_grads_match(eager, model, 1e-5)
    # Dynamo puts each checkpointed layer in a tag_activation_checkpoint subgraph (wrap_body_N);
    # the sites inside are rewritten too (passes/subgraphs.py; saved set and Inductor parity in
    # tests/test_checkpointing.py).
    assert sum(r.sites_rewritten for r in backend.reports) == 14
    assert not [s for r in backend.reports for s in r.skipped]


def test_train_eval_switching_compiles_once_per_mode_and_eval_merges():
    model = peft_llama(layers=1, lora_dropout=0.1)
    eager = twin(model)
    backend = runlora_fx.Backend(EAGER_INNER)
    compiled = torch.compile(model, backend=backend)
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))

    graphs_after = []
    for mode in ["train", "eval", "train", "eval", "train", "eval"]:
        for m in (model, eager):
            getattr(m, mode)()
        if mode == "train":
            compiled(input_ids=ids, labels=ids).loss.backward()
        else:
            with torch.no_grad():
                out_c = compiled(input_ids=ids).logits
                out_e = eager(input_ids=ids).logits
            assert rel_err(out_c, out_e) <= 1e-5
        graphs_after.append(len(backend.reports))

    assert graphs_after == [1, 2, 2, 2, 2, 2]  # one graph per mode, then cache hits
    train_report, eval_report = backend.reports
    assert train_report.sites_rewritten == eval_report.sites_rewritten == 7
    for decision in train_report.decisions:  # dropout active: merging is illegal
        for site in decision.sites:
            assert site.training and site.adapters[0].dropout_p == 0.1
        assert decision.chosen.plan.forward is Forward.SPLIT
    for decision in eval_report.decisions:  # dropout off, no grads: the merged forward wins
        for site in decision.sites:
            assert not site.training and site.adapters[0].dropout_p == 0.0
        assert decision.chosen.plan.forward is Forward.MERGED
