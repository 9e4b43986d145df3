"""The package as installed: one top-level package, `runlora_fx`, with `passes/` inside it as
`runlora_fx.passes`; imports that go one way (no circle; the passes use the core, and only the
backend's top — backend.py, explainer.py, coverage.py — uses the passes)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import networkx as nx
import pytest
import torch
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
# the stages' driver, explain(), and the model's accounting both of them call
TOP = ("runlora_fx.backend", "runlora_fx.explainer", "runlora_fx.coverage")


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in ((REPO / "runlora_fx", "runlora_fx"),
                            (REPO / "passes", "runlora_fx.passes")):
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def _runtime_imports(path: Path, package: str) -> set[str]:
    """Modules of runlora_fx that `path` imports when it runs (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("runlora_fx")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
            if node.level:  # relative: resolve against the package
                module = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                  + [module])
            if not module.startswith("runlora_fx"):
                continue
            # `from runlora_fx import records` imports the submodule runlora_fx.records
            subs = {f"{module}.{a.name}" for a in node.names}
            found |= subs if any(s in _modules() for s in subs) else {module}
    return found


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        graph.add_node(name)
        for target in _runtime_imports(path, package):
            if target in modules and target != name:
                graph.add_edge(name, target)
    return graph


def test_no_import_circle():
    graph = import_graph()
    # the package __init__ re-exports the public API: it imports, nothing imports it
    cycles = list(nx.simple_cycles(graph.subgraph(n for n in graph if n != "runlora_fx")))
    assert not cycles, cycles


def test_only_the_top_imports_the_passes():
    graph = import_graph()
    users = {a for a, b in graph.edges if b.startswith("runlora_fx.passes")}
    core = {u for u in users if not u.startswith("runlora_fx.passes")}
    assert core <= {*TOP}, core
    for module in graph:
        if module.startswith("runlora_fx.passes"):
            assert not any(b in TOP for b in graph.successors(module)), module


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(folder), str(REPO)],
        check=True, capture_output=True, cwd=folder,
    )
    [built] = folder.glob("runlora_fx-*.whl")
    return built


def test_the_wheel_holds_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"runlora_fx"}
    assert "runlora_fx/passes/find_sites.py" in names
    assert not [n for n in names if n.startswith("passes/")]


def test_the_metadata_admits_the_tested_torch_and_caps_none(wheel):
    """torch is a minimum (pip must not replace the user's torch): 2.11 as released, as a
    vendor's pre-release build of 2.11 and as a CUDA build, the running torch and newer ones."""
    archive = zipfile.ZipFile(wheel)
    [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = archive.read(name)
    requires = [Requirement(line.split(":", 1)[1].strip())
                for line in metadata.decode().splitlines() if line.startswith("Requires-Dist:")]
    [torch_req] = [r for r in requires if r.name == "torch"]
    for version in ("2.11.0", "2.11.0a0+gitabc1234", "2.11.0+cu130", str(torch.__version__),
                    "2.14.0", "2.15.0+cu130"):
        assert torch_req.specifier.contains(version, prereleases=True), version
    assert not torch_req.specifier.contains("2.10.1", prereleases=True)


def test_installing_the_wheel_changes_no_installed_torch(wheel, tmp_path):
    """What pip would do to this environment (its torch 2.13 included): install runlora-fx and
    nothing else. No index is read: a resolver that wanted another torch would fail here."""
    report = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-q", "--report",
         str(report), str(wheel)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    if run.returncode:
        # where the installed torch's own requirements are unmet already (a worktree venv that
        # reads another venv's packages behind an older setuptools, say), no resolution without
        # an index can succeed; `make env`'s venv meets them, and there this must pass
        check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True,
                               text=True)
        unmet = [line for line in check.stdout.splitlines() if line.startswith("torch ")]
        if unmet:
            pytest.skip(f"the installed torch's own requirements are unmet: {unmet}")
        pytest.fail(run.stderr)
    installs = json.loads(report.read_text())["install"]
    assert [i["metadata"]["name"] for i in installs] == ["runlora-fx"]
