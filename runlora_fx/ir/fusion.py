"""Sharing GEMMs: the program transformation that runs GEMMs with a common operand as one.

Each GEMM the builder emits carries a class (`Gemm`) and its member; a plan's ways of sharing
(rows of sharing.SHARING) say which classes join, across members or within one. Joined GEMMs
become one GEMM over their other operands concatenated, and a slice per result: every output
element is the same dot product, so the result is exact in any dtype. The steps are then put
in an order where every name is defined before it is read.
"""

from __future__ import annotations

from collections.abc import Iterable

from runlora_fx.ir import operands as ops
from runlora_fx.ir.operands import Derived
from runlora_fx.ir.sharing import Sharing
from runlora_fx.ir.steps import Meta, Step, infer


def _shared_side(a: Step, b: Step) -> int | None:
    """0 when `a` and `b` read the same left operand the same way, 1 the same right one."""
    for side in (0, 1):
        if a.args[side] == b.args[side] and a.transpose[side] == b.transpose[side]:
            return side
    return None


def _fusion_sets(steps: list[Step], sharing: Iterable[Sharing]) -> list[list[int]]:
    """Indices of the GEMMs to run as one, per set (each ≥ 2, in program order)."""
    gemms = [i for i, s in enumerate(steps) if s.fusion is not None and not s.recompute]
    parent = {i: i for i in gemms}

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for way in sharing:
        first, second = way.joins
        for i in gemms:
            for j in gemms:
                a, b = steps[i], steps[j]
                assert a.fusion is not None and b.fusion is not None
                if i >= j or {a.fusion[0], b.fusion[0]} != {first, second}:
                    continue
                if not way.across_members and a.fusion[1] != b.fusion[1]:
                    continue
                if _shared_side(a, b) is not None:
                    parent[root(j)] = root(i)
    sets: dict[int, list[int]] = {}
    for i in gemms:
        sets.setdefault(root(i), []).append(i)
    return [members for members in sets.values() if len(members) > 1]


def _fused(group: list[Step], metas: dict[str, Meta]) -> list[Step]:
    """One GEMM for `group` (all sharing one operand), its operand cat, and a slice per result.

    The other operands are concatenated along the output's free dim, in the orientation the
    first of them is read in (a differently oriented one goes through a transposed view)."""
    side = _shared_side(group[0], group[1])
    assert side is not None and all(_shared_side(group[0], s) == side for s in group[1:])
    shared, flip = group[0].args[side], group[0].transpose[side]
    other = 1 - side
    orientation = group[0].transpose[other]
    steps: list[Step] = []
    parts = []
    for step in group:
        name = step.args[other]
        if step.transpose[other] != orientation:
            steps.append(Step(ops.derived(Derived.TRANSPOSED, name), "t", (name,)))
            name = ops.derived(Derived.TRANSPOSED, name)
        parts.append(name)
    # the free dim of the other operand as stored: rows when read transposed on the right
    # (n×k), or not transposed on the left (m×k); columns otherwise
    cat_dim = 0 if orientation == (side == 0) else 1
    joined = ops.derived(Derived.JOINED, ",".join(parts))
    steps.append(Step(joined, "cat", tuple(parts), dim=cat_dim))
    fused = ops.derived(Derived.FUSED, ",".join(s.out for s in group))
    args = (shared, joined) if side == 0 else (joined, shared)
    transpose = (flip, orientation) if side == 0 else (orientation, flip)
    steps.append(Step(fused, "mm", args, transpose))
    out_dim = 1 if side == 0 else 0
    start = 0
    for step in group:
        size = infer(step, metas)[0][out_dim]
        steps.append(Step(step.out, "slice", (fused,), dim=out_dim, start=start,
                          stop=start + size))
        start += size
    return steps


def fuse(steps: list[Step], sharing: Iterable[Sharing], metas: dict[str, Meta]) -> list[Step]:
    """Replace each set of GEMMs that `sharing` joins by one GEMM over concatenated operands,
    then order the steps so that every name is defined before it is read."""
    sets = _fusion_sets(steps, tuple(sharing))
    if not sets:
        return steps
    replaced: dict[int, list[Step]] = {}
    dropped: set[int] = set()
    for members in sets:
        replaced[members[-1]] = _fused([steps[i] for i in members], metas)
        dropped |= set(members[:-1])
    flat: dict[str, Step] = {}  # by name: a view shared by two sets is made once
    for i, step in enumerate(steps):
        for new in replaced.get(i, [] if i in dropped else [step]):
            flat.setdefault(new.out, new)
    return _in_dependency_order(list(flat.values()))


def _in_dependency_order(steps: list[Step]) -> list[Step]:
    """A topological order that keeps the given order wherever dependencies allow."""
    produced = {s.out: i for i, s in enumerate(steps)}
    waiting = {i: {produced[a] for a in s.args if a in produced} for i, s in enumerate(steps)}
    done: set[int] = set()
    order: list[Step] = []
    while len(order) < len(steps):
        ready = next(i for i in range(len(steps)) if i not in done and waiting[i] <= done)
        done.add(ready)
        order.append(steps[ready])
    return order
