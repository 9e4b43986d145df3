"""Timing plans on the real device: each candidate's forward+backward, interleaved, median.

A site is timed through the same `autograd.Function` the rewritten graph calls, on random
tensors of the site's shapes, outside torch.compile: the matmuls dominate and are the same
kernels Inductor calls (extern mm), while the elementwise steps it would fuse are cheap. A plan
that reads the graph's dropout is timed with that dropout (mask drawn, applied, and its
backward), since a plan drawing its own dropped positions pays for those. A persistent stack
(runlora_fx/ir/stacks.py) is built before timing, as the backend holds it: its refresh after
an optimizer step is not timed (the cost model counts it).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from runlora_fx.ir import operands as ops
from runlora_fx.ir.execute import ProgramFunction, stack_tensor
from runlora_fx.ir.plans import Plan
from runlora_fx.ir.program import program_for, program_operands
from runlora_fx.ir.site import SiteGroup

log = logging.getLogger("runlora_fx")

# per session: fwd+bwd of every plan at least MIN_ROUNDS times and until BUDGET_S has passed
BUDGET_S = 0.1
MIN_ROUNDS = 3
SESSIONS = 3  # sessions of fresh tensors; the median over them is a plan's time
# ... while the sessions so far took less than this: a session of a large layer's plans takes
# seconds and its placement effects are a smaller share of a longer step
SESSIONS_BUDGET_S = 2.0
MAX_ROUNDS = 200
FINALIST_RATIO = 1.15  # plans this close to the fastest are timed again before choosing
# A unit whose fastest warm-up step took longer than this (a real-width layer: 20–400 ms on the
# CPU) is timed in SLOW_ROUNDS interleaved rounds and no finalist rounds: at 2048 wide a plan's
# round costs as much as compiling a small graph, and the time criterion's whole measuring must
# stay within about twice plain compile's (issue 25: ≤ 3× in all on a 2-layer 1B-wide model)
SLOW_STEP_S = 0.02
SLOW_ROUNDS = 2


def unit_signature(unit: SiteGroup) -> dict[str, Any]:
    """Everything a plan's time depends on (not the paths, the scale values or the symbol)."""
    members = unit.members
    site = members[0]
    signature: dict[str, Any] = {
        "device": site.device,
        "operands": [[op.name, list(op.shape), str(op.dtype), op.requires_grad]
                     for op in ops.operands(unit)],
        "result_dtype": [str(s.result_dtype) for s in members],
        "compute_dtype": [str(site.base_dtype), str(site.lora_dtype)],
        "layout": [s.weight_layout.name for s in members],
        "dropout_p": [a.dropout_p for s in members for a in s.adapters],
    }
    if any(s.weights_held for s in members):  # its stacks of W persist: no cat is timed
        signature["weights_held"] = [s.weights_held for s in members]
    return signature


def unit_inputs(
    unit: SiteGroup, device: torch.device
) -> tuple[tuple[str, ...], list[torch.Tensor], tuple[float, ...]]:
    """Names, random tensors (leaves, requiring grad as at the unit) and scales for a unit:
    every operand but the graph dropouts' D(x), which a timed step draws (`_graph_dropouts`)."""
    gen = torch.Generator(device=device).manual_seed(0)
    members = unit.members
    tensors = []
    leaves = ops.operands(unit, graph_dropout=False)
    for op in leaves:
        fan_in = op.shape[-1] if op.role in (ops.Role.WEIGHT, ops.Role.LORA_A, ops.Role.LORA_B) else 1
        t = torch.randn(*op.shape, generator=gen, device=device, dtype=torch.float32)
        tensors.append((t * fan_in**-0.5).to(op.dtype).requires_grad_(op.requires_grad))
    scales = tuple(a.scale if a.scale is not None else 1.0 for s in members for a in s.adapters)
    return tuple(op.name for op in leaves), tensors, scales


