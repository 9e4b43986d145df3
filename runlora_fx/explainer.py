"""`runlora_fx.explain`: what the backend would decide for a model, without compiling it.

Dynamo traces the model exactly as `torch.compile(model, backend="runlora")` would (same entry,
same config, same graphs), but the backend behind it only finds and plans the sites: no rewrite,
no AOTAutograd, no Inductor, no backward. Each graph then runs as Dynamo captured it, eagerly,
once, under the caller's grad mode — which is what makes its `requires_grad` flags, and so the
choices, those of a training step.

Explaining leaves no trace on later compiles of the same model: its cache entries live in an
isolated Dynamo region, the automatic-dynamic-shape record of the frame is put back (else a later
compile with other shapes would come out dynamic), and so is the RNG state (dropout draws).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from runlora_fx import coverage
from runlora_fx.backend import chooser_for, find_and_decide
from runlora_fx.choice.criteria import Decision
from runlora_fx.options import parse_options
from runlora_fx.passes.graphs import working_copy
from runlora_fx.report import document, render
from runlora_fx.report.graph_report import GraphReport


class Explanation:
    """The decisions for every graph of one traced call: `print()` it for the table.

    `sites` and `skipped` are the JSON records of `sites.json`, `to_dict()` / `to_json()` the
    whole document (several graphs when the model has graph breaks), `decisions` the Python
    objects, `dynamo_graphs` the captured graphs as readable code, `coverage` the model's LoRA
    modules and those that ran outside every graph, with the graph breaks that explain them.
    """

    def __init__(self, doc: dict[str, Any], reports: Sequence[GraphReport],
                 dynamo_graphs: Sequence[str]) -> None:
        self._document = doc
        self.decisions: list[Decision] = [d for r in reports for d in r.decisions]
        self.dynamo_graphs = list(dynamo_graphs)

    @property
    def sites(self) -> list[dict[str, Any]]:
        return self._document["sites"]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return self._document["skipped"]

    @property
    def totals(self) -> dict[str, Any]:
        return self._document["totals"]

    @property
    def coverage(self) -> dict[str, Any] | None:
        return self._document["coverage"]

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._document)

    def to_json(self) -> str:
        """The JSON text a dump's sites.json would hold for these graphs."""
        return json.dumps(self._document, indent=2, ensure_ascii=False) + "\n"

    def __str__(self) -> str:
        return render.render(self._document, title="runlora explain")

    def __repr__(self) -> str:
        return f"<runlora_fx.Explanation: {render.summary_line(self._document)}>"


@contextlib.contextmanager
def _automatic_dynamic_restored() -> Iterator[None]:
    """Put Dynamo's per-frame record of seen shapes back as it was (it keys on the code object,
    not on the compile call, so the isolated region alone does not protect it), and keep it out
    of a persistent profile-guided (PGO) record when one is configured."""
    from torch._dynamo import pgo

    state = pgo.get_code_state()  # loads a persistent profile first, as a compile would
    saved = copy.deepcopy(dict(state))
    try:
        with torch._dynamo.config.patch(
            automatic_dynamic_local_pgo=False, automatic_dynamic_remote_pgo=False
        ):
            yield
    finally:
        state.clear()
        state.update(saved)


def _initialised_cuda_devices() -> list[int]:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return list(range(torch.cuda.device_count()))


def explain(
    model: Callable[..., Any],
    *args: Any,
    options: Mapping[str, Any] | None = None,
    dynamic: bool | None = None,
    **kwargs: Any,
) -> Explanation:
    """Trace `model(*args, **kwargs)` with Dynamo and report what the runlora backend would do.

    `options` and `dynamic` mean what they mean to `torch.compile(model, backend="runlora",
    options=..., dynamic=...)`; pass the same ones to see the same choices (`criterion`,
    `memory_budget` and `cache_dir` matter here, and `criterion="time"` times plans as the
    backend would; nothing is written to `debug_dir`). The model's forward runs once, eagerly.
    """
    parsed = parse_options(options)
    chooser = chooser_for(parsed)
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod  # explain the model, not the compiled wrapper around it
    reports: list[GraphReport] = []
    graph_names: list[str] = []
    dynamo_graphs: list[str] = []
    try:
        ledgers = coverage.untracked_ledgers(model, args, kwargs)
    except Exception as error:  # noqa: BLE001 — as the backend: reported only when strict
        coverage.contained(parsed.strict, "finding the model", error)
        ledgers = []

    def plan_only(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        report = GraphReport.for_inputs(len(reports), example_inputs)
        try:
            coverage.record(ledgers, gm, example_inputs, report)
        except Exception as error:  # noqa: BLE001 — as the backend: never fails the trace
            coverage.contained(parsed.strict, "recording a graph", error)
        try:
            find_and_decide(working_copy(gm), report, parsed, chooser, example_inputs)
        except Exception as error:  # noqa: BLE001 — as the backend: reported, not raised
            if parsed.strict:
                raise
            report.failure = f"find/choose: {type(error).__name__}: {error}"
            report.decisions = []
        reports.append(report)
        graph_names.append(document.graph_name(report))
        dynamo_graphs.append(gm.print_readable(print_output=False))
        return gm.forward

    with (
        _automatic_dynamic_restored(),
        torch.random.fork_rng(devices=_initialised_cuda_devices()),
    ):
        traced = torch.compile(model, backend=plan_only, dynamic=dynamic, isolate_recompiles=True)
        traced(*args, **kwargs)
    try:  # the forward is complete: every graph of the call is known
        for _, ledger in ledgers:
            ledger.account(coverage.dynamo_break_reasons())
    except Exception as error:  # noqa: BLE001 — as the backend: reported only when strict
        coverage.contained(parsed.strict, "settling", error)
    doc = document.document(zip(graph_names, reports), parsed.criterion)
    return Explanation(doc, reports, dynamo_graphs)
