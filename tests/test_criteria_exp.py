"""The criteria validation CLI `experiments/criteria_exp.py`: one --quick run end to end, and
argument checks that exit with code 2 before anything is timed.

The end-to-end run times the 4 tiny --quick points (a few seconds on two cores, plus the
imports). Its percentages are a benchmark result, not a property: only the shape of the output
is checked.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import load_script
from runlora_fx.choice.criteria import CRITERIA as CRITERIA_BY_NAME

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "criteria_exp.py"
CRITERIA = list(CRITERIA_BY_NAME)
# the eager-PEFT baseline and the truth measured again (the noise ceiling) come with the criteria
NAMES = [*CRITERIA, "reference", "truth-again"]
QUICK_POINTS = 4


def load_cli():
    return load_script(SCRIPT, "criteria_exp")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("criteria") / "out"
    command = [sys.executable, str(SCRIPT), "--quick", "--truth_budget", "0.02", "--threads", "1",
               "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    return result, out


def score_rows(text: str) -> dict[str, list[str]]:
    """The first summary table's rows by name: points, within, not within, mean, worst."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in NAMES and cells[0] not in rows and len(cells) == 6:
            rows[cells[0]] = cells[1:]
    return rows


def test_quick_run_writes_both_files(quick_run):
    result, out = quick_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 points kept, 0 skipped" in result.stdout
    assert (out / "criteria_summary.md").is_file()
    assert (out / "criteria_points.csv").is_file()


@pytest.mark.parametrize("source", ["stdout", "summary"])
def test_summary_lists_every_criterion_with_counts_that_add_up(quick_run, source):
    result, out = quick_run
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout if source == "stdout" else (out / "criteria_summary.md").read_text()
    rows = score_rows(text)
    assert list(rows) == NAMES
    for name, (points, within, misses, mean, worst) in rows.items():
        hits = re.fullmatch(r"(\d+) \((\d+)%\)", within)
        assert hits, (name, within)
        assert int(points) == QUICK_POINTS
        assert int(hits.group(1)) + int(misses) == QUICK_POINTS, name
        assert (mean == "—") == (misses == "0"), name
        assert re.fullmatch(r"\+\d+\.\d%", worst), (name, worst)


def test_summary_has_header_and_one_row_per_point(quick_run):
    _, out = quick_run
    text = (out / "criteria_summary.md").read_text()
    assert f"torch {torch.__version__}" in text
    assert "--quick --truth_budget 0.02" in text  # the command line
    assert "| point | eligible plans | best plan | best ms | " + " | ".join(NAMES) in text
    assert len(re.findall(r"^\| N\d+_d\d+x\d+_r\d+_fp32 \|", text, flags=re.M)) == QUICK_POINTS


def test_csv_has_every_eligible_plan_one_best_and_each_pick_once(quick_run):
    _, out = quick_run
    with (out / "criteria_points.csv").open() as f:
        rows = list(csv.DictReader(f))
    points = {row["point"] for row in rows}
    assert len(points) == QUICK_POINTS
    for point in points:
        mine = [row for row in rows if row["point"] == point]
        assert len({row["plan"] for row in mine}) == len(mine) > 1
        assert sum(row["best"] == "True" for row in mine) == 1
        assert all(float(row["seconds"]) > 0 and float(row["ratio_to_best"]) >= 1 for row in mine)
        chosen = Counter(name for row in mine for name in row["chosen_by"].split())
        assert chosen == Counter(NAMES), point
        assert all(float(row[f"{name}_seconds"]) > 0 for row in mine
                   for name in ("time", "roofline", "truth_again"))
        again = min(mine, key=lambda row: float(row["truth_again_seconds"]))
        assert "truth-again" in again["chosen_by"].split()  # its pick is its own fastest plan


def test_one_truth_measurement_drops_the_ceiling_row(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--quick", "--truth_budget", "0.01", "--threads", "1",
               "--criterions", "flops", "--truth_repeats", "1", "--truth_sessions", "1",
               "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(score_rows(result.stdout)) == ["flops", "reference"]
    with (out / "criteria_points.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert "truth_again_seconds" not in rows[0]
    assert Counter(name for row in rows for name in row["chosen_by"].split()) == Counter(
        {"flops": QUICK_POINTS, "reference": QUICK_POINTS})


def test_time_limit_stops_the_grid_and_says_so(tmp_path):
    out = tmp_path / "out"  # the first point always runs; none after it fits in 1 ms
    command = [sys.executable, str(SCRIPT), "--quick", "--truth_budget", "0.01", "--threads", "1",
               "--criterions", "flops", "--truth_sessions", "1", "--time_limit", "0.001",
               "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"stopping after 1 of {QUICK_POINTS} points" in result.stdout
    summary = (out / "criteria_summary.md").read_text()
    assert f"stopped by --time_limit 0.001 s after 1 of {QUICK_POINTS} points" in summary
    assert score_rows(summary)["flops"][0] == "1"  # the table covers the one point done
    with (out / "criteria_points.csv").open() as f:
        assert len({row["point"] for row in csv.DictReader(f)}) == 1


@pytest.mark.parametrize("argv", [
    ["--criterions", "flops", "speed"],  # unknown criterion
    ["--dtypes", "fp8"],  # unknown dtype
    ["--truth_budget", "0"],  # non-positive budget
    ["--truth_budget", "nan"],
    ["--ranks", "-4"],
    ["--dims", "1024x"],
    ["--dropout", "1.5"],
    ["--max_mnk", "10"],  # leaves no grid point
    ["--truth_repeats", "3"],
    ["--time_limit", "0"],
])
def test_bad_arguments_exit_2(argv, capsys):
    cli = load_cli()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--quick", *argv])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_cli().main(["--quick", "--device", "cuda", "--dtypes", "bf16"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err
