"""LoRA modules that ran outside every compiled graph, and why: the record the reports carry.

Dynamo records each graph break (`torch._dynamo.utils.graph_break_reasons`: the reason and the
user stack where it happened). A break explains the LoRA modules no graph covered when its user
stack runs through the forward of one of them (peft's DoRA breaks inside each LoRA module), or
through a gradient checkpoint and then the forward of a module holding one (a checkpointed layer
whose body Dynamo refuses runs eagerly, whole: `torch.utils.checkpoint` turns Dynamo off inside).
Known causes carry their remedy or their upstream reason. Everything here is pure: the reasons
and the forwards' code spans come in as data.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

CHECKPOINT_DOC = "docs/lora-forms.md#gradient-checkpointing"
OUTSIDE_DOC = "docs/lora-forms.md#lora-outside-every-compiled-graph"
REMEDY_CONFIG = "skip_fwd_side_effects_in_bwd_under_checkpoint"
CHECKPOINT_REMEDY = (
    "compile with runlora_fx.compile(model), which allows that side effect during the model's "
    f"own calls, or set torch._dynamo.config.{REMEDY_CONFIG} = True (transformers >= 5.25 with "
    "gradient checkpointing; model.config.use_cache = False spares a graph break too)"
)
DORA_BREAK = (
    "peft's DoRA forward graph-breaks in every LoRA module at dequantize_module_weight "
    "(`type(module.weight).__module__`): upstream, no setting avoids it"
)
DORA_IN_CHECKPOINT = (
    "inside a gradient-checkpointed layer that break runs the whole layer eagerly; without "
    "checkpointing only DoRA's own part does"
)
NO_BREAK = (
    "no graph break on their path was recorded: a torch.compiler.disable'd call, a frame Dynamo "
    "skipped or the recompile limit runs code eagerly"
)
SHOWN = 3  # causes named in the warning; the reports hold all


class BreakReason(Protocol):
    """What Dynamo records per graph break (torch._dynamo.output_graph.GraphCompileReason)."""

    reason: str
    user_stack: Sequence[traceback.FrameSummary]


@dataclass(frozen=True)
class CodeSpan:
    """Where a function's code lies: a user-stack frame runs it when file, name and line fit."""

    filename: str
    name: str
    first: int
    last: int

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> CodeSpan | None:
        code = getattr(fn, "__code__", None)
        if code is None:
            return None
        lines = [line for _, _, line in code.co_lines() if line is not None]
        first = min(lines, default=code.co_firstlineno)
        return cls(code.co_filename, code.co_name, first, max(lines, default=first))

    def runs(self, frame: traceback.FrameSummary) -> bool:
        return (frame.filename == self.filename and frame.name == self.name
                and self.first <= (frame.lineno or 0) <= self.last)


def forward_spans(kinds: Iterable[type]) -> frozenset[CodeSpan]:
    """The code of each class's forward along its MRO, and of what a decorator wraps."""
    spans = set()
    for kind in kinds:
        for cls in getattr(kind, "__mro__", ()):
            forward = vars(cls).get("forward")
            if callable(forward):
                spans |= {CodeSpan.of(forward), CodeSpan.of(inspect.unwrap(forward))}
    return frozenset(s for s in spans if s is not None)


@dataclass(frozen=True)
class Cause:
    """One recorded graph break that put LoRA modules outside the graphs."""

    kind: str  # "checkpoint", "dora" or "graph break"
    reason: str  # Dynamo's reason, its first line
    where: str  # the innermost user frame: file:line in function
    remedy: str | None

    def describe(self) -> str:
        if self.kind == "dora":
            return f"{DORA_BREAK}, at {self.where}"
        if self.kind == "checkpoint":
            return f"graph break in a gradient-checkpointed layer: {self.reason}, at {self.where}"
        return f"graph break in a LoRA module's forward: {self.reason}, at {self.where}"


def _short(filename: str) -> str:
    if "site-packages" + os.sep in filename:
        return filename.rsplit("site-packages" + os.sep, 1)[1]
    return os.sep.join(filename.split(os.sep)[-3:])


