"""Persistent stacks: a shared GEMM's joined operand that is made of parameters alone.

Sharing a GEMM joins its other operands: x·[W; A]ᵀ (fold_x), dy·[W | s·B] (fold_dy),
x·[W_1; W_2; …]ᵀ (stack_w). Built with a `cat` each step, such a stack copies the frozen W each
step — at real widths the largest tensor a site touches (/work/shared/DESIGN.md §9). A stack
whose parts derive from parameters only (W, A, B, through casts, transposed views and static
scalings) and that holds a frozen W need not be rebuilt: it lives in a buffer the backend
allocates once, and only the parts whose operands changed (A and B after an optimizer step; W
after a load) are rewritten in place before a call (runlora_fx/stack_refresh.py). The program
then reads the stack like an operand (`Stack`), and the steps that only fed the cat go.

This module decides which joins persist (`persist`): legality only. What a persistent stack
costs per step (its trainable parts rewritten) is cost.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from runlora_fx.ir.operands import Operand, Role
from runlora_fx.ir.steps import Meta, Step, infer

DERIVING = ("cast", "t", "scale")  # what a part may pass through: no product, no sum, no draw
PARAMETERS = (Role.WEIGHT, Role.LORA_A, Role.LORA_B)


@dataclass(frozen=True)
class Stack:
    """A joined operand held across steps: `parts` concatenated along `dim`, each computed
    from the unit's operands by `derive` (in order); `meta` is the joined tensor's."""

    name: str
    parts: tuple[str, ...]
    dim: int
    derive: tuple[Step, ...]
    meta: Meta

    def leaves(self, names: Iterable[str] | None = None) -> frozenset[str]:
        """The operands that `names` (default: every part) are computed from."""
        by_out = {s.out: s for s in self.derive}
        found: set[str] = set()
        todo = list(self.parts if names is None else names)
        while todo:
            name = todo.pop()
            step = by_out.get(name)
            if step is None:
                found.add(name)
            else:
                todo += step.args
        return frozenset(found)

    def steps_for(self, parts: Iterable[str]) -> tuple[Step, ...]:
        """The derive steps that `parts` need, in order (a changed A does not re-cast W)."""
        by_out = {s.out: s for s in self.derive}
        needed: set[str] = set()
        todo = list(parts)
        while todo:
            name = todo.pop()
            if name in by_out and name not in needed:
                needed.add(name)
                todo += by_out[name].args
        return tuple(s for s in self.derive if s.out in needed)

    def part_metas(self, operand_metas: Mapping[str, Meta]) -> dict[str, Meta]:
        metas = dict(operand_metas)
        for step in self.derive:
            metas[step.out] = infer(step, metas)
        return {part: metas[part] for part in self.parts}

    def trainable_parts(self, operands: Mapping[str, Operand]) -> tuple[str, ...]:
        """The parts computed from an operand that requires grad: rewritten after each
        optimizer step."""
        return tuple(p for p in self.parts
                     if any(operands[leaf].requires_grad for leaf in self.leaves((p,))))


def _derivation(name: str, producers: Mapping[str, Step], held: Callable[[str], bool],
                static: Sequence[bool], steps: list[Step]) -> bool:
    """Whether `name` derives from held parameters only; its steps are appended to `steps`."""
    step = producers.get(name)
    if step is None:
        return held(name)
    if step.op not in DERIVING or (step.op == "scale" and step.scale >= 0
                                   and not static[step.scale]):
        return False
    if not all(_derivation(a, producers, held, static, steps) for a in step.args):
        return False
    if step not in steps:
        steps.append(step)
    return True


def persist(
    steps: list[Step], producers: Mapping[str, Step], operands: Mapping[str, Operand],
    held_members: Sequence[bool], static: Sequence[bool], metas: Mapping[str, Meta],
) -> tuple[list[Step], list[Stack]]:
    """Each `cat` of `steps` that may persist, taken out as a Stack: its parts derive from the
    parameters of held members only (their real tensors are the backend's) through casts,
    transposes and static scalings (`static`: per scale index), and one holds a frozen W.
    `producers`: the steps by result name that the parts may come from (this phase's and the
    forward's). Returns the steps without those cats, and the stacks."""

    def held(name: str) -> bool:
        op = operands.get(name)
        return op is not None and op.role in PARAMETERS and held_members[op.member]

    kept: list[Step] = []
    stacks: list[Stack] = []
    for step in steps:
        derive: list[Step] = []
        if step.op == "cat" and all(_derivation(p, producers, held, static, derive)
                                    for p in step.args):
            metas_now = dict(metas)
            for d in derive:
                metas_now[d.out] = infer(d, metas_now)
            stack = Stack(step.out, step.args, step.dim, tuple(derive), infer(step, metas_now))
            if any(operands[leaf].role is Role.WEIGHT for leaf in stack.leaves()):
                stacks.append(stack)
                continue
        kept.append(step)
    return kept, stacks


def without_dead(steps: list[Step], removable: set[str], live: set[str]) -> list[Step]:
    """`steps` less those in `removable` (the steps that fed a stack) that nothing reads any
    more: no kept step, and not `live` (outputs, or forward names the backward reads)."""
    kept = list(steps)
    while True:
        read = {a for s in kept for a in s.args} | live
        dead = [s for s in kept if s.out in removable and s.out not in read]
        if not dead:
            return kept
        kept = [s for s in kept if s not in dead]
