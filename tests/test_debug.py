"""Showing every decision: the debug dump, the log lines, explain() and the report command.

One 2-layer PEFT Llama is explained and then compiled once (module fixture); the dump it writes
is checked against the partitioned graphs that ran. Small hand-written LoRA modules cover
skipped sites, the environment variable and errors.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import runlora_fx
from conftest import ALL_TARGETS, peft_llama
from runlora_fx import Backend
from runlora_fx.report.debug import ENV_VAR, DebugDirError
from runlora_fx.cost.partitioned import saved_tensors
from runlora_fx.report.cli import main as report_main

BATCH, SEQ, R = 2, 40, 4  # peft_llama: hidden 32, intermediate 64, r 4, alpha 8
N = BATCH * SEQ
GRAPH_FILES = (
    "sites.json", "report.md", "before_rewrite.py", "after_rewrite.py",
    "partitioned_forward.py", "partitioned_backward.py",
)
SHAPES = {  # module → (d_in, d_out)
    "q_proj": (32, 32), "k_proj": (32, 32), "v_proj": (32, 32), "o_proj": (32, 32),
    "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32),
}
BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
         "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# one record per site: GEMM sharing off, so that no group joins sites into one record (the
# group records are checked by test_group_plans_are_recorded_with_their_members); the flops
# criterion, whose picks at these tiny shapes include h recomputed and fewer FLOPs than PEFT's
UNSHARED = {"fusions": False, "criterion": "flops"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Explain, then compile and run one training step, of the same 2-layer PEFT Llama."""
    torch._dynamo.reset()
    model = peft_llama(layers=2)
    ids = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    dump = tmp_path_factory.mktemp("dump")

    start = time.perf_counter()
    explanation = runlora_fx.explain(model, input_ids=ids, labels=ids, options=UNSHARED)
    explain_s = time.perf_counter() - start
    grads_after_explain = [n for n, p in model.named_parameters() if p.grad is not None]

    logger, handler = logging.getLogger("runlora_fx"), ListHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    backend = Backend({"debug_dir": str(dump), "inner": "eager", **UNSHARED})
    try:
        with torch._functorch.config.patch(enable_autograd_cache=False):
            start = time.perf_counter()
            torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss.backward()
            compile_s = time.perf_counter() - start
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    torch._dynamo.reset()
    [report] = backend.reports
    folder = dump / "graph_000"
    return SimpleNamespace(
        explanation=explanation, explain_s=explain_s, compile_s=compile_s,
        grads_after_explain=grads_after_explain, report=report, dump=dump, folder=folder,
        doc=json.loads((folder / "sites.json").read_text(encoding="utf-8")),
        log=handler.records,
    )


def expected_paths() -> dict[str, str]:
    """path → module name, for the 14 adapted linears."""
    return {
        f"base_model.model.model.layers.{layer}.{BLOCK[name]}.{name}": name
        for layer in range(2) for name in ALL_TARGETS
    }


def test_dump_has_one_folder_with_every_stage(llama):
    assert [p.name for p in llama.dump.iterdir()] == ["graph_000"]
    for name in GRAPH_FILES:
        assert (llama.folder / name).stat().st_size > 0, name
    before = (llama.folder / "before_rewrite.py").read_text()
    after = (llama.folder / "after_rewrite.py").read_text()
    assert "lora_a" in before.lower() and "runlora_" not in before
    assert "runlora_13" in after
    assert "tangents_1" in (llama.folder / "partitioned_backward.py").read_text()


def test_sites_json_records_every_site_with_shapes_and_candidates(llama):
    doc = llama.doc
    assert doc["schema_version"] == 2 and doc["criterion"] == "flops"
    assert doc["skipped"] == [] and len(doc["graphs"]) == 1
    paths = expected_paths()
    assert sorted(s["path"] for s in doc["sites"]) == sorted(paths)
    for site in doc["sites"]:
        d_in, d_out = SHAPES[paths[site["path"]]]
        assert (site["n"], site["n_symbolic"]) == (N, None)
        assert (site["d_in"], site["d_out"]) == (d_in, d_out)
        assert site["adapters"] == [{"r": R, "dropout_p": 0.0, "scale": 2.0,
                                     "a_requires_grad": True, "b_requires_grad": True,
                                     "own_dropout": True}]
        assert site["dtype"] == "float32" and site["training"] and not site["has_bias"]
        assert len(site["candidates"]) >= 2
        for candidate in site["candidates"]:
            assert set(candidate["cost"]) >= {"flops", "bytes_moved", "saved_bytes"}
            assert candidate["describe"] and candidate["plan"]["forward"] in ("SPLIT", "MERGED")
        [chosen] = [c for c in site["candidates"] if c["chosen"]]
        assert {k: chosen[k] for k in ("describe", "plan", "cost")} == site["chosen"]
        assert site["reference"]["plan"]["forward"] == "SPLIT"
    # layer 0's attention reads the frozen embeddings: no dx there, and the record says so
    assert not next(s for s in doc["sites"] if s["path"].endswith("0.self_attn.q_proj"))[
        "x_requires_grad"]
    totals = doc["totals"]
    counts = (totals["sites_found"], totals["sites_rewritten"], totals["sites_skipped"])
    assert counts == (14, 14, 0)
    for key in ("flops", "bytes_moved", "saved_bytes"):
        assert totals["after"][key] == sum(s["chosen"]["cost"][key] for s in doc["sites"])
        assert totals["before"][key] == sum(s["reference"]["cost"][key] for s in doc["sites"])
    assert totals["change_pct"]["saved_bytes"] < 0


