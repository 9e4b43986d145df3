"""Sparse dropout: a Bernoulli(p) mask as the positions it drops, and the products with them.

With q = 1 − p, m the keep mask and S = x ⊙ (1 − m) the dropped entries (density p),
D(x) = (x − S)/q. A plan that reads D(x) this way runs its dense products on x itself (where
they can share a GEMM with the base or with sibling sites) and corrects them at the dropped
positions only: p·N·d multiply-adds, no N×d mask drawn, applied or kept.

The positions are drawn as cumulative Geometric(p) gaps over the flattened N·d indices — the
gaps between successes of a Bernoulli(p) process are iid Geometric(p) — so a draw costs about
p·N·d random numbers: gap k is ⌊log(1 − u_k)/log(1 − p)⌋ + 1 with u_k the 53-bit uniform of
counter k of a seed (counter_random.py: SplitMix64), so p is honoured to ~1e-16 relative and the
draw is a pure function of the seed, the same steps on every device (`device_buffer` in torch
ops; on the CPU one C loop, dropout_kernels.py). The seed is drawn from torch's generator:
seeded runs reproduce, and a backward may redraw the positions instead of keeping them.

They are kept in a buffer of static size (`capacity`: 1.05·p·N·d + 512 slots, then the count),
so the compiled graph has static shapes, and nothing is read back on the host: no loop over
batches, no redraw. A draw that holds more positions than the capacity keeps the first `slots`
of them, so the masks' law differs from Bernoulli(p) by at most the overflow's probability in
total variation: ≤ e⁻⁴⁹ ≈ 5e-22 (Bernstein's bound), below the float64 rounding of p.

A buffer holds the sorted positions, padded with the last of them (or 0 when none), and the
count in its last slot; the products below weigh the padding by 0, and zeroing twice is
harmless, so padding contributes nothing.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from runlora_fx.ir import counter_random
from runlora_fx.ir import dropout_kernels as kernels

SEED_HIGH = 2**62
SLACK_NUM, SLACK_DEN, SLACK_ADD = 105, 100, 512  # capacity = 1.05·p·numel + 512 (see above)
P_BITS = 30  # p in the capacity's integer arithmetic: a multiple of 2⁻³⁰, rounded up


def position_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def capacity(numel: int | torch.SymInt, p: float) -> int | torch.SymInt:
    """Slots for the dropped positions of `numel` elements: integer arithmetic, so that it is
    the same expression for a symbolic N. P(count > capacity) ≤ exp(−t²/(2(μ + t/3))) with
    μ = p·numel and t = 0.05μ + 512: at most e⁻⁴⁹ for every μ."""
    p_fixed = math.ceil(p * SLACK_NUM / SLACK_DEN * 2**P_BITS)
    slots = numel * p_fixed // 2**P_BITS + SLACK_ADD
    return torch.sym_min(slots, numel)


def modelled_slots(n: int, d: int, p: float) -> int:
    """What the cost model counts for the buffer of an N×d tensor: an upper bound of
    `capacity(N·d, p)` that is affine in N (⌈1.05·p·d⌉ slots a row, plus the fixed ones), as
    every count of the cost model is (dynamic.py plans over a range of N with it)."""
    return math.ceil(p * d * SLACK_NUM / SLACK_DEN) * n + SLACK_ADD


def expected_count(numel: int, p: float) -> int:
    return round(numel * p)


def device_buffer(seed: Tensor, numel: int, p: float, slots: int) -> Tensor:
    """The buffer for `seed` (0-d int64, on any device) in torch ops with static shapes:
    slots + 1 Geometric(p) gaps from the seed's counter-based uniforms, the positions past
    `numel` turned into padding, and the count, all without a host read (see above)."""
    u = counter_random.uniforms(seed, slots + 1)
    # 1 − u is exact in float64; a gap past the range ends it, so clamping one changes nothing
    # (and keeps a tiny p's huge gaps inside int64)
    gaps = (1 - u).log_().mul_(1.0 / math.log1p(-p)).clamp_(max=numel).long().add_(1)
    positions = gaps.cumsum(0).sub_(1).narrow(0, 0, slots)
    inside = positions < numel  # a prefix: the positions increase
    count = inside.sum()
    last = positions.index_select(0, (count - 1).clamp(min=0).reshape(1)) * (count > 0)
    buffer = torch.cat([torch.where(inside, positions, last), count.reshape(1)])
    return buffer.to(position_dtype(numel))


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the products with S accumulate in: at least fp32."""
    return torch.promote_types(dtype, torch.float32)


