"""experiments/gpu_check.sh where no GPU is: it parses, refuses bad arguments before it looks for
a Python, and stops (installing nothing, writing nothing) when no Python's torch sees CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "gpu_check.sh"


def _run(cwd: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(out)], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_an_unknown_configuration_is_refused_first(tmp_path):
    run = _run(REPO, tmp_path / "out", GPU_CHECK_RUNS="llama_7b", PYTHON="/nonexistent/python")
    assert run.returncode == 2
    assert "GPU_CHECK_RUNS='llama_7b' names no configuration" in run.stderr
    assert "llama_60m_b64_r8 llama_60m_b64_r8_d005 llama_250m_b58_r128 llama_1.3b_b24_r512" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="here a Python whose torch sees CUDA exists")
def test_no_cuda_python_stops_before_installing(tmp_path):
    # a checkout with no .venv: the candidates are $PYTHON (this suite's, no CUDA) and python3
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "model_exp.py").touch()
    run = _run(tmp_path, tmp_path / "out", PYTHON=sys.executable)
    assert run.returncode == 2
    assert f"found no Python (tried {sys.executable} python3 .venv/bin/python)" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiments"]  # no out/, no egg-info
