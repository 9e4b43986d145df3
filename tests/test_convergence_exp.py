"""The convergence CLI `experiments/convergence_exp.py` (issue 11, item 5).

Argument errors exit 2 in-process before anything is built (the run is replaced by a failure);
the text and the batches are deterministic; the runlora variants pass their options through; and a
tiny end-to-end run (hidden 32, 1 layer, fp32 and peft-bf16, 3 steps) writes curves.csv, val.csv,
curves.png and summary.md. Nothing here compiles: a few seconds in all.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import load_script

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "convergence_exp.py"
TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 128,  # the script sets 256 (bytes)
    "max_position_embeddings": 8,  # the script raises it to --seq_len
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def cli():
    return load_script(SCRIPT, "convergence_exp")


def write_json(folder: Path, value: object, name: str = "tiny.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(value))
    return path


def parsed(cli, monkeypatch, argv: list[str]):
    """main(argv) up to the point where it would run: the parsed arguments."""
    seen = []
    monkeypatch.setattr(cli, "run", seen.append)
    cli.main(argv)
    return seen[0]


# ---------------------------------------------------------------- arguments


BAD = [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "many"], "invalid int value"),
    (["--n_batch", "-1"], "--n_batch must be >= 1"),
    (["--seq_len", "1"], "--seq_len must be >= 2"),
    (["--lr", "0"], "--lr must be finite, > 0"),
    (["--lr", "nan"], "--lr must be finite, > 0"),
    (["--lora_r", "0"], "--lora_r must be >= 1"),
    (["--lora_alpha", "inf"], "--lora_alpha must be finite"),
    (["--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--eval_every", "0"], "--eval_every must be >= 1"),
    (["--val_fraction", "0.7"], "--val_fraction must be in (0, 0.5)"),
    (["--variants", "bogus"], "invalid choice: 'bogus'"),
    (["--variants", "peft-bf16"], "must include fp32, the reference"),
    (["--variants", "fp32", "peft-bf16", "fp32"], "lists a variant twice"),
    (["--options", "{bad"], "--options is not valid JSON"),
    (["--options", "[1]"], "--options must be a JSON object"),
    (["--options", '{"merge_rounding": "nearest"}'], "which variant runlora-nearest sets itself"),
    (["--variants", "fp32", "runlora", "--options", '{"criterion": "nope"}'],
     "variant runlora: runlora: option criterion='nope' is not valid"),
    (["-m", "/nonexistent/config.json"], "is not a file"),
    (["--data_dir", "/nonexistent/folder"], "is not a folder"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_exit_2_before_building(cli, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(cli, "run", lambda args: pytest.fail("ran with bad arguments"))
    monkeypatch.setattr(cli, "build_models", lambda *a: pytest.fail("built a model"))
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_config_must_be_a_json_object(cli, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "run", lambda args: pytest.fail("ran with bad arguments"))
    for text in ("[1, 2]", "{not json"):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(SystemExit) as exited:
            cli.main(["-m", str(tmp_path / "bad.json"), "--variants", "fp32"])
        assert exited.value.code == 2
        assert "--config" in capsys.readouterr().err


def test_defaults_and_config_overrides(cli, monkeypatch, tmp_path):
    args = parsed(cli, monkeypatch, ["--variants", "peft-bf16", "fp32", "-m",
                                     str(write_json(tmp_path, TINY)), "--seq_len", "64"])
    assert args.variants == ["fp32", "peft-bf16"]  # the reference runs first
    assert args.model_config["vocab_size"] == 256
    assert args.model_config["max_position_embeddings"] == 64
    assert args.command.startswith("python experiments/convergence_exp.py --variants peft-bf16")
    args = parsed(cli, monkeypatch, [])
    assert args.variants == ["fp32", "peft-bf16", "runlora-nearest", "runlora-stochastic"]
    assert args.steps >= 300 and args.lora_dropout == 0.0 and args.config.endswith("llama_9m.json")


def test_runlora_variants_pass_their_options_through(cli):
    extra = {"criterion": "flops"}
    assert cli.runlora_options("fp32", extra) is None
    assert cli.runlora_options("peft-bf16", extra) is None
    assert cli.runlora_options("runlora-nearest", extra) == {**extra, "merge_rounding": "nearest"}
    assert cli.runlora_options("runlora-stochastic", {}) == {"merge_rounding": "stochastic"}
    assert cli.runlora_options("runlora", extra) == extra


# ---------------------------------------------------------------- data


def test_corpus_is_sorted_text_without_site_packages_or_tests(cli, tmp_path):
    for rel, text in {"b.py": "B", "a.py": "A", "doc.rst": "D", "pkg/c.py": "C", "x.bin": "X",
                      "site-packages/s.py": "S", "test/t.py": "T"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text * 40)
    corpus = cli.load_corpus(tmp_path, 0.25)
    stream = bytes(torch.cat([corpus.train, corpus.val]).tolist())
    assert stream == b"\n".join(c.encode() * 40 for c in "ABDC")  # a.py b.py doc.rst pkg/c.py
    assert corpus.files == 4 and len(corpus.val) == len(stream) - int(len(stream) * 0.75)


def test_windows_are_seeded_slices_of_the_text(cli):
    data = torch.arange(1000) % 251
    draw = lambda seed: cli.draw_windows(data.to(torch.uint8), 5, 3, 16,  # noqa: E731
                                         torch.Generator().manual_seed(seed))
    first = draw(0)
    assert first.shape == (5, 3, 16) and first.dtype == torch.uint8
    assert torch.equal(first, draw(0)) and not torch.equal(first, draw(1))
    steps = (first[..., 1:].long() - first[..., :-1].long()) % 251
    assert bool((steps == 1).all())  # each window is a contiguous run of the stream


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(cli, tmp_path_factory):
    folder = tmp_path_factory.mktemp("convergence")
    threads = torch.get_num_threads()
    argv = ["-m", str(write_json(folder, TINY)), "--variants", "fp32", "peft-bf16", "--steps", "3",
            "--n_batch", "2", "--seq_len", "16", "--eval_every", "2", "--val_batches", "2",
            "-o", str(folder / "out")]
    out = cli.main(argv)
    assert torch.get_num_threads() == threads  # --threads is put back
    return out


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_tiny_run_writes_curves(tiny_run):
    columns, rows = read_csv(tiny_run / "curves.csv")
    assert columns == ["step", "variant", "train_loss"]
    assert [(r["step"], r["variant"]) for r in rows] == [
        (str(s), v) for v in ("fp32", "peft-bf16") for s in (1, 2, 3)]
    losses = {(r["variant"], int(r["step"])): float(r["train_loss"]) for r in rows}
    assert all(math.isfinite(v) for v in losses.values())
    # random init over 256 bytes, same weights (bf16-rounded) and batch: about ln 256 for both
    assert abs(losses["fp32", 1] - math.log(256)) < 0.1
    assert abs(losses["peft-bf16", 1] - losses["fp32", 1]) < 0.02
    columns, rows = read_csv(tiny_run / "val.csv")
    assert columns == ["step", "variant", "val_loss"]
    assert [int(r["step"]) for r in rows] == [0, 2, 3, 0, 2, 3]
    assert (tiny_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_run_summary(tiny_run):
    text = (tiny_run / "summary.md").read_text()
    assert "| variant | mean \\|loss - fp32\\| (last 3) | ratio to PEFT's (same setup) |" in text
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in text.splitlines()
            if line.startswith("| fp32 ") or line.startswith("| peft-bf16 ")}
    assert float(rows["fp32"][0]) == 0.0 and rows["fp32"][1].strip() == "-"  # the reference
    assert float(rows["peft-bf16"][1]) == 1.0  # the baseline of the ratio
    assert "python experiments/convergence_exp.py -m " in text
    assert f"torch {torch.__version__}" in text and "capability" in text and "runlora-fx " in text