# ---- the ops ---------------------------------------------------------------------------------
# Opaque to Inductor and registered with torch.library's low-level API (a custom_op wrapper
# costs ~20 µs a call more, and a step makes ~4 calls a site). On the CPU each is one C loop
# over the positions (dropout_kernels.py), or the torch version where no compiler works. Off
# the CPU the program calls the torch versions directly (positions_op, product_ops below).
# zero_at_ and minus_dots_at_ update a GEMM's fresh result in place: Inductor reinplaces them,
# so no N×d copy is made (the program never hands them a tensor anything else reads).

_OPS = torch.library.Library("runlora", "DEF")
# A random op of its own, not aten.randint: Inductor rewrites that into its seeded prims, whose
# eager versions (inner="eager") ignore the seed, so a checkpointed region recomputing it would
# drop other positions. Tagged as a random op, this one is kept by the partitioner or, where a
# checkpoint recomputes it, replayed from the saved generator state. Its `name` (unique in the
# graph) keeps the joint graph's CSE, which knows only aten's random ops, from merging two.
_OPS.define("draw_seed(Tensor like, str name) -> Tensor",
            tags=(torch.Tag.nondeterministic_seeded,))
_OPS.define("dropped_positions(Tensor seed, SymInt numel, float p, SymInt slots, Device device)"
            " -> Tensor")
_OPS.define("s_times_at(Tensor x, Tensor buffer, Tensor a) -> Tensor")
# The draw and S·Aᵀ at its positions in one call, where a forward runs one right after the other
# (execute.py): one opaque call a site fewer, each ~25 µs of dispatch, Python and ctypes.
_OPS.define("drawn_s_times_at(Tensor seed, SymInt numel, float p, SymInt slots, Tensor x,"
            " Tensor a) -> (Tensor, Tensor)")
_OPS.define("lt_times_s(Tensor left, Tensor buffer, Tensor x) -> Tensor")
_OPS.define("zero_at_(Tensor(a!) z, Tensor buffer) -> ()")
_OPS.define("minus_dots_at_(Tensor(a!) dense, Tensor buffer, Tensor left, Tensor a, float factor)"
            " -> ()")
# y += a·b in place, BLAS's own beta = 1: a merged forward adds its correction c·Bᵀ (N×r times
# r×d_out) to its GEMM's fresh result. On a CPU Inductor turns add(mm, c·Bᵀ) into addmm, which
# copies the mm's N×d_out result into a fresh buffer first; joining c into the GEMM's inner
# dimension ([x | c]) copies x into one instead. Either is a pass over fresh pages each step
# (measured at A's and B's shapes: the join 1.7–4.8×, the addmm 1.8–14× the in-place add's
# extra time over x·W_effᵀ alone, docs/benchmarks.md).
_OPS.define("add_mm_(Tensor(a!) y, Tensor a, Tensor b) -> ()")


def _native(*tensors: Tensor) -> ctypes.CDLL | None:
    return kernels.library() if kernels.usable(*tensors) else None


