"""The measuring criteria ("time", "roofline"), their on-disk cache, the memory budget and
dynamic shapes: real measurements on this machine, real compiles, real partitioned graphs."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runlora_fx
from conftest import PlainCompile, assert_grads_match, peft_llama, twin
from runlora_fx.choice.budget import decided_bytes, knapsack
from runlora_fx.choice.chooser import Chooser
from runlora_fx.choice.criteria import CRITERIA, counted_candidates, pick
from runlora_fx.cost.cache import MeasurementCache
from runlora_fx.cost.cost import step_costs
from runlora_fx.cost.partitioned import saved_activation_bytes
from runlora_fx.cost.roofline import DeviceModel, predicted_seconds
from runlora_fx.ir import operands as ops
from runlora_fx.ir.plans import plans_for
from runlora_fx.ir.program import program_for
from runlora_fx.ir.site import Adapter, LoraSite, SiteGroup
from runlora_fx.ir.steps import Step

REPO = Path(__file__).resolve().parent.parent


def site(n: int = 64, d_in: int = 32, d_out: int = 48, r: int = 4,
         x_grad: bool = True) -> SiteGroup:
    """One site, as the planning unit it is alone."""
    adapter = Adapter(r, 0.0, 2.0, True, True)
    return SiteGroup((LoraSite("s", n, d_in, d_out, (adapter,), torch.float32, False, False,
                               x_grad, True),))


# ---- the "time" criterion and its cache --------------------------------------------------------

CHOOSE_IN_A_FRESH_PROCESS = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from runlora_fx.choice.chooser import Chooser
from runlora_fx.ir.site import Adapter, LoraSite, SiteGroup
site = LoraSite("s", 64, 32, 48, (Adapter(4, 0.0, 2.0, True, True),), torch.float32,
                False, False, True, True)
decision = Chooser("time", sys.argv[1]).choose(SiteGroup((site,)))
print("CHOSEN", decision.chosen.plan.describe(), repr(decision.chosen.seconds))
"""