def _where(frame: traceback.FrameSummary) -> str:
    return f"{_short(frame.filename)}:{frame.lineno} in {frame.name}"


def _is_checkpoint(frame: traceback.FrameSummary) -> bool:
    """A frame that checkpoints: torch.utils.checkpoint itself, a wrapper named for it
    (transformers' forward_with_checkpointing), or a call to it on the frame's current line."""
    text = f"{frame.name} {frame.line or ''}".lower()
    return "checkpoint" in text or frame.filename.endswith(os.path.join("utils", "checkpoint.py"))


def _kind(stack: Sequence[traceback.FrameSummary], own: frozenset[CodeSpan],
          holding: frozenset[CodeSpan]) -> tuple[str | None, bool]:
    """(kind of the break, or None when it does not explain the modules; inside a checkpoint)."""

    def runs(spans: frozenset[CodeSpan], frames: Sequence[traceback.FrameSummary]) -> bool:
        return any(span.runs(frame) for frame in frames for span in spans)

    in_own = runs(own, stack)
    checkpoint = next((i for i, f in enumerate(stack) if _is_checkpoint(f)), None)
    # the checkpoint's body runs one of them, or the call itself sits in a forward holding them
    checkpointed = checkpoint is not None and runs(own | holding, stack[checkpoint:])
    if in_own and any(f.name == "dequantize_module_weight" for f in stack):
        return "dora", checkpointed
    if checkpointed:
        return "checkpoint", True
    return ("graph break" if in_own else None), False


def causes(reasons: Iterable[BreakReason], own: frozenset[CodeSpan],
           holding: frozenset[CodeSpan]) -> tuple[Cause, ...]:
    """The breaks whose user stack runs through the forward of an uncovered LoRA module (`own`),
    or through a checkpoint called in, or running, the forward of one of them or of a module
    holding one (`holding`); each break once (Dynamo records one per frame it unwinds). A
    checkpoint break gets the remedy where Dynamo's own hint names the side-effect setting."""
    found: dict[tuple[str, str, str], Cause] = {}
    for reason in reasons:
        stack = list(reason.user_stack)
        kind, checkpointed = _kind(stack, own, holding) if stack else (None, False)
        if kind is None:
            continue
        text = (reason.reason.strip().splitlines() or ["(no reason given)"])[0]
        remedy = None
        if kind == "checkpoint" and REMEDY_CONFIG in reason.reason:  # Dynamo's own hint
            remedy = CHECKPOINT_REMEDY
        elif kind == "dora" and checkpointed:
            remedy = DORA_IN_CHECKPOINT
        cause = Cause(kind, text, _where(stack[-1]), remedy)
        found.setdefault((cause.kind, cause.reason, cause.where), cause)
    return tuple(found.values())


@dataclass(frozen=True)
class Outside:
    """The accounting of one compiled model: its LoRA modules, those no compiled graph covered
    (they ran eagerly), and the recorded breaks that explain them."""

    lora_modules: int
    paths: tuple[str, ...] = ()
    causes: tuple[Cause, ...] = ()

    def message(self) -> str | None:
        """The one warning, or None when every LoRA module appeared in a compiled graph."""
        if not self.paths:
            return None
        said = "; ".join(c.describe() for c in self.causes[:SHOWN]) or NO_BREAK
        if len(self.causes) > SHOWN:
            said += f"; {len(self.causes) - SHOWN} more in the report"
        remedies = dict.fromkeys(c.remedy for c in self.causes if c.remedy)
        fix = "".join(f"; {remedy}" for remedy in remedies)
        doc = CHECKPOINT_DOC if any(c.kind == "checkpoint" for c in self.causes) else OUTSIDE_DOC
        first = self.paths[0] or "the model itself"
        more = ", …" if len(self.paths) > 1 else ""
        return (f"runlora: {len(self.paths)} of {self.lora_modules} LoRA modules ({first}{more}) "
                f"ran outside every compiled graph ({said}){fix}; see {doc}")

    def record(self) -> dict[str, Any]:
        return {
            "lora_modules": self.lora_modules,
            "outside": list(self.paths),
            "causes": [dataclasses.asdict(c) for c in self.causes],
            "warning": self.message(),
        }
