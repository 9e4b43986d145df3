"""The benchmark CLI `experiments/model_exp.py`: end to end on a tiny Llama, argument checks, and
the statistics behind the table.

The end-to-end run compiles two tiny graphs with Inductor (PEFT+Inductor and the floor) and
runs runlora with its eager inner compiler: about half a minute on two cores. The argument
checks call `main` in-process with the run stubbed out, so nothing builds or compiles.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_script
from runlora_fx.options import Options

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "model_exp.py"
TARGETS = ["q_proj", "v_proj", "k_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "use_cache": False,
    "tie_word_embeddings": False,
}
VARIANTS = ["peft", "peft+inductor", "runlora:flops", "floor"]
LABELS = ["PEFT", "PEFT+Inductor", "RunLoRA (flops)", "Floor+Inductor"]


def load_cli():
    return load_script(SCRIPT, "model_exp")


def write_tiny(folder: Path, name: str = "tiny.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(TINY))
    return path


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    config = write_tiny(folder)
    out = folder / "res_1.3b"  # a dot in the prefix must not be taken for a suffix
    command = [
        sys.executable, str(SCRIPT), "-m", str(config), "--n_batch", "2", "--seq_len", "16",
        "-r", "4", "--dtype", "fp32", "--target_modules", *TARGETS, "--criterions", "flops",
        "--inner", "eager", "--min_run_time", "1", "--min_rounds", "3", "-o", str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    return result, out


def test_e2e_exits_cleanly_and_prints_the_table(e2e):
    result, _ = e2e
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "| Implementation | F-B loop, ms (median) |" in out
    for column in ("Speedup vs PEFT, %", "Speedup vs PEFT+Inductor, %", "Memory saved, MB",
                   "LoRA overhead recovered, %", "Memory for F-B loop, MB"):
        assert column in out
    for label in LABELS:
        assert f"| {label} |" in out
    assert "7 sites rewritten" in out  # runlora really ran through the backend
    assert "First-step losses of the LoRA variants agree" in out


def test_e2e_writes_csv_with_a_row_per_variant(e2e):
    result, out = e2e
    assert result.returncode == 0, result.stderr[-3000:]
    with Path(f"{out}.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["variant"] for row in rows] == VARIANTS
    by_variant = {row["variant"]: row for row in rows}
    for row in rows:
        assert float(row["median_ms"]) > 0
        assert float(row["p25_ms"]) <= float(row["median_ms"]) <= float(row["p75_ms"])
        assert int(row["rounds"]) >= 3
        assert float(row["saved_activations_mb"]) > 0
        assert row["model"].endswith("tiny.json") and row["lora_r"] == "4"
        assert (row["dtype"], row["adapter_dtype"], row["options"]) == ("fp32", "fp32", "")
    assert float(by_variant["peft"]["speedup_vs_peft_pct"]) == 0.0
    assert float(by_variant["peft+inductor"]["speedup_vs_peft_inductor_pct"]) == 0.0
    assert by_variant["runlora:flops"]["sites_rewritten"] == "7"
    # no adapters, no h: the floor saves less for backward than PEFT
    assert float(by_variant["floor"]["memory_saved_mb"]) > 0


def test_e2e_writes_markdown_and_chart(e2e):
    result, out = e2e
    assert result.returncode == 0, result.stderr[-3000:]
    markdown = Path(f"{out}.md").read_text()
    assert markdown.startswith("### tiny b=2 s=16 r=4 fp32 on cpu")
    assert sum(f"| {label} |" in markdown for label in LABELS) == len(LABELS)
    assert Path(f"{out}.png").read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------- arguments


class RunCalled(Exception):
    """Raised by the stubbed run: the arguments passed validation."""


@pytest.fixture
def cli(monkeypatch):
    module = load_cli()

    def refuse(args):
        raise RunCalled(args)

    monkeypatch.setattr(module, "run", refuse)
    return module


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dtype", "fp64"], "--dtype 'fp64' is not supported; choose one of fp32, bf16, fp16"),
        (["-r", "0"], "--lora_r must be a positive integer, got 0"),
        (["--lora_r", "-8"], "--lora_r must be a positive integer, got -8"),
        (["--n_batch", "0"], "--n_batch must be a positive integer"),
        (["--target_modules"], "--target_modules: expected at least one argument"),
        (["--target_modules", ""], "--target_modules is empty"),
        (["--target_modules", "qproj"], "--target_modules qproj match no module"),
        (["--criterions", "speed"], "unknown criterion 'speed'; valid: flops, priced"),
        (["--variants", "peft", "turbo"], "unknown variant 'turbo'; valid: peft, peft+inductor"),
        (["--variants", "runlora:speed"], "unknown criterion 'speed' in variant 'runlora:speed'"),
        (["-d", "1.5"], "--lora_dropout must be in [0, 1), got 1.5"),
        (["-a", "0"], "--lora_alpha must be positive"),
        (["--inner", "tvm"], "argument --inner: invalid choice: 'tvm'"),
        (["--time_limit", "0"], "--time_limit must be positive"),
        (["--dtype", "fp32", "--adapter_dtype", "bf16"],
         "--adapter_dtype bf16 does not go with --dtype fp32: PEFT keeps adapters in fp32 or in "
         "the base model's dtype; choose --adapter_dtype fp32"),
        (["--adapter_dtype", "fp16"], "--adapter_dtype fp16 does not go with --dtype fp32"),
        (["--dtype", "bf16", "--adapter_dtype", "fp16"],
         "--adapter_dtype fp16 does not go with --dtype bf16: PEFT keeps adapters in fp32 or in "
         "the base model's dtype; choose --adapter_dtype fp32 (PEFT's default) or bf16"),
        (["--dtype", "fp16", "--adapter_dtype", "bf16"],
         "--adapter_dtype bf16 does not go with --dtype fp16"),
        (["--adapter_dtype", "fp64"], "argument --adapter_dtype: invalid choice: 'fp64'"),
        (["--options", "{merge_rounding: stochastic}"], "--options is not valid JSON"),
        (["--options", ""], "--options is not valid JSON"),
        (["--options", '["memory_budget", 0.5]'],
         "--options must be a JSON object of runlora option names to values, not list"),
        (["--options", "0.5"], "--options must be a JSON object"),
        (["--options", '{"no_such_option": 1}'],
         "--options: runlora: unknown option(s) 'no_such_option'"),
        (["--options", '{"memory_budget": -1}'],
         "--options: runlora: option memory_budget=-1 is not valid"),
        (["--options", '{"criterion": "flops"}'],
         "--options sets 'criterion': use --criterions instead"),
        (["--options", '{"inner": "eager"}'], "--options sets 'inner': use --inner instead"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(cli, tmp_path, capsys, extra, message):
    config = write_tiny(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["-m", str(config), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_config_exits_2(cli, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["-m", str(tmp_path / "absent.json")])
    assert exit_info.value.code == 2
    assert "is neither a config file nor a model in the local HF cache" in capsys.readouterr().err


def test_bad_arguments_exit_2_as_a_process(tmp_path):
    config = write_tiny(tmp_path)
    command = [sys.executable, str(SCRIPT), "-m", str(config), "--criterions", "speed"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2
    assert "usage:" in result.stderr and "unknown criterion 'speed'" in result.stderr


def test_every_criterion_is_accepted_and_runlora_expands(cli, tmp_path):
    import runlora_fx

    config = write_tiny(tmp_path)
    criteria = list(runlora_fx.CRITERIA)
    with pytest.raises(RunCalled) as called:
        cli.main(["-m", str(config), "--criterions", *criteria, "--variants", "floor", "runlora"])
    args = called.value.args[0]
    assert args.variants == ["floor", *(f"runlora:{c}" for c in criteria)]
    assert args.seq_len == TINY["max_position_embeddings"]  # the seed's default: the config's


def test_no_arguments_run_the_cpu_default_job(cli):
    with pytest.raises(RunCalled) as called:
        cli.main([])
    args = called.value.args[0]
    assert Path(args.model_name_or_config).name == "llama_20m.json"
    assert (args.n_batch, args.seq_len, args.lora_r, args.dtype) == (4, 256, 8, "fp32")
    assert args.target_modules == TARGETS and args.criterions == [Options().criterion]
    assert args.variants == ["peft", "peft+inductor", f"runlora:{Options().criterion}", "floor"]
    assert args.min_run_time == 60
    assert args.out.endswith("llama_20m_b4_s256_r8_fp32")
    assert args.adapter_dtype == "fp32" and args.runlora_options == {}


# ---------------------------------------------------------------- precision and options


@pytest.mark.parametrize(
    ("extra", "adapter", "tag", "label"),
    [
        ([], "fp32", "fp32", "fp32"),
        (["--adapter_dtype", "fp32"], "fp32", "fp32", "fp32"),
        (["--dtype", "bf16"], "fp32", "bf16", "bf16 (fp32 adapters)"),  # PEFT's default
        (["--dtype", "bf16", "--adapter_dtype", "fp32"], "fp32", "bf16", "bf16 (fp32 adapters)"),
        (["--dtype", "bf16", "--adapter_dtype", "bf16"], "bf16", "bf16-adapters-bf16",
         "bf16 (bf16 adapters)"),  # pure bf16
        (["--dtype", "fp16"], "fp32", "fp16", "fp16 (fp32 adapters)"),
        (["--dtype", "fp16", "--adapter_dtype", "fp16"], "fp16", "fp16-adapters-fp16",
         "fp16 (fp16 adapters)"),
    ],
)
def test_adapter_dtype_defaults_to_peft_and_names_the_outputs(
    cli, tmp_path, capsys, extra, adapter, tag, label
):
    config = write_tiny(tmp_path)
    with pytest.raises(RunCalled) as called:
        cli.main(["-m", str(config), "--device", "cpu", *extra])
    args = called.value.args[0]
    assert args.adapter_dtype == adapter
    assert args.out == str(Path("bench-out") / f"tiny_b10_s64_r8_{tag}")
    assert f"# tiny b=10 s=64 r=8 {label} on cpu" in capsys.readouterr().out


def test_options_reach_every_runlora_variant_and_no_other(cli, tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    from bench_lib import Variant, compile_variant

    config = write_tiny(tmp_path)
    with pytest.raises(RunCalled) as called:
        cli.main(["-m", str(config), "--criterions", "flops", "roofline", "--inner", "eager",
                  "--options", '{"memory_budget": 0.5}'])
    args = called.value.args[0]
    assert args.runlora_options == {"memory_budget": 0.5}
    for criterion in ("flops", "roofline"):  # torch.compile is lazy: nothing compiles here
        _, backend = compile_variant(Variant(f"runlora:{criterion}"), torch.nn.Linear(2, 2),
                                     args.inner, args.runlora_options)
        assert backend.options.memory_budget == 0.5
        assert (backend.options.criterion, backend.options.inner) == (criterion, "eager")
    _, none = compile_variant(Variant("peft+inductor"), torch.nn.Linear(2, 2), args.inner,
                              args.runlora_options)
    assert none is None


def lora_dtypes(model: torch.nn.Module, lora: bool) -> set[torch.dtype]:
    return {p.dtype for name, p in model.named_parameters() if ("lora_" in name) == lora}


def test_bf16_builds_peft_default_fp32_adapters_and_adapter_dtype_bf16_is_pure(cli, tmp_path):
    """The models the CLI builds (its own helper, no compile) for --dtype bf16."""
    sys.path.insert(0, str(SCRIPT.parent))
    from bench_lib import make_floor

    config = write_tiny(tmp_path)

    def build(*extra):
        with pytest.raises(RunCalled) as called:
            cli.main(["-m", str(config), "--device", "cpu", "--dtype", "bf16", *extra])
        return cli.build_models(called.value.args[0], torch.device("cpu"))

    base, default = build()
    _, pure = build("--adapter_dtype", "bf16")
    # PEFT's default (autocast_adapter_dtype=True): bf16 base, fp32 lora_A/lora_B
    assert lora_dtypes(default, lora=False) == {torch.bfloat16}
    assert lora_dtypes(default, lora=True) == {torch.float32}
    # --adapter_dtype bf16: everything bf16
    assert lora_dtypes(pure, lora=False) == lora_dtypes(pure, lora=True) == {torch.bfloat16}
    # the same weights: the pure model's are the default's, rounded to bf16
    pure_params = dict(pure.named_parameters())
    for name, param in default.named_parameters():
        assert torch.equal(param.to(torch.bfloat16), pure_params[name]), name
    # PEFT casts the fp32 branch back: the step's activations stay bf16
    ids = torch.randint(0, TINY["vocab_size"], (1, 8))
    with torch.no_grad():
        assert default(input_ids=ids).logits.dtype == torch.bfloat16
    # the floor is the very same bf16 base the PEFT model was built on
    floor = make_floor(base, TARGETS)
    floor_params = dict(floor.named_parameters())
    assert {p.dtype for p in floor_params.values()} == {torch.bfloat16}
    peft_base = {name.replace(".base_layer", ""): p
                 for name, p in default.get_base_model().named_parameters() if "lora_" not in name}
    assert set(peft_base) == set(floor_params) - {"runlora_grad_anchor.zero"}
    for name, param in peft_base.items():
        assert torch.equal(param, floor_params[name]), name


# ---------------------------------------------------------------- statistics


def fake_runner(name: str, times_ms: list[float], saved_mb: float):
    sys.path.insert(0, str(SCRIPT.parent))
    from bench_lib import Runner, Variant

    runner = Runner(Variant(name), step=lambda: None, storages=set())
    runner.times = [t / 1e3 for t in times_ms]
    runner.saved_bytes = int(saved_mb * 2**20)
    return runner


def test_rows_use_paired_ratios_and_overhead_recovered():
    sys.path.insert(0, str(SCRIPT.parent))
    from bench_report import markdown_table, rows_for

    # Round 2 is a machine-wide slow-down: paired ratios cancel it, medians of times do not.
    runners = [
        fake_runner("peft", [120, 240, 120], 10),
        fake_runner("peft+inductor", [100, 200, 100], 10),
        fake_runner("runlora:flops", [95, 190, 95], 9),
        fake_runner("floor", [90, 180, 90], 8),
    ]
    rows = {row["variant"]: row for row in rows_for(runners, "cpu")}
    runlora = rows["runlora:flops"]
    assert runlora["ratio_vs_peft_inductor"] == pytest.approx(0.95)
    assert runlora["speedup_vs_peft_pct"] == pytest.approx((1 - 95 / 120) * 100)
    assert runlora["overhead_recovered_pct"] == pytest.approx(50.0)
    assert runlora["memory_saved_mb"] == pytest.approx(1.0)
    assert rows["peft"]["overhead_recovered_pct"] == pytest.approx(-200.0)
    table = markdown_table(list(rows.values()))
    row = (
        "| RunLoRA (flops) | 95.00 | 95.00–142.50 | 9.00 | +20.8 | +5.0 | 0.950 (0.950–0.950)"
        " | 1.00 | +50.0 | - |"
    )
    assert row in table
    assert "| Floor+Inductor |" in table and table.count("\n") == 5


def test_rows_without_baselines_show_dashes():
    sys.path.insert(0, str(SCRIPT.parent))
    from bench_report import markdown_table, rows_for

    rows = rows_for([fake_runner("runlora:flops", [95, 96], 9)], "cpu")
    line = markdown_table(rows).splitlines()[-1]
    assert line.startswith("| RunLoRA (flops) | 95.50 |") and line.count(" - ") == 6


def test_time_limit_keeps_a_reserve_for_the_rounds():
    sys.path.insert(0, str(SCRIPT.parent))
    import time

    from bench_lib import TimeLimit

    limit = TimeLimit(100.0, start=time.perf_counter())
    assert limit.fits_compile(60.0)  # 40 s left after it, more than the 15 s reserve
    assert not limit.fits_compile(90.0)
    assert TimeLimit(None).fits_compile(1e9) and TimeLimit(None).left() == float("inf")
    spent = TimeLimit(10.0, start=time.perf_counter() - 20.0)
    assert spent.left() < 0 and not spent.fits_compile(0.0)
