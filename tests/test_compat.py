"""The tested torch range, checked at the backend's first use: one warning outside it (an error
under strict), quiet inside it; versions outside are given as strings, the running torch is
never patched."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from runlora_fx.ir.compat import TESTED_RANGE, check_torch, release, untested_torch

INSIDE = ["2.11.0", "2.11.0+cu130", "2.11.0a0+gitabc1234", "2.12.1", "2.13.0+cpu"]
OUTSIDE = ["2.10.1", "2.14.0", "2.14.0.dev20260301+cu130", "2.15.0", "3.0.0", "1.13.1"]


@pytest.fixture(autouse=True)
def _fresh_check():
    """check_torch warns once per process and version: each test starts without that memory."""
    check_torch.cache_clear()
    yield
    check_torch.cache_clear()


def test_release_reads_major_and_minor():
    assert release("2.13.0+cpu") == (2, 13)
    assert release("2.11.0a0+gitabc1234") == (2, 11)
    assert release("2.14.0.dev20260301") == (2, 14)
    with pytest.raises(ValueError, match="cannot read a torch release"):
        release("nightly")


@pytest.mark.parametrize("version", INSIDE + [pytest.param(str(torch.__version__), id="running")])
def test_quiet_inside_the_range(version, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        with caplog.at_level(logging.WARNING, logger="runlora_fx"):
            assert untested_torch(version) is None
            check_torch(version, False)
            check_torch(version, True)  # strict: no error inside the range
    assert not caplog.records


@pytest.mark.parametrize("version", OUTSIDE)
def test_one_warning_outside_the_range(version, caplog):
    with caplog.at_level(logging.WARNING, logger="runlora_fx"):
        with pytest.warns(RuntimeWarning) as caught:
            check_torch(version, False)
            check_torch(version, False)  # a second graph, a recompile: no second warning
    [warning] = caught.list
    text = str(warning.message)
    assert f"torch {version} " in text and TESTED_RANGE in text and "strict=True" in text
    assert [r.getMessage() for r in caplog.records if r.name == "runlora_fx"] == [text]


@pytest.mark.parametrize("version", ["2.10.1", "2.14.0"])
def test_strict_raises_outside_the_range_every_time(version):
    for _ in range(2):
        with pytest.raises(RuntimeError, match=f"torch {version} is outside the range"):
            check_torch(version, True)


def test_the_backend_checks_the_running_torch_at_its_first_call():
    """Compiling with the backend consults the check with the running torch (quiet here:
    the suite runs inside the tested range, strict via $RUNLORA_STRICT)."""
    compiled = torch.compile(lambda x: torch.nn.functional.linear(x, x), backend="runlora",
                             options={"inner": "eager"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled(torch.randn(4, 4))
    assert check_torch.cache_info().currsize == 1  # (running version, strict)
    assert untested_torch(str(torch.__version__)) is None
