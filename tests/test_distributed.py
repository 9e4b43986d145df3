"""Multi-process training on CPU (gloo, 2 ranks, 127.0.0.1 only): DDP with Dynamo's per-bucket
graph splitting, and FSDP2. Workers are spawned processes joined with a deadline and killed
after it, so a hung collective cannot hang the suite."""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import runlora_fx
from conftest import grads, peft_llama, rel_err
from runlora_fx.passes.cut_sites import CUT_REASON

WORLD = 2
DEADLINE_S = 150  # the whole 2-rank run; a healthy one takes a fraction of it
BATCH, SEQ = 4, 16  # the full batch; each rank gets BATCH // WORLD rows


def full_batch() -> torch.Tensor:
    return torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def build_model() -> torch.nn.Module:
    return peft_llama(layers=2, hidden=256, r=64, lora_alpha=64)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _step(kind: str, rank: int) -> dict:
    """Compile `kind` (ddp or fsdp2) around a fresh model, one step on this rank's shard."""
    torch._dynamo.reset()
    model = build_model()  # seeded: the same weights on every rank
    shard = full_batch().chunk(WORLD)[rank]
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # 1 MB buckets: the LoRA parameters (2.2 MB) span three, so Dynamo's DDP optimizer
        # splits the graph and calls the backend once per piece. (Smaller caps fail in torch
        # itself: its DDPOptimizer asserts that the 1 MB first bucket is <= the others.)
        wrapped = DistributedDataParallel(model, bucket_cap_mb=1)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    backend = runlora_fx.Backend({"inner": "eager"})
    compiled = torch.compile(wrapped, backend=backend)
    compiled(input_ids=shard, labels=shard).loss.backward()
    result = {
        "grads": {},
        "graphs": len(backend.reports),
        "sites": [s.path for r in backend.reports for d in r.decisions for s in d.sites],
        "skipped": [(s.path, s.reason) for r in backend.reports for s in r.skipped],
        # the model's accounting (coverage.py): settled at the backward, the same in every report
        "outside": [None if r.outside is None else (r.outside.lora_modules, list(r.outside.paths))
                    for r in backend.reports],
    }
    for name, param in model.named_parameters():
        if param.grad is not None:
            grad = param.grad
            if hasattr(grad, "full_tensor"):  # FSDP2: a sharded DTensor, gathered
                grad = grad.full_tensor()
            result["grads"][name] = grad.detach().clone()
    dist.barrier()
    return result


def _worker(rank: int, port: int, out: str) -> None:
    """One rank: a DDP step then an FSDP2 step; rank 0 saves both results."""
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
            timeout=timedelta(seconds=60),
        )
        results = {kind: _step(kind, rank) for kind in ("ddp", "fsdp2")}
        if rank == 0:
            torch.save(results, out)
        dist.destroy_process_group()
    except BaseException:
        Path(f"{out}.rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_ranks(tmp_path: Path) -> dict:
    """Start the ranks, join them by the deadline (killing stragglers); rank 0's result, or
    RuntimeError with the first rank's traceback."""
    out = str(tmp_path / "ranks.pt")
    ctx = mp.get_context("spawn")
    port = free_port()
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        procs = [ctx.Process(target=_worker, args=(rank, port, out), daemon=True)
                 for rank in range(WORLD)]
        for proc in procs:
            proc.start()
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    deadline = time.monotonic() + DEADLINE_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [proc for proc in procs if proc.is_alive()]
    for proc in hung:
        proc.kill()
        proc.join(5)
    errors = sorted(tmp_path.glob("ranks.pt.rank*.err"))
    if errors:
        raise RuntimeError(errors[0].read_text())
    if hung:
        raise TimeoutError(f"{len(hung)} rank(s) still running after {DEADLINE_S} s: killed")
    assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    return torch.load(out)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    """Both 2-rank runs, spawned once for the module (process start-up dominates the time)."""
    return run_ranks(tmp_path_factory.mktemp("ranks"))


@pytest.fixture(scope="module")
def single_process() -> dict[str, torch.Tensor]:
    """Eager PEFT, one process, the concatenated batch."""
    model = build_model()
    ids = full_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    return grads(model)


def assert_same_grads(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert rel_err(actual[name], expected[name]) <= 1e-5, name


def test_ddp_gloo_two_ranks_match_the_single_process_run(ranks, single_process):
    result = ranks["ddp"]
    assert_same_grads(result["grads"], single_process)
    print(f"\n[ddp] graphs {result['graphs']}, sites {len(result['sites'])}, "
          f"skipped {result['skipped']}")
    assert result["graphs"] == 3  # the DDP optimizer split the graph at the bucket boundaries
    # A site cut by a boundary is whole in neither piece: left to the inner compiler (correct,
    # not rewritten) and reported once, with the reason. Here one boundary falls between k_proj's
    # base linear and its LoRA branch, the other between q_proj's lora_A and lora_B (layer 1).
    assert len(result["sites"]) == 12
    assert sorted(path for path, _ in result["skipped"]) == [
        "base_model.model.model.layers.0.self_attn.k_proj",
        "base_model.model.model.layers.1.self_attn.q_proj",
    ]
    assert {reason for _, reason in result["skipped"]} == {CUT_REASON}
    # every LoRA module in a graph (the splitter hands fakes: read by their source path)
    assert result["outside"] == [(14, [])] * 3


def test_fsdp2_gloo_two_ranks_match_the_single_process_run(ranks, single_process):
    """FSDP2 (`fully_shard` per layer and on the root) works on CPU with gloo in torch 2.13."""
    result = ranks["fsdp2"]
    assert_same_grads(result["grads"], single_process)
    print(f"\n[fsdp2] graphs {result['graphs']}, sites {len(result['sites'])}, "
          f"skipped {result['skipped']}")
    assert len(result["sites"]) == 14 and not result["skipped"]
    assert result["outside"] == [(14, [])] * result["graphs"]