def test_reported_plans_are_what_the_partitioned_graphs_do(llama):
    """Count, from sites.json alone, the N×r and d_out×d_in tensors the chosen plans put in the
    forward and the saved set; the partitioned graphs must hold exactly those."""
    report, sites = llama.report, llama.doc["sites"]
    plans = [s["chosen"]["plan"] for s in sites]
    assert any(p["hidden"] == "RECOMPUTE" for p in plans), "nothing to check: no recompute h"
    saved = [t for t in saved_tensors(report.forward, report.backward, report.parameter_inputs)
             if not t.is_parameter]
    forward_mms = [tuple(n.meta["val"].shape) for n in report.forward.graph.nodes
                   if n.target == torch.ops.aten.mm.default]
    computes_h = sum(p["forward"] == "SPLIT" or p["hidden"] == "SAVE" for p in plans)
    assert forward_mms.count((N, R)) == computes_h
    assert sum(t.shape == (N, R) for t in saved) == sum(p["hidden"] == "SAVE" for p in plans)
    kept = [s for s in sites if s["chosen"]["plan"]["input_grad"] == "MERGED_KEEP"]
    weff_shapes = {(s["d_out"], s["d_in"]) for s in sites}
    assert sum(t.shape in weff_shapes for t in saved) == len(kept)


def test_report_md_has_a_row_per_site_and_the_totals(llama):
    text = (llama.folder / "report.md").read_text(encoding="utf-8")
    for site in llama.doc["sites"]:
        [row] = [line for line in text.splitlines() if f"| {site['path']} |" in line]
        assert site["chosen"]["describe"] in row
    assert "14 LoRA sites found: 14 rewritten, 0 skipped" in text
    assert "| saved for backward |" in text and "%" in text


def test_one_info_line_per_graph_and_debug_lines_per_site(llama):
    info = [r.getMessage() for r in llama.log if r.levelno == logging.INFO]
    debug = [r.getMessage() for r in llama.log if r.levelno == logging.DEBUG]
    assert len(info) == 1
    assert "14 LoRA sites found, 14 rewritten, 0 skipped; FLOPs -" in info[0]
    assert "saved bytes -" in info[0] and str(llama.folder) in info[0]
    assert len(debug) == 14 and all(" site base_model." in line for line in debug)


def test_the_library_is_quiet_by_default():
    logger = logging.getLogger("runlora_fx")
    assert all(isinstance(h, logging.NullHandler) for h in logger.handlers)
    assert logger.propagate and logger.level == logging.NOTSET


def test_explain_gives_the_compiled_choices_faster(llama):
    explanation, report = llama.explanation, llama.report
    assert explanation.decisions == report.decisions
    assert [s["chosen"]["describe"] for s in explanation.sites] == [
        s["chosen"]["describe"] for s in llama.doc["sites"]
    ]
    as_json = json.loads(explanation.to_json())
    for doc in (as_json, llama.doc):  # equal up to Dynamo's compile ids
        doc.pop("graphs")
        for site in doc["sites"]:
            site.pop("graph")
    assert as_json == llama.doc
    assert str(explanation).count("| base_model.model.model.layers.") == 14
    assert llama.grads_after_explain == []  # no training step
    assert llama.explain_s < llama.compile_s, (llama.explain_s, llama.compile_s)