def _unpack(buffer: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(flat positions, rows, columns, which slots hold a position, the count) of a buffer."""
    flat = buffer.narrow(0, 0, buffer.shape[0] - 1).long()
    count = buffer.select(0, -1)
    valid = torch.arange(flat.shape[0], device=buffer.device) < count
    return flat, flat // width, flat % width, valid, count


def _draw_seed(like: Tensor, name: str) -> Tensor:
    """A seed from torch's generator of `like`'s device (whose state a checkpoint saves)."""
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device=like.device)


def _draw_library(numel: int, device: torch.device) -> ctypes.CDLL | None:
    """The kernels where the C loop draws: on the CPU, positions that fit its int32 buffer."""
    return kernels.library() if device.type == "cpu" and numel < 2**31 - 1 else None


def _dropped_positions(seed: Tensor, numel: int, p: float, slots: int,
                       device: torch.device) -> Tensor:
    """The buffer for `seed` (a 0-d int64 tensor): a pure function of it. On the CPU reading
    the seed costs nothing and the C loop draws; elsewhere the device draws (`device_buffer`)."""
    lib = _draw_library(numel, device)
    if lib is None:
        return device_buffer(seed, numel, p, slots)  # the seed lives on `device`
    buffer = torch.empty(slots + 1, dtype=torch.int32)
    kernels.draw_positions(lib, int(seed), numel, p, buffer)
    return buffer


# The torch versions: the same math for any device and dtype (tests compare the two). No value
# is read on the host, and they index with take / put_ / index_select rather than [], which fake
# CUDA tensors on a CPU-only torch cannot run (tests/test_dropout_device.py runs them so).

def reference_s_times_at(x: Tensor, buffer: Tensor, a: Tensor) -> Tensor:
    """S·Aᵀ (N×r) for A (r×d): row i gets Σ over its dropped j of x[i, j]·A[:, j]."""
    wide = wide_dtype(x.dtype)
    flat, rows, cols, valid, _ = _unpack(buffer, x.shape[1])
    terms = torch.take(x, flat).to(wide).unsqueeze(1) * a.index_select(1, cols).t().to(wide)
    terms = torch.where(valid.unsqueeze(1), terms, 0)
    return torch.zeros(x.shape[0], a.shape[0], dtype=wide, device=x.device).index_add(
        0, rows, terms)


def reference_lt_times_s(left: Tensor, buffer: Tensor, x: Tensor) -> Tensor:
    """Lᵀ·S (k×d) for L (N×k): column j gets Σ over its dropped i of L[i, :]·x[i, j]."""
    wide = wide_dtype(x.dtype)
    flat, rows, cols, valid, _ = _unpack(buffer, x.shape[1])
    terms = left.index_select(0, rows).to(wide) * torch.take(x, flat).to(wide).unsqueeze(1)
    terms = torch.where(valid.unsqueeze(1), terms, 0)
    return torch.zeros(x.shape[1], left.shape[1], dtype=wide, device=x.device).index_add(
        0, cols, terms).t().clone(memory_format=torch.contiguous_format)


def reference_zero_at_(z: Tensor, buffer: Tensor) -> None:
    """z with the dropped positions set to 0 (in place): the keep mask where it drops."""
    flat, _, _, _, count = _unpack(buffer, z.shape[1])
    # padding repeats the last position, so it writes 0 there too; with none dropped it is
    # slot 0, which gets back what it holds
    z.put_(flat, torch.where(count > 0, 0, torch.take(z, flat)))


def reference_minus_dots_at_(dense: Tensor, buffer: Tensor, left: Tensor, a: Tensor,
                             factor: float) -> None:
    """dense −= factor·(L·A) at the dropped positions only (in place), for L (N×r), A (r×d):
    what dy·(W + (s/q)BA) gave a dropped element, factor·Σ_r dh[i, r]·A[r, j], taken back.
    A padding slot repeats the last position and so computes its very correction: every write
    to a position is the same value, whichever lands. With none dropped the padding is slot 0,
    corrected by 0."""
    wide = wide_dtype(dense.dtype)
    flat, rows, cols, _, count = _unpack(buffer, dense.shape[1])
    dots = (left.index_select(0, rows).to(wide) * a.index_select(1, cols).t().to(wide)).sum(1)
    new = torch.take(dense, flat).to(wide) + torch.where(count > 0, dots * -factor, 0)
    dense.put_(flat, new.to(dense.dtype))


def _add_mm_(y: Tensor, a: Tensor, b: Tensor) -> None:
    y.addmm_(a, b)


def _s_times_at(x: Tensor, buffer: Tensor, a: Tensor) -> Tensor:
    lib = _native(x, buffer, a)
    if lib is not None and a.dtype == x.dtype:
        return kernels.s_times_at(lib, x, buffer, a)
    return reference_s_times_at(x, buffer, a)


def _drawn_s_times_at(seed: Tensor, numel: int, p: float, slots: int, x: Tensor,
                      a: Tensor) -> tuple[Tensor, Tensor]:
    lib = _native(x, a) if _draw_library(numel, x.device) is not None else None
    if lib is not None and a.dtype == x.dtype:
        return kernels.drawn_s_times_at(lib, int(seed), numel, p, slots, x, a)
    buffer = _dropped_positions(seed, numel, p, slots, x.device)
    return buffer, _s_times_at(x, buffer, a)


def _lt_times_s(left: Tensor, buffer: Tensor, x: Tensor) -> Tensor:
    lib = _native(x, buffer, left)
    if lib is not None and left.dtype == x.dtype:
        return kernels.lt_times_s(lib, left, buffer, x)
    return reference_lt_times_s(left, buffer, x)


def _zero_at_(z: Tensor, buffer: Tensor) -> None:
    lib = _native(z, buffer)
    if lib is not None:
        kernels.zero_at_(lib, z, buffer)
    else:
        reference_zero_at_(z, buffer)


def _minus_dots_at_(dense: Tensor, buffer: Tensor, left: Tensor, a: Tensor,
                    factor: float) -> None:
    lib = _native(dense, buffer, left, a)
    if lib is not None and left.dtype == a.dtype:
        kernels.minus_dots_at_(lib, dense, buffer, left, a, factor)
    else:
        reference_minus_dots_at_(dense, buffer, left, a, factor)


# Which implementation a step runs, by device. On the CPU the opaque ops (C loops). Off it the
# torch versions themselves, traced into the graph: static shapes and no host read, so Inductor
# lowers and fuses each into its own kernels (Triton on a GPU: the gathers, the scatter-add and
# the draw's scan) instead of running a dozen eager torch ops inside an opaque call.
PRODUCTS = ("s_times_at", "lt_times_s", "zero_at", "minus_dots_at")


def add_mm_op(device: torch.device) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """y + a·b for the "add_mm" step: on the CPU in place (add_mm_ above: the program hands it
    a GEMM's fresh result no one else reads); off it torch's addmm, which Inductor lowers."""
    if device.type != "cpu":
        return torch.addmm

    def in_place(y: Tensor, a: Tensor, b: Tensor) -> Tensor:
        add_mm_(y, a, b)
        return y
    return in_place


def positions_op(device: torch.device) -> Callable[..., Tensor]:
    """The draw of the "positions" step: (seed, numel, p, slots, device) → buffer."""
    if device.type == "cpu":
        return dropped_positions
    return lambda seed, numel, p, slots, _device: device_buffer(seed, numel, p, slots)


def drawn_product_op(device: torch.device) -> Callable[..., tuple[Tensor, Tensor]] | None:
    """(seed, numel, p, slots, x, A) → (buffer, S·Aᵀ): a "positions" step and the "s_times_at"
    that reads it as one call, on the CPU; None off it, where Inductor fuses the torch ops."""
    return drawn_s_times_at if device.type == "cpu" else None


def product_ops(device: torch.device) -> dict[str, Callable[..., Tensor | None]]:
    """The products with S by step op name (steps.py's argument order)."""
    if device.type == "cpu":
        return {"s_times_at": s_times_at, "lt_times_s": lt_times_s, "zero_at": zero_at_,
                "minus_dots_at": minus_dots_at_}
    return {"s_times_at": reference_s_times_at, "lt_times_s": reference_lt_times_s,
            "zero_at": reference_zero_at_, "minus_dots_at": reference_minus_dots_at_}


# each op's implementation by name (tests run them on fake CUDA tensors: no host read)
IMPLS = {"draw_seed": _draw_seed, "dropped_positions": _dropped_positions,
         "s_times_at": _s_times_at, "drawn_s_times_at": _drawn_s_times_at,
         "lt_times_s": _lt_times_s, "zero_at_": _zero_at_,
         "minus_dots_at_": _minus_dots_at_, "add_mm_": _add_mm_}
for _name, _impl in IMPLS.items():
    _OPS.impl(_name, _impl, "CompositeExplicitAutograd")


@torch.library.register_fake("runlora::draw_seed")
def _(like: Tensor, name: str) -> Tensor:
    return like.new_empty((), dtype=torch.int64)


@torch.library.register_fake("runlora::dropped_positions")
def _(seed: Tensor, numel: int, p: float, slots: int, device: torch.device) -> Tensor:
    return torch.empty((slots + 1,), dtype=position_dtype(numel), device=device)


@torch.library.register_fake("runlora::s_times_at")
def _(x: Tensor, buffer: Tensor, a: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], a.shape[0]), dtype=wide_dtype(x.dtype))


@torch.library.register_fake("runlora::drawn_s_times_at")
def _(seed: Tensor, numel: int, p: float, slots: int, x: Tensor, a: Tensor
      ) -> tuple[Tensor, Tensor]:
    return (torch.empty((slots + 1,), dtype=position_dtype(numel), device=x.device),
            x.new_empty((x.shape[0], a.shape[0]), dtype=wide_dtype(x.dtype)))


@torch.library.register_fake("runlora::lt_times_s")
def _(left: Tensor, buffer: Tensor, x: Tensor) -> Tensor:
    return x.new_empty((left.shape[1], x.shape[1]), dtype=wide_dtype(x.dtype))


@torch.library.register_fake("runlora::zero_at_")
def _(z: Tensor, buffer: Tensor) -> None:
    return None


@torch.library.register_fake("runlora::minus_dots_at_")
def _(dense: Tensor, buffer: Tensor, left: Tensor, a: Tensor, factor: float) -> None:
    return None


@torch.library.register_fake("runlora::add_mm_")
def _(y: Tensor, a: Tensor, b: Tensor) -> None:
    return None


@register_flop_formula(torch.ops.runlora.add_mm_)
def _(y_shape: torch.Size, a_shape: torch.Size, b_shape: torch.Size, **_: object) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]  # as aten.addmm's: FlopCounterMode counts it


draw_seed = torch.ops.runlora.draw_seed.default
dropped_positions = torch.ops.runlora.dropped_positions.default
s_times_at = torch.ops.runlora.s_times_at.default
drawn_s_times_at = torch.ops.runlora.drawn_s_times_at.default
lt_times_s = torch.ops.runlora.lt_times_s.default
zero_at_ = torch.ops.runlora.zero_at_.default
minus_dots_at_ = torch.ops.runlora.minus_dots_at_.default
add_mm_ = torch.ops.runlora.add_mm_.default
