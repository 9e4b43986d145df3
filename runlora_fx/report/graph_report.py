"""What happened to one compiled graph, as it happens: the live record the backend fills stage by
stage (document.py turns it into the sites.json document)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from runlora_fx.ir.site import SkippedSite
from runlora_fx.report.outside import Outside

if TYPE_CHECKING:
    from runlora_fx.choice.criteria import Decision


@dataclass
class GraphReport:
    """What happened to one compiled graph; the partitioned graphs arrive as they compile.

    `stages` lists the backend's stages (find, choose, rewrite, tag, compile) as they finished;
    `failure` names the stage and exception when a stage of runlora's own raised and the graph
    was compiled as plain torch.compile would compile it. `lora_modules` counts the compiled
    model's LoRA modules (None when the model was not found); `outside` is the model's
    accounting of those no compiled graph covered, shared by all its reports once settled
    (coverage.py)."""

    graph_id: int
    decisions: list[Decision] = field(default_factory=list)
    skipped: list[SkippedSite] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. an infeasible memory budget
    lora_modules: int | None = None  # the compiled model's LoRA-like modules, all its graphs
    outside: Outside | None = None
    stages: list[str] = field(default_factory=list)
    failure: str | None = None
    parameter_inputs: tuple[bool, ...] = ()  # per graph input: is it an nn.Parameter
    # re-checks of a merged site's W that changed after compiling (weight_guard.py)
    merge_rechecks: list[str] = field(default_factory=list)
    # bytes of the persistent stacks (copies of frozen W's joined with A or s·B) the chosen
    # plans hold across steps (runlora_fx/ir/stacks.py)
    stack_bytes: int = 0
    forward: fx.GraphModule | None = None
    backward: fx.GraphModule | None = None
    # called as f("forward" | "backward", gm) when a partitioned graph arrives (the debug dump)
    on_partition: list[Callable[[str, fx.GraphModule], None]] = field(
        default_factory=list, repr=False, compare=False
    )
    # called as f(outside) when the model's accounting is settled (the debug dump)
    on_outside: list[Callable[[Outside], None]] = field(
        default_factory=list, repr=False, compare=False
    )

    @classmethod
    def for_inputs(cls, graph_id: int, example_inputs: Sequence[Any]) -> GraphReport:
        """A fresh report; parameters among the inputs are told apart for the saved-set checks."""
        return cls(
            graph_id=graph_id,
            parameter_inputs=tuple(isinstance(t, torch.nn.Parameter) for t in example_inputs),
        )

    @property
    def sites_rewritten(self) -> int:
        return sum(len(d.sites) for d in self.decisions)

    def settle(self, outside: Outside) -> None:
        self.outside = outside
        for listener in self.on_outside:
            listener(outside)