def test_report_command_prints_the_table(llama):
    run = subprocess.run(
        [sys.executable, "-m", "runlora_fx.report", str(llama.dump)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "RuntimeWarning" not in run.stderr
    assert "graph_000" in run.stdout and "Totals over the rewritten sites" in run.stdout
    for site in llama.doc["sites"]:
        assert f"| {site['path']} |" in run.stdout


def test_report_command_refuses_a_folder_without_a_dump(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "no sites.json" in capsys.readouterr().err


# ---- small hand-written LoRA modules -----------------------------------------------------------


class LoraLinear(torch.nn.Module):
    """`base(x) + s·B(A(D(x)))`; `leak` also uses the LoRA intermediate A(x) outside the site."""

    def __init__(self, d_in: int, d_out: int, r: int = 2, p: float = 0.0, leak: bool = False):
        super().__init__()
        self.base = torch.nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A = torch.nn.Linear(d_in, r, bias=False)
        self.lora_B = torch.nn.Linear(r, d_out, bias=False)
        torch.nn.init.normal_(self.lora_B.weight)
        self.dropout = torch.nn.Dropout(p)
        self.leak = leak

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_A(self.dropout(x))
        y = self.base(x) + self.lora_B(h) * 2.0
        return y + h.mean() if self.leak else y


class TwoSites(torch.nn.Module):
    def __init__(self, p: float = 0.0, leak: bool = False):
        super().__init__()
        self.first = LoraLinear(16, 24, p=p)
        self.second = LoraLinear(24, 16, p=p, leak=leak)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


def step(model: torch.nn.Module, backend: object, n: int = 64, **compile_kw: object) -> None:
    torch.compile(model, backend=backend, **compile_kw)(torch.randn(n, 16)).sum().backward()


def test_an_unsupported_site_is_skipped_with_its_reason(tmp_path):
    model = TwoSites(leak=True)
    step(model, Backend({"debug_dir": tmp_path, "inner": "eager"}))
    folder = tmp_path / "graph_000"
    doc = json.loads((folder / "sites.json").read_text(encoding="utf-8"))
    assert [s["path"] for s in doc["sites"]] == ["first"]
    [skipped] = doc["skipped"]
    assert skipped["path"] == "second"
    assert "LoRA intermediate" in skipped["reason"] and "outside the site" in skipped["reason"]
    assert f"| 0 | second | {skipped['reason']} |" in (folder / "report.md").read_text()
    assert doc["totals"]["sites_skipped"] == 1
    assert runlora_fx.explain(model, torch.randn(64, 16)).skipped[0]["reason"] == skipped["reason"]


def test_environment_variable_and_the_option_winning_over_it(tmp_path, monkeypatch):
    env, opt = tmp_path / "env", tmp_path / "opt"
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert Backend().debug.root is None
    monkeypatch.setenv(ENV_VAR, str(env))  # read when a backend is made, not at import
    assert Backend().debug.root == env
    assert Backend({"debug_dir": ""}).debug.root is None  # "" turns the dump off

    model = TwoSites()
    step(model, "runlora", options={"inner": "eager"})
    step(model, "runlora", options={"inner": "eager", "debug_dir": str(opt)})
    torch._dynamo.reset()  # else the first compile's cache entry serves the equal backend
    step(model, "runlora", options={"inner": "eager"})  # a second graph: never overwrites
    assert sorted(p.name for p in env.iterdir()) == ["graph_000", "graph_001"]
    assert [p.name for p in opt.iterdir()] == ["graph_000"]
    for folder in (env / "graph_000", env / "graph_001", opt / "graph_000"):
        assert sorted(p.name for p in folder.iterdir()) == sorted(GRAPH_FILES)


def test_an_unwritable_debug_dir_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(DebugDirError, match="cannot write the debug dump to .*a_file.*option"):
        Backend({"debug_dir": blocker / "dump"})
    monkeypatch.setenv(ENV_VAR, str(blocker))
    with pytest.raises(DebugDirError, match=f"set by environment variable {ENV_VAR}"):
        Backend()
    with pytest.raises(Exception, match="cannot write the debug dump"):  # via torch.compile
        step(TwoSites(), "runlora", options={"inner": "eager"})


def test_explain_leaves_no_trace_on_rng_or_later_compiles():
    model = TwoSites(p=0.1)
    torch.manual_seed(0)
    explanation = runlora_fx.explain(model, torch.randn(64, 16))
    drawn = torch.rand(4)
    torch.manual_seed(0)
    torch.randn(64, 16)
    assert torch.equal(drawn, torch.rand(4))  # explain's dropout draws were put back

    assert [s["adapters"][0]["dropout_p"] for s in explanation.sites] == [0.1, 0.1]
    assert all(s["chosen"]["plan"]["forward"] == "SPLIT" for s in explanation.sites)
    backend = Backend({"inner": "eager"})
    step(model, backend, n=48)  # other shapes than explained: still a first, static compile
    assert [d.site.n_symbolic for d in backend.reports[0].decisions] == [None, None]


def test_group_plans_are_recorded_with_their_members():
    """With GEMM sharing on, q/k/v (and gate/up) of a layer are one unit: one record names its
    members, and the totals and the INFO line count the sites inside."""
    model = peft_llama(layers=1)
    ids = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    explanation = runlora_fx.explain(model, input_ids=ids, labels=ids)
    groups = [s for s in explanation.sites if "members" in s]
    assert groups and explanation.totals["groups"] == len(groups)
    assert explanation.totals["sites_rewritten"] == 7 == sum(
        len(s.get("members", [s])) for s in explanation.sites)
    for record in groups:
        paths = [m["path"] for m in record["members"]]
        assert record["path"] == " + ".join(paths) and len(paths) in (2, 3)
        assert record["d_out"] == sum(m["d_out"] for m in record["members"])
        chosen = record["chosen"]["plan"]
        assert chosen["stack_w"] or chosen["group_h"] or chosen["group_da"]
    text = str(explanation)
    assert "7 LoRA sites found: 7 rewritten, 0 skipped, 2 group plans" in text
