"""Debug output of the backend: the `runlora_fx` log lines and the per-graph dump folder.

The dump goes to `options={"debug_dir": PATH}`, else to `$RUNLORA_DEBUG_DIR` (read when the
backend is constructed, never at import); `debug_dir=""` turns it off even when the variable is
set. Each compiled graph claims the next free `graph_NNN` folder under it, so graphs, processes
and repeated runs never overwrite each other. A folder holds

    sites.json                what was found, considered and chosen (document.py)
    report.md                 the same as a table
    before_rewrite.py         the Dynamo graph as captured
    after_rewrite.py          the Dynamo graph with each site replaced by its planned call
    partitioned_forward.py    the aten graphs AOTAutograd partitioned, as handed to the inner
    partitioned_backward.py   compiler (the backward arrives at the first backward call)

sites.json and report.md are written again when the model's accounting of LoRA modules outside
every compiled graph is settled (coverage.py; at the first backward).

A directory that cannot be written is an error (`DebugDirError`) when the backend is constructed:
a dump that was asked for and silently missing would be worse than a failed compile.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch.fx as fx

from runlora_fx.report import document, render
from runlora_fx.report.graph_report import GraphReport
from runlora_fx.report.outside import Outside

ENV_VAR = "RUNLORA_DEBUG_DIR"
GRAPH_FOLDER = re.compile(r"graph_(\d+)")

logger = logging.getLogger("runlora_fx")
logger.addHandler(logging.NullHandler())  # quiet unless the application configures logging


class DebugDirError(OSError):
    """The debug dump directory cannot be created or written."""


def resolve_debug_dir(debug_dir: str | None) -> tuple[Path | None, str]:
    """(directory or None, where it came from): the option `debug_dir` wins over the
    environment; "" turns the dump off."""
    if debug_dir is not None:
        return (Path(debug_dir) if debug_dir else None), "option debug_dir"
    from_env = os.environ.get(ENV_VAR)
    return (Path(from_env) if from_env else None), f"environment variable {ENV_VAR}"


def open_debug_dir(path: Path, source: str) -> Path:
    """Create `path` and prove it writable, or raise DebugDirError naming it and its source."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise DebugDirError(
            f"runlora: cannot write the debug dump to {str(path)!r} (set by {source}): "
            f"{err.strerror or err}"
        ) from err
    return path


def claim_graph_folder(root: Path) -> Path:
    """Create and return `root/graph_NNN`, NNN one past the highest existing (race-free)."""
    taken = [int(m.group(1)) for p in root.iterdir() if (m := GRAPH_FOLDER.fullmatch(p.name))]
    index = max(taken, default=-1) + 1
    while True:
        folder = root / f"graph_{index:03d}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # another graph or process got there first
            index += 1


def readable(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, include_device=True)


class GraphDebug:
    """Log lines and dump files of one compiled graph, written as the stages run."""

    def __init__(self, report: GraphReport, criterion: str, folder: Path | None) -> None:
        self.folder = folder
        self.report = report
        self.criterion = criterion
        self.graph = document.graph_name(report)  # the compile id exists only while compiling

    def planned(self, gm: fx.GraphModule) -> None:
        """After choose, before rewrite: log the decisions, write them and the Dynamo graph."""
        if self.folder is None and not logger.isEnabledFor(logging.INFO):
            return
        doc = document.document([(self.graph, self.report)], self.criterion)
        where = f"; dump {self.folder}" if self.folder is not None else ""
        logger.info("%s%s", render.summary_line(doc), where)
        if logger.isEnabledFor(logging.DEBUG):
            for line in render.site_lines(doc):
                logger.debug("%s", line)
        if self.folder is None:
            return
        self._write_document(doc)
        self._write("before_rewrite.py", readable(gm))

    def accounted(self, outside: Outside) -> None:
        """The model's accounting is settled: sites.json and report.md carry it."""
        if self.folder is not None:
            self._write_document(document.document([(self.graph, self.report)], self.criterion))

    def _write_document(self, doc: dict) -> None:
        assert self.folder is not None
        self._write("sites.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        self._write("report.md", render.render(doc, title=f"runlora {self.folder.name}"))

    def rewritten(self, gm: fx.GraphModule) -> None:
        if self.folder is not None:
            self._write("after_rewrite.py", readable(gm))

    def partitioned(self, kind: str, gm: fx.GraphModule) -> None:
        """Called by the recording inner compiler with kind "forward" or "backward"."""
        if self.folder is not None:
            self._write(f"partitioned_{kind}.py", readable(gm))

    def _write(self, name: str, text: str) -> None:
        assert self.folder is not None
        (self.folder / name).write_text(text, encoding="utf-8")


class DebugOutput:
    """Per backend: where dumps go; `start` begins the debug output of one graph."""

    def __init__(self, debug_dir: str | None, criterion: str) -> None:
        path, source = resolve_debug_dir(debug_dir)
        self.root = open_debug_dir(path, source) if path is not None else None
        self.criterion = criterion

    def start(self, report: GraphReport, gm: fx.GraphModule) -> GraphDebug:
        folder = claim_graph_folder(self.root) if self.root is not None else None
        graph = GraphDebug(report, self.criterion, folder)
        if folder is not None:
            report.on_partition.append(graph.partitioned)
            report.on_outside.append(graph.accounted)
        graph.planned(gm)
        return graph