def _graph_dropouts(unit: SiteGroup, env: dict[str, torch.Tensor]) -> None:
    """D(x) of each dropout branch, as the graph's own dropout makes it, into `env`."""
    for op in ops.operands(unit):
        if op.role is ops.Role.LORA_INPUT:
            assert op.adapter is not None
            p = unit.members[op.member].adapters[op.adapter].dropout_p
            env[op.name] = torch.nn.functional.dropout(env[ops.X].to(op.dtype), p, True)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it measures that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_plans(
    unit: SiteGroup,
    plans: Sequence[Plan],
    device: torch.device,
    budget_s: float = BUDGET_S,
    min_rounds: int = MIN_ROUNDS,
    sessions: int = SESSIONS,
) -> dict[Plan, float]:
    """Median seconds of one forward+backward per plan, over up to `sessions` sessions (the
    first always; another while they took less than SESSIONS_BUDGET_S).

    Each session draws fresh input tensors: where they land in memory moves some plans' times
    by tens of percent on a CPU (measured: per-plan ratios 0.56–1.08 between two sessions), so
    one session's ranking is one draw of that; the median over sessions is the plan's time."""
    # the dropouts and seeds a timed step draws must not move the caller's random stream
    started = time.perf_counter()
    per_session: list[dict[Plan, float]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        while len(per_session) < sessions and (
                not per_session or time.perf_counter() - started < SESSIONS_BUDGET_S):
            per_session.append(_session(unit, plans, device, budget_s, min_rounds))
    return {plan: statistics.median(s[plan] for s in per_session) for plan in plans}


def _session(
    unit: SiteGroup, plans: Sequence[Plan], device: torch.device, budget_s: float, min_rounds: int
) -> dict[Plan, float]:
    """One session: rounds interleave the plans, so drift of the machine (clock, other load)
    hits every plan alike; the near-fastest plans get a second, longer set of rounds."""
    names, tensors, scales = unit_inputs(unit, device)
    wants_grad = [t for t in tensors if t.requires_grad]
    gen = torch.Generator(device=device).manual_seed(1)  # the caller's RNG stream is untouched
    dys = [torch.randn(s.n, s.d_out, generator=gen, device=device).to(s.result_dtype)
           for s in unit.members]
    programs = {plan: program_for(plan, unit) for plan in plans}
    reads = {plan: tuple(op.name for op in program_operands(unit, programs[plan]))
             for plan in plans}
    # a persistent stack is built once, as the backend holds it; a step does not rebuild it
    leaves = dict(zip(names, tensors))
    stacks = {plan: {s.name: stack_tensor(s, leaves, scales) for s in programs[plan].stacks}
              for plan in plans}

    def step(plan: Plan) -> float:
        synchronize(device)
        start = time.perf_counter()
        env = dict(zip(names, tensors))
        env.update(stacks[plan])
        if programs[plan].graph_dropout:
            _graph_dropouts(unit, env)
        out = ProgramFunction.apply(programs[plan], "timing", scales, reads[plan],
                                    *(env[name] for name in reads[plan]))
        if wants_grad:
            torch.autograd.grad(out, wants_grad, dys if isinstance(out, tuple) else dys[0])
        synchronize(device)
        return time.perf_counter() - start

    warm = min(step(plan) for plan in plans)  # warm-up: allocator, kernel selection, caches
    slow = warm > SLOW_STEP_S
    samples: dict[Plan, list[float]] = {plan: [] for plan in plans}
    _rounds(plans, step, samples, budget_s, SLOW_ROUNDS if slow else min_rounds)
    if slow:  # a large layer's step: its rounds are long and steady, and each costs a lot
        return {plan: statistics.median(times) for plan, times in samples.items()}
    # A burst of other load can make one plan look fast or slow in a few rounds; the plans that
    # came within FINALIST_RATIO of the best are timed again, so the pick rests on 3× the rounds.
    medians = {plan: statistics.median(times) for plan, times in samples.items()}
    fastest = min(medians.values())
    finalists = [plan for plan in plans if medians[plan] <= FINALIST_RATIO * fastest]
    if len(finalists) > 1:
        _rounds(finalists, step, samples, budget_s, 2 * min_rounds)
    return {plan: statistics.median(times) for plan, times in samples.items()}


def _rounds(
    plans: Sequence[Plan],
    step: Callable[[Plan], float],
    samples: dict[Plan, list[float]],
    budget_s: float,
    min_rounds: int,
) -> None:
    """Interleaved rounds over `plans`: at least `min_rounds`, and until `budget_s` passed."""
    started = time.perf_counter()
    for rounds in range(1, MAX_ROUNDS + 1):
        for plan in plans:
            samples[plan].append(step(plan))
        if rounds >= min_rounds and time.perf_counter() - started >= budget_s:
            break
