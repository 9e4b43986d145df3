"""The package as installed: one top-level package, `runlora_fx`, with `passes/` inside it as
`runlora_fx.passes`; and its layers as folders, imports going one way only:

    ir (plans and what runs them)  <  cost, passes  <  choice (the choose stage)
    <  report  <  the top (backend.py, options.py, explainer.py, coverage.py, weight_guard.py,
    stack_refresh.py, compile_model.py)

A module imports only its own layer or lower ones (cost and passes not each other), so `ir`
imports nothing above it and `report` is imported only by the top; there is no import circle.
"""

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
LAYERS = ("ir", "cost", "passes", "choice", "report")  # the folders
RANK = {"ir": 0, "cost": 1, "passes": 1, "choice": 2, "report": 3, "top": 4}
# the stages' driver, explain(), the model's accounting, the weight guard, the persistent
# stacks' refresh, the options and runlora_fx.compile
TOP = {"runlora_fx", "runlora_fx.backend", "runlora_fx.explainer", "runlora_fx.coverage",
       "runlora_fx.weight_guard", "runlora_fx.stack_refresh", "runlora_fx.options",
       "runlora_fx.compile_model"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((REPO / "runlora_fx").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((REPO / "passes").glob("*.py")):
        name = "runlora_fx.passes" if path.stem == "__init__" else f"runlora_fx.passes.{path.stem}"
        found[name] = path
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "top"


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
        elif isinstance(node, ast.ImportFrom) and (node.module or node.level):
            module = node.module or ""
            if node.level:  # relative: resolve against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if not module.startswith("runlora_fx"):
                continue
            # `from runlora_fx.report import document` imports the submodule
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


def test_every_module_is_in_a_layer_folder_or_on_top():
    top = {m for m in _modules() if layer(m) == "top"}
    assert top == TOP, top ^ TOP


def test_no_module_imports_a_layer_above_its_own():
    graph = import_graph()
    upward = [(a, b) for a, b in graph.edges
              if layer(a) != layer(b) and RANK[layer(b)] >= RANK[layer(a)]]
    assert not upward, upward


def test_ir_imports_nothing_above_it():
    graph = import_graph()
    assert all(layer(b) == "ir" for a, b in graph.edges if layer(a) == "ir")


def test_report_is_imported_only_by_the_top():
    graph = import_graph()
    users = {a for a, b in graph.edges if layer(b) == "report" and layer(a) != "report"}
    assert users and all(layer(u) == "top" for u in users), users


def test_only_the_top_imports_the_passes():
    graph = import_graph()
    users = {a for a, b in graph.edges if layer(b) == "passes" and layer(a) != "passes"}
    assert users and all(layer(u) == "top" for u in users), users


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
    installed = {"runlora_fx/passes/" + p.name if p.parent.name == "passes" else
                 p.relative_to(REPO).as_posix() for p in _modules().values()}
    assert installed <= set(names), installed - set(names)  # every layer's folder


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
