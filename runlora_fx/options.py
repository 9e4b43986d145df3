"""Backend options: parsed once per torch.compile call, refused loudly when unknown."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from runlora_fx.choose import CRITERIA

INNER_COMPILERS = ("inductor", "eager")


@dataclass(frozen=True)
class Options:
    criterion: str = "flops"
    inner: str = "inductor"
    debug_dir: str | None = None  # debug dump folder; None: $RUNLORA_DEBUG_DIR; "": no dump


def _check_choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(
            f"runlora: option {key}={value!r} is not valid; choose one of {', '.join(valid)}"
        )


def parse_options(options: Mapping[str, Any] | None) -> Options:
    """Options from the dict given as `torch.compile(..., options=...)`."""
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(
            f"runlora: options must be a dict of option names to values, not {options!r}"
        )
    options = dict(options or {})
    known = tuple(f.name for f in fields(Options))
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"runlora: unknown option(s) {', '.join(map(repr, unknown))}; "
            f"valid options are {', '.join(known)}"
        )
    if options.get("debug_dir") is not None:
        if not isinstance(options["debug_dir"], (str, os.PathLike)):
            raise ValueError(f"runlora: option debug_dir={options['debug_dir']!r} is not a path")
        options["debug_dir"] = os.fspath(options["debug_dir"])
    parsed = Options(**options)
    _check_choice("criterion", parsed.criterion, tuple(CRITERIA))
    _check_choice("inner", parsed.inner, INNER_COMPILERS)
    return parsed
