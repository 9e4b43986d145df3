"""Persistent stacks at run time: the buffers the compiled graph reads, kept equal to their
parts (runlora_fx/ir/stacks.py).

A stack such as [W; A] is allocated once, when the graph is rewritten, from the real tensors
of its operands, and registered on the graph module as a buffer (AOTAutograd passes it to the
compiled code like a parameter). Before each call a wrapper compares, per operand the stack
reads, the tensor passed in (or held, for a graph constant) with the one last written —
identity, autograd's version counter (bumped by every in-place write: the optimizer's step on
A and B, `load_state_dict` or `mul_` under no_grad into W) and its storage pointer
(`param.data = …`) — and rewrites in place, under no_grad, only the parts computed from a
changed operand: A's rows once per optimizer step, W's rows when W changes. In-place writes
through `.data` bypass the version counter and are not seen (as for the merge check,
weight_guard.py).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from runlora_fx.ir.execute import stack_parts
from runlora_fx.ir.stacks import Stack


@dataclass
class Leaf:
    """An operand a stack reads: where its tensor comes from, and that tensor as last written."""

    name: str
    index: int | None  # the graph input it is passed as; None: a graph constant
    transposed: bool  # the program reads it as `.t()` (an adapter weight stored in×out)
    ref: weakref.ref
    version: int
    data_ptr: int

    @classmethod
    def of(cls, name: str, index: int | None, transposed: bool, tensor: torch.Tensor) -> Leaf:
        return cls(name, index, transposed, weakref.ref(tensor), tensor._version,
                   tensor.data_ptr())

    def current(self, args: Sequence[Any]) -> torch.Tensor | None:
        return args[self.index] if self.index is not None else self.ref()

    def changed(self, t: torch.Tensor) -> bool:
        return t is not self.ref() or t._version != self.version or t.data_ptr() != self.data_ptr

    def seen(self, t: torch.Tensor) -> None:
        self.ref, self.version, self.data_ptr = weakref.ref(t), t._version, t.data_ptr()

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        return t.t() if self.transposed else t


@dataclass
class HeldStack:
    """One persistent stack: its record, the buffer it lives in, the static scales its parts
    are scaled by (per scale index of the unit), and its operands as last written."""

    stack: Stack
    buffer: torch.Tensor
    scales: tuple[float, ...]
    leaves: list[Leaf]
    sizes: dict[str, int]  # each part's extent along the stack's dim

    @classmethod
    def build(cls, stack: Stack, sources: Mapping[str, tuple[int | None, bool, torch.Tensor]],
              scales: tuple[float, ...]) -> HeldStack:
        """Allocate and fill the buffer; `sources`: per operand name (graph input index or
        None, read transposed, the real tensor)."""
        leaves = [Leaf.of(name, *sources[name]) for name in sorted(stack.leaves())]
        env = {leaf.name: leaf.operand(sources[leaf.name][2]) for leaf in leaves}
        parts = stack_parts(stack, stack.parts, env, scales)
        with torch.no_grad():
            buffer = torch.cat([parts[p] for p in stack.parts], stack.dim).contiguous()
        sizes = {p: t.shape[stack.dim] for p, t in parts.items()}
        return cls(stack, buffer, scales, leaves, sizes)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def refresh(self, args: Sequence[Any]) -> None:
        """Rewrite the parts whose operands changed since they were last written."""
        current = {leaf.name: leaf.current(args) for leaf in self.leaves}
        changed = {leaf.name for leaf in self.leaves
                   if current[leaf.name] is not None and leaf.changed(current[leaf.name])}
        if not changed:
            return
        stale = [p for p in self.stack.parts if self.stack.leaves((p,)) & changed]
        env = {leaf.name: leaf.operand(current[leaf.name]) for leaf in self.leaves
               if current[leaf.name] is not None}
        values = stack_parts(self.stack, stale, env, self.scales)
        offset = 0
        with torch.no_grad():
            for part in self.stack.parts:
                size = self.sizes[part]
                if part in values:
                    self.buffer.narrow(self.stack.dim, offset, size).copy_(values[part])
                offset += size
        for leaf in self.leaves:
            if leaf.name in changed:
                leaf.seen(current[leaf.name])  # type: ignore[arg-type]


def refresh(compiled: Callable, stacks: list[HeldStack]) -> Callable:
    """`compiled`, its persistent stacks brought up to date before each call (none: as it is)."""
    if not stacks:
        return compiled

    @functools.wraps(compiled)  # keeps its attributes: Dynamo calls it as it would `compiled`
    def run(*args: Any) -> Any:
        for held in stacks:
            held.refresh(args)
        return compiled(*args)

    return run
