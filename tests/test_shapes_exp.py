"""The shape matrix `experiments/shapes_exp.py`: the points issue 25 asks for, real widths in the
configs, argument errors, and one tiny point end to end (two Inductor compiles, ~30 s)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

from conftest import load_script
from runlora_fx.options import Options

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "shapes_exp.py"
TINY = {
    "architectures": ["Qwen2ForCausalLM"],  # q/k/v biases and GQA, as the real Qwen shape
    "model_type": "qwen2",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "use_cache": False,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def shapes():
    return load_script(SCRIPT, "shapes_exp")


@pytest.fixture(scope="module")
def default_matrix(shapes):
    return shapes.parse_args(["--device", "cpu", "--dry_run"])


def write_tiny(folder: Path) -> Path:
    path = folder / "tiny_qwen.json"
    path.write_text(json.dumps(TINY))
    return path


# ---------------------------------------------------------------- the matrix

REQUIRED = [
    *((shape, n, r, p) for shape in ("qwen2.5-0.5b", "llama3.2-1b") for n in (512, 2048)
      for r in (16, 64) for p in (0.0, 0.05)),
    ("llama3-8b", 512, 16, 0.0), ("llama3-8b", 512, 16, 0.05),
]


@pytest.mark.parametrize(("shape", "tokens", "r", "p"), REQUIRED)
def test_the_default_matrix_has_every_point_of_the_issue(default_matrix, shape, tokens, r, p):
    names = [point.name for point in default_matrix.points]
    assert f"{shape}_N{tokens}_r{r}_p{p:g}" in names
    assert len(names) == len(REQUIRED)  # nothing more: the hour is the limit


@pytest.mark.parametrize(
    ("name", "model_type", "layers", "hidden", "intermediate", "heads", "kv_heads"),
    [
        ("qwen2.5_0.5b_1layer", "qwen2", 1, 896, 4864, 14, 2),
        ("llama3.2_1b_1layer", "llama", 1, 2048, 8192, 32, 8),
        ("llama3_8b_1layer", "llama", 1, 4096, 14336, 32, 8),
    ],
)
def test_configs_have_the_real_widths_and_a_small_vocabulary(
    name, model_type, layers, hidden, intermediate, heads, kv_heads
):
    config = AutoConfig.from_pretrained(REPO / "configs" / f"{name}.json")
    assert config.model_type == model_type
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        layers, hidden, intermediate)
    assert (config.num_attention_heads, config.num_key_value_heads) == (heads, kv_heads)
    assert config.vocab_size <= 1024 and not config.tie_word_embeddings
    assert not config.use_cache


def test_the_default_matrix_fits_its_budget_and_runs_small_n_first(default_matrix):
    args = default_matrix
    assert sum(args.estimates) <= args.budget  # the default matrix fits its budget
    by_name = dict(zip((p.name for p in args.points), args.estimates))
    # larger N and the 8B layer cost more; the order runs the smaller N first
    assert by_name["llama3.2-1b_N2048_r16_p0"] > by_name["llama3.2-1b_N512_r16_p0"]
    assert by_name["llama3-8b_N512_r16_p0"] > by_name["llama3.2-1b_N512_r16_p0"]
    assert [p.tokens for p in args.points] == sorted(p.tokens for p in args.points)
    # the floor's graph at a shape and N seen before comes from Inductor's cache
    assert by_name["llama3.2-1b_N512_r64_p0"] < by_name["llama3.2-1b_N512_r16_p0"]


def test_points_that_did_not_run_keep_a_row_saying_why(shapes, default_matrix, tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    from shapes_report import write_summary

    outcomes = [shapes.Outcome(default_matrix.points[0], "failed (exit 1)", 151.0, 12.0),
                shapes.Outcome(default_matrix.points[1], "not run: budget spent")]
    write_summary(tmp_path, ["# header"], outcomes, "fp32", default_matrix.expanded)
    lines = (tmp_path / "shapes_summary.md").read_text().splitlines()
    assert lines[4].startswith("| llama3.2-1b_N512_r16_p0 | 1 | 1×512 | 16 | 0 | - | - | - |")
    assert lines[4].endswith("| - | failed (exit 1) |")
    assert lines[5].endswith("| - | not run: budget spent |")
    with (tmp_path / "shapes_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["status"] for row in rows] == ["failed (exit 1)", "not run: budget spent"]


def test_only_selects_by_pattern_and_the_dry_run_prints_commands(shapes, capsys):
    assert shapes.main(["--device", "cpu", "--dry_run", "--only", "llama3-8b_*",
                        "--criterions", "flops", "roofline"]) == 0
    out = capsys.readouterr().out
    assert "# shape matrix: 2 points" in out
    assert "llama3-8b_N512_r16_p0.05 (estimate" in out
    assert "--variants peft+inductor runlora floor --criterions flops roofline" in out
    assert "--min_rounds 8" in out and "--no-profile_memory" in out


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--only", "gpt2_*"], "--only 'gpt2_*' matches no point; points: llama3.2-1b_N512_r16_p0"),
        (["--ranks", "0"], "--ranks must be positive integers, got 0"),
        (["--dropouts", "1"], "--dropouts must be in [0, 1), got 1"),
        (["--budget", "0"], "--budget must be positive"),
        (["--variants", "runlora", "floor"], "--variants must include peft+inductor"),
        (["--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
        (["--configs", "absent.json"], "--configs absent.json: no such file"),
        # model_exp's own checks, named by the first point they fail at
        (["--criterions", "speed"],
         "point llama3.2-1b_N512_r16_p0: unknown criterion 'speed'; valid: flops"),
        (["--options", '{"inner": "eager"}'],
         "point llama3.2-1b_N512_r16_p0: --options sets 'inner': use --inner instead"),
        (["--variants", "peft+inductor", "turbo"], "unknown variant 'turbo'"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(shapes, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        shapes.main(["--device", "cpu", "--dry_run", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bf16_is_refused_where_the_cpu_has_no_bf16_gemms(shapes, capsys):
    import torch

    if shapes.bf16_native(torch.device("cpu")):
        assert shapes.main(["--device", "cpu", "--dry_run", "--dtype", "bf16"]) == 0
        return
    with pytest.raises(SystemExit) as exit_info:
        shapes.main(["--device", "cpu", "--dry_run", "--dtype", "bf16"])
    assert exit_info.value.code == 2
    assert "bf16 is not measured here; --force runs it anyway" in capsys.readouterr().err
    assert shapes.main(["--device", "cpu", "--dry_run", "--dtype", "bf16", "--force"]) == 0


# ---------------------------------------------------------------- end to end


def test_a_tiny_point_end_to_end_writes_the_summary(tmp_path):
    out = tmp_path / "shapes"
    command = [
        sys.executable, str(SCRIPT), "--configs", str(write_tiny(tmp_path)), "--seq_lens", "16",
        "--ranks", "4", "--dropouts", "0.05", "--inner", "eager", "--min_rounds", "2",
        "--min_run_time", "0", "--budget", "900", "--device", "cpu", "-o", str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[1/1] tiny_qwen_N16_r4_p0.05: limit" in result.stdout
    markdown = (out / "shapes_summary.md").read_text()
    assert markdown.startswith("# Shape matrix: fp32 on CPU")
    assert "bf16 GEMMs" in markdown and "1 of 1 points measured" in markdown
    assert "| point | layers | N | r | p | variant | floor | runlora (p25–p75) |" in markdown
    default = Options().criterion
    assert f"| tiny_qwen_N16_r4_p0.05 | 1 | 1×16 | 4 | 0.05 | {default} |" in markdown
    with (out / "shapes_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    row = rows[0]
    assert (row["status"], row["variant"], row["dtype"], row["rounds"]) == (
        "ok", f"runlora:{default}", "fp32", "2")
    for key in ("floor_ratio", "ratio", "compile_s_peft_inductor", "compile_s_variant",
                "saved_mb_peft_inductor", "saved_mb_variant", "saved_mb_floor"):
        assert float(row[key]) > 0, key
    assert float(row["ratio_p25"]) <= float(row["ratio"]) <= float(row["ratio_p75"])
    # PEFT keeps a dropped copy of x per dropout site; the floor has no adapters at all
    assert float(row["saved_mb_floor"]) < float(row["saved_mb_peft_inductor"])
    for ext in ("csv", "md", "log"):
        assert (out / "points" / f"tiny_qwen_N16_r4_p0.05.{ext}").exists()
