"""What runlora takes from its surroundings: the torch release (the tested range, checked when
the backend is first used, and the one API that moved between the releases of that range: a
SymInt's hint) and the folder it keeps its files in (read when asked, never at import)."""

from __future__ import annotations

import functools
import logging
import os
import re
import warnings
from pathlib import Path

import torch

log = logging.getLogger("runlora_fx")

# Tested: 2.11 (the GPU image, where the GPU check runs) up to 2.13 (the whole suite, on CPU).
# pyproject.toml asks for torch>=2.11 only: a newer torch usually works, and a cap in the
# metadata would make pip replace a user's torch. A new minor joins here once the suite passes.
TESTED_FROM = (2, 11)  # lowest tested (major, minor)
TESTED_BELOW = (2, 14)  # first (major, minor) not tested
TESTED_RANGE = "{}.{} <= torch < {}.{}".format(*TESTED_FROM, *TESTED_BELOW)


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string: '2.13.0+cpu' → (2, 13). A pre-release or a
    vendor build counts as its minor ('2.11.0a0+git…' → (2, 11))."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"runlora: cannot read a torch release from version {version!r}")
    return int(match[1]), int(match[2])


def untested_torch(version: str) -> str | None:
    """The message for a torch outside the tested range; None inside it."""
    if TESTED_FROM <= release(version) < TESTED_BELOW:
        return None
    return (f"runlora: torch {version} is outside the range runlora-fx is tested on "
            f"({TESTED_RANGE}); it usually works, but check its results "
            "(options strict=True makes this an error)")


@functools.cache
def check_torch(version: str, strict: bool) -> None:
    """Raise (strict) or warn, once, when torch `version` is outside the tested range.

    Once per process and version: `functools.cache` remembers a call that returned, so the
    string backend, which builds a `Backend` per graph, warns once rather than at every graph
    and recompile. A strict call raises every time (a raise is not cached)."""
    message = untested_torch(version)
    if message is None:
        return
    if strict:
        raise RuntimeError(message)
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)


def size_hint(dim: int | torch.SymInt) -> int:
    """The size Dynamo traced with, for planning only (no guard). torch 2.13 names this
    `optimization_hint`; older releases (2.11, on the GPU image) read the shape env's hint."""
    if not isinstance(dim, torch.SymInt):
        return int(dim)
    try:
        from torch.fx.experimental.symbolic_shapes import optimization_hint
    except ImportError:
        node = dim.node
        return int(node.hint if node.hint is not None else node.shape_env.size_hint(node.expr))
    return int(optimization_hint(dim))


CACHE_ENV = "RUNLORA_CACHE_DIR"


def default_cache_dir() -> Path:
    """Where runlora keeps measurements and compiled kernels: $RUNLORA_CACHE_DIR, else the user
    cache dir ($XDG_CACHE_HOME or ~/.cache)/runlora_fx."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "runlora_fx"
