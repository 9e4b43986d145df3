"""Backend options: parsed once per torch.compile call, refused loudly when unknown."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from runlora_fx.ir.rounding import Rounding

CRITERION_NAMES = ("flops", "priced", "memory", "roofline", "time")  # choice/criteria.py: CRITERIA
INNER_COMPILERS = ("inductor", "eager")
DROPOUT_MODES = ("auto", "sparse", "graph")
STRICT_ENV = "RUNLORA_STRICT"


@dataclass(frozen=True)
class Options:
    criterion: str = "priced"
    inner: str = "inductor"
    debug_dir: str | None = None  # debug dump folder; None: $RUNLORA_DEBUG_DIR; "": no dump
    cache_dir: str | None = None  # measurement cache; None: $RUNLORA_CACHE_DIR or the user's
    # total saved bytes of the sites: bytes (int) or a fraction of eager PEFT's (float)
    memory_budget: int | float | None = None
    merge_rounding: str = "nearest"  # how a merged 16-bit W_eff is rounded: or "stochastic"
    fusions: bool = True  # plans that share a GEMM (x·[W;A]ᵀ, q/k/v groups) are candidates
    # where a LoRA dropout's D(x) comes from: "sparse" (plans draw the dropped positions),
    # "graph" (the graph's own dropout), "auto" (sparse unless Inductor's fallback_random)
    dropout: str = "auto"
    strict: bool | None = None  # raise instead of falling back; None: $RUNLORA_STRICT == "1"

    @property
    def rounding(self) -> Rounding:
        return Rounding(self.merge_rounding)

    def sparse_dropout(self, fallback_random: bool) -> bool:
        """Whether plans may draw their own dropped positions. Under "auto" not when
        `torch._inductor.config.fallback_random` asks compiled random ops to match eager's:
        only the graph's own dropout draws eager's masks."""
        return self.dropout == "sparse" or (self.dropout == "auto" and not fallback_random)


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
    for key in ("debug_dir", "cache_dir"):
        if options.get(key) is not None:
            if not isinstance(options[key], (str, os.PathLike)):
                raise ValueError(f"runlora: option {key}={options[key]!r} is not a path")
            options[key] = os.fspath(options[key])
    for key in ("fusions", "strict"):
        if key in options and not isinstance(options[key], bool):
            raise ValueError(f"runlora: option {key}={options[key]!r} is not valid; give True "
                             "or False")
    if options.get("strict") is None:
        options["strict"] = os.environ.get(STRICT_ENV, "") == "1"
    parsed = Options(**options)
    _check_choice("criterion", parsed.criterion, CRITERION_NAMES)
    _check_choice("inner", parsed.inner, INNER_COMPILERS)
    _check_choice("merge_rounding", parsed.merge_rounding, tuple(r.value for r in Rounding))
    _check_choice("dropout", parsed.dropout, DROPOUT_MODES)
    _check_budget(parsed.memory_budget)
    return parsed


def _check_budget(budget: object) -> None:
    valid = budget is None or (
        (isinstance(budget, int) and not isinstance(budget, bool) and budget >= 0)
        or (isinstance(budget, float) and budget > 0 and math.isfinite(budget))
    )
    if not valid:
        raise ValueError(
            f"runlora: option memory_budget={budget!r} is not valid; give bytes as an int >= 0 "
            "or a fraction of eager PEFT's saved bytes at the LoRA sites as a float > 0 "
            "(e.g. 0.5)"
        )