def run_chooser(cache_dir: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", CHOOSE_IN_A_FRESH_PROCESS, str(cache_dir)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_second_process_reuses_the_timings(tmp_path):
    first, second = run_chooser(tmp_path), run_chooser(tmp_path)
    assert "runlora: timing" in first
    assert "runlora: timing" not in second  # no re-measurement
    chosen = [line for line in first.splitlines() if line.startswith("CHOSEN")]
    assert chosen == [line for line in second.splitlines() if line.startswith("CHOSEN")]
    assert len(list(tmp_path.rglob("timing-*.json"))) == 1


def test_corrupt_and_foreign_cache_files_are_ignored_with_a_warning(tmp_path):
    chooser = Chooser("time", tmp_path)
    first = chooser.choose(site())
    [path] = tmp_path.rglob("timing-*.json")
    path.write_text("{ not json")
    with pytest.warns(RuntimeWarning, match="ignoring cache file"):
        again = Chooser("time", tmp_path).choose(site())
    assert again.chosen.plan in plans_for(site())
    json.loads(path.read_text())  # re-measured and rewritten whole
    entry = json.loads(path.read_text())
    entry["key"]["n"] = 9999  # a file whose key is another site's
    path.write_text(json.dumps(entry))
    with pytest.warns(RuntimeWarning, match="stored key is not the key"):
        Chooser("time", tmp_path).choose(site())
    assert first.chosen.seconds is not None


def _write_many(root: str, value: int) -> None:
    cache = MeasurementCache(Path(root), torch.device("cpu"))
    for i in range(40):
        cache.put("timing", {"k": 1}, {"writer": value, "i": i, "pad": "x" * 20000})


def test_concurrent_writers_leave_one_whole_entry(tmp_path):
    ctx = multiprocessing.get_context("fork")  # torch is imported: forking is quick
    writers = [ctx.Process(target=_write_many, args=(str(tmp_path), v)) for v in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
        assert w.exitcode == 0
    value = MeasurementCache(tmp_path, torch.device("cpu")).get("timing", {"k": 1})
    assert value["writer"] in range(4) and value["i"] == 39
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_unwritable_cache_dir_warns_and_training_goes_on(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a cache dir below a file cannot be created, even by root
    model = peft_llama(layers=1)
    eager = twin(model)
    ids = torch.randint(0, 128, (2, 16))
    backend = runlora_fx.Backend(
        {"inner": "eager", "criterion": "time", "cache_dir": str(blocker / "cache")}
    )
    with pytest.warns(RuntimeWarning, match="cannot write the measurement cache"):
        torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss.backward()
    eager(input_ids=ids, labels=ids).loss.backward()
    assert_grads_match(eager, model, 1e-5)


@pytest.mark.parametrize("criterion", ["time", "roofline"])
def test_measuring_criteria_compile_to_the_same_grads(tmp_path, criterion):
    model = peft_llama(layers=1)
    eager = twin(model)
    ids = torch.randint(0, 128, (2, 16))
    backend = runlora_fx.Backend(
        {"inner": "eager", "criterion": criterion, "cache_dir": str(tmp_path),
         "debug_dir": str(tmp_path / "dump")}
    )
    loss = torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss
    loss.backward()
    expected = eager(input_ids=ids, labels=ids).loss
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert_grads_match(eager, model, 1e-5)
    [dump] = (tmp_path / "dump").glob("graph_*/sites.json")
    doc = json.loads(dump.read_text())
    assert doc["totals"]["sites_rewritten"] == 7
    for record in doc["sites"]:  # every eligible candidate carries the seconds it was judged by
        eligible = [c for c in record["candidates"] if not c["over_memory_cap"]]
        assert all(c["seconds"] > 0 for c in eligible)
        assert record["chosen"]["seconds"] == min(c["seconds"] for c in eligible)


# ---- roofline ----------------------------------------------------------------------------------


def test_roofline_of_a_thin_matmul_is_its_bytes_over_bandwidth():
    thin = site(n=4096, d_in=4096, d_out=4096, r=4)
    model = DeviceModel(peak_flops=1e12, bandwidth=1e11)
    h = Step("h0.0", "mm", (ops.X, ops.lora_a(0, 0)), (False, True))
    [cost] = [c for c in step_costs(program_for(plans_for(thin)[0], thin), thin)
              if c.step.args == h.args and c.step.transpose == h.transpose][:1]
    flops = 2 * 4096 * 4096 * 4  # 0.134 ms at 1 TFLOP/s
    moved = (4096 * 4096 + 4 * 4096 + 4096 * 4) * 4  # 0.672 ms at 100 GB/s: memory-bound
    assert (cost.flops, cost.bytes_moved) == (flops, moved)
    assert model.seconds(cost.flops, cost.bytes_moved) == pytest.approx(moved / 1e11)


def roofline_choice(s: SiteGroup, model: DeviceModel):
    candidates = [
        type(c)(c.plan, c.cost, predicted_seconds(program_for(c.plan, s), s, model))
        for c in counted_candidates(s)
    ]
    return pick(s, "roofline", candidates).chosen


def test_roofline_follows_flops_when_compute_bound_and_bytes_when_memory_bound():
    compute_bound, memory_bound = DeviceModel(1e9, 1e30), DeviceModel(1e30, 1e9)
    differ = 0
    for n, d, r in itertools.product((16, 256, 1024), (256, 1024), (4, 64)):
        s = site(n=n, d_in=d, d_out=d, r=r)
        cap = pick(s, "flops", counted_candidates(s)).memory_cap
        eligible = [c for c in counted_candidates(s) if c.cost.saved_bytes <= cap]
        fastest = roofline_choice(s, compute_bound)
        assert fastest.cost.flops == min(c.cost.flops for c in eligible)
        leanest = roofline_choice(s, memory_bound)
        assert leanest.cost.bytes_moved == min(c.cost.bytes_moved for c in eligible)
        differ += leanest.plan != pick(s, "flops", counted_candidates(s)).chosen.plan
    assert differ  # on some shapes FLOPs alone pick a plan that moves more bytes


# ---- memory budget -----------------------------------------------------------------------------


def brute_force(options, budget):
    best_key = None
    for picks in itertools.product(*(range(len(o)) for o in options)):
        if sum(options[i][j][1] for i, j in enumerate(picks)) > budget:
            continue
        key = tuple(map(sum, zip(*(options[i][j][0] for i, j in enumerate(picks)))))
        if best_key is None or key < best_key:
            best_key = key
    return best_key


def test_knapsack_is_exact():
    rng = random.Random(0)
    for _ in range(200):
        options = [
            [((rng.randint(0, 9), rng.randint(0, 9)), rng.choice((0, 3, 5, 8)))
             for _ in range(rng.randint(1, 4))]
            for _ in range(rng.randint(1, 5))
        ]
        budget = rng.randint(0, 25)
        picks = knapsack(options, budget)
        expected = brute_force(options, budget)
        if expected is None:
            assert picks is None
        else:
            assert sum(options[i][j][1] for i, j in enumerate(picks)) <= budget
            assert tuple(map(sum, zip(*(options[i][j][0] for i, j in enumerate(picks))))) == expected


@pytest.mark.parametrize("budget", [0, 0.5, 3.0])
def test_memory_budget_holds_on_the_partitioned_graphs(budget):
    model = peft_llama(layers=1)
    ids = torch.randint(0, 128, (2, 40))
    plain, ours = PlainCompile(), runlora_fx.Backend({"inner": "eager", "memory_budget": budget})
    torch.compile(twin(model), backend=plain)(input_ids=ids, labels=ids).loss.backward()
    torch.compile(model, backend=ours)(input_ids=ids, labels=ids).loss.backward()
    [p], [r] = plain.reports, ours.reports
    reference = sum(d.reference.cost.saved_bytes for d in r.decisions)
    decided = sum(decided_bytes(d.chosen, d.unit) for d in r.decisions)
    peft_h = sum(2 * 40 * 4 * 4 for _ in r.decisions)  # eager PEFT keeps one N×r h per site
    limit = budget if isinstance(budget, int) else int(budget * peft_h)
    assert decided <= limit and not r.warnings
    chosen = sum(d.chosen.cost.saved_bytes for d in r.decisions)
    saved_plain = saved_activation_bytes(p.forward, p.backward, p.parameter_inputs)
    saved_ours = saved_activation_bytes(r.forward, r.backward, r.parameter_inputs)
    assert saved_plain - saved_ours == reference - chosen  # the graphs save what plans say
    if budget == 3.0:  # room to spare: "flops" keeps a W_eff where it saves FLOPs
        assert chosen > reference


# ---- dynamic shapes ----------------------------------------------------------------------------


def count_graphs(backend, model, lengths) -> int:
    compiled = torch.compile(model, backend=backend)
    for length in lengths:
        ids = torch.randint(0, 128, (2, length))
        compiled(input_ids=ids, labels=ids).loss.backward()
    return len(backend.reports)


def test_cycling_lengths_compile_once_more_per_crossover_at_most():
    lengths = [(64, 96, 128, 192, 256)[i % 5] for i in range(30)]
    model = peft_llama(layers=1)
    plain = PlainCompile()
    plain_graphs = count_graphs(plain, twin(model), lengths)
    torch._dynamo.reset()
    ours = runlora_fx.Backend({"inner": "eager"})
    graphs = count_graphs(ours, model, lengths)
    # crossovers the run meets: lengths between which some site's choice changes
    chooser = Chooser("flops")
    sites = {d.site.path: SiteGroup((d.site,))
             for report in ours.reports for d in report.decisions}
    ns = sorted({2 * length for length in lengths})
    crossovers = sum(
        any(chooser.choose(s.with_n(a)).chosen.plan != chooser.choose(s.with_n(b)).chosen.plan
            for s in sites.values())
        for a, b in zip(ns, ns[1:])
    )
    assert plain_graphs == 2  # static, then dynamic
    assert graphs <= plain_graphs + crossovers
    symbolic = [d for r in ours.reports for d in r.decisions if d.site.n_symbolic]
    assert symbolic and all(d.n_range and d.n_range[0] <= d.site.n <= d.n_range[1]
                            for d in symbolic)


# ---- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [True, -1, "half", 0.0, float("nan"), float("inf")])
def test_bad_memory_budgets_are_refused(bad):
    with pytest.raises(ValueError, match="memory_budget"):
        runlora_fx.Backend({"memory_budget": bad})


def test_every_criterion_is_an_option():
    for criterion in CRITERIA:
        runlora_fx.Backend({"criterion": criterion})
    with pytest.raises(ValueError, match="cache_dir"):
        runlora_fx.Backend({"cache_dir": 3})
