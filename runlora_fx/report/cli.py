"""`python -m runlora_fx.report PATH`: print the table of a runlora debug dump.

PATH is a graph folder (holding sites.json), a sites.json file, or any folder above graph
folders (a debug_dir, or a tree of them copied off another machine): every sites.json under it
is printed, in path order. Nothing is compiled and no device is needed.

`python -m runlora_fx.report` runs `__main__.py`, which calls `main` here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from runlora_fx.report.document import SCHEMA_VERSION
from runlora_fx.report.render import render

SITES_JSON = "sites.json"


def find_documents(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / SITES_JSON).is_file():
        return [path / SITES_JSON]
    return sorted(path.rglob(SITES_JSON))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runlora_fx.report",
        description="Print the decisions recorded in a runlora debug dump (sites.json).",
    )
    parser.add_argument("path", type=Path, help="a graph folder, a sites.json, or a debug_dir")
    path = parser.parse_args(argv).path
    if not path.exists():
        print(f"runlora report: {path} does not exist", file=sys.stderr)
        return 2
    found = find_documents(path)
    if not found:
        print(f"runlora report: no {SITES_JSON} in {path} or in any folder under it",
              file=sys.stderr)
        return 2
    for i, file in enumerate(found):
        doc = json.loads(file.read_text(encoding="utf-8"))
        if doc.get("schema_version", 0) > SCHEMA_VERSION:
            print(f"runlora report: {file} has schema {doc['schema_version']}, newer than this "
                  f"runlora-fx reads ({SCHEMA_VERSION}); fields may be missing", file=sys.stderr)
        title = file.parent.name if file.name == SITES_JSON else file.name
        print(("\n" if i else "") + f"# {file.parent}\n")
        print(render(doc, title=f"runlora {title}"), end="")
    return 0
