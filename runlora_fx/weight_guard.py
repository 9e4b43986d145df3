"""When a frozen W changes after compiling: the guard that keeps a merge check's verdict true.

The verdict on merging at a 16-bit site was read from W's values at compile time
(merge_check.py). A compiled graph whose chosen plans merge under a check watches those W's:
before each call it compares, per W, the tensor passed in (or held) with the one checked —
identity, autograd's version counter (bumped by every in-place write: `load_state_dict`,
`copy_` under no_grad) and its storage pointer (`param.data = …`). On a change it re-runs the
check on the new W: a pass is recorded in the report (`merge_rechecks`) and training goes on; a
refusal raises `StaleMergeCheck`, naming the site and the figures (recompile:
`torch.compiler.reset()`, then call the model again). In-place writes through `.data` bypass
the version counter and are not seen (docs/precision.md).
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from runlora_fx.ir.merge_check import check_site
from runlora_fx.ir.rounding import Rounding
from runlora_fx.report.graph_report import GraphReport
from runlora_fx.ir.site import LoraSite

log = logging.getLogger("runlora_fx")


class StaleMergeCheck(RuntimeError):
    """A W that a merged plan was chosen for changed, and the check now refuses merging."""


@dataclass
class Watched:
    """A checked W that a chosen merged plan runs with, as it was last checked."""

    site: LoraSite
    index: int | None
    ref: weakref.ref
    version: int
    data_ptr: int

    @classmethod
    def of(cls, site: LoraSite, index: int | None, tensor: torch.Tensor) -> Watched:
        """`tensor` as checked; `index`: the graph input it is passed as (None: held by the
        graph as a constant)."""
        return cls(site, index, weakref.ref(tensor), tensor._version, tensor.data_ptr())

    def current(self, args: Sequence[Any]) -> torch.Tensor | None:
        return args[self.index] if self.index is not None else self.ref()

    def changed(self, t: torch.Tensor) -> bool:
        return t is not self.ref() or t._version != self.version or t.data_ptr() != self.data_ptr


def recheck(watched: Watched, tensor: torch.Tensor, rounding: Rounding,
            report: GraphReport) -> None:
    """Re-run the site's check on its new W: a pass is recorded, a refusal raises."""
    verdict = check_site(watched.site, tensor, rounding)
    if not verdict.legal:
        raise StaleMergeCheck(
            f"runlora: the frozen W of site {watched.site.path} changed after compiling, and a "
            f"merged plan runs there: {verdict.reason}. Recompile (torch.compiler.reset(), then "
            "call the model again): the new compile plans that site without merging")
    note = f"{watched.site.path}: W changed after compiling; {verdict.describe()}"
    report.merge_rechecks.append(note)
    log.info("runlora: %s", note)
    watched.ref, watched.version = weakref.ref(tensor), tensor._version
    watched.data_ptr = tensor.data_ptr()


def guard(compiled: Callable, watched: list[Watched], rounding: Rounding,
          report: GraphReport) -> Callable:
    """`compiled`, checking the watched W's before each call (nothing to watch: as it is)."""
    if not watched:
        return compiled

    @functools.wraps(compiled)  # keeps its attributes: Dynamo calls it as it would `compiled`
    def run(*args: Any) -> Any:
        for w in watched:
            t = w.current(args)
            if t is not None and w.changed(t):
                recheck(w, t, rounding, report)
        return compiled(*args)

    return run
