"""A plan as a straight-line program over named tensors — the one thing the cost model, the
timer and the executor read, so the counted cost is the cost of what runs.

Names come from operands.py (x, W0, A0.0, …, dy0); every other name is a step's result. Each
name has a shape and a dtype (`infer`), and products run in the dtype the plan says: a cast
step appears wherever an operand is stored in another dtype, as PEFT's and autocast's casts do.
Shared subexpressions are named once and computed once. GEMMs that share an operand are then
fused into one (`fuse`), as the plan's fold/group flags say: every output element of the fused
GEMM is the same dot product as before, so fusing is exact in any dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from runlora_fx import operands as ops
from runlora_fx.fusion import fuse
from runlora_fx.plans import (
    FUSIONS, Dropout, Forward, GradA, GradB, Hidden, InputGrad, Plan, canonical,
)
from runlora_fx.precision import Precision
from runlora_fx.site import Base, LoraSite, SiteGroup, WeightLayout, as_group
from runlora_fx.steps import Meta, Step, infer


@dataclass(frozen=True)
class Program:
    forward: tuple[Step, ...]
    backward: tuple[Step, ...]
    outputs: tuple[str, ...]  # one per member
    tangents: tuple[str, ...]  # the incoming grad of each output
    grads: tuple[tuple[str, str], ...]  # (operand name, grad name) pairs the backward returns
    saved: tuple[str, ...]  # forward names the backward reads
    graph_dropout: bool = True  # its dropout branches' D(x) are operands (the graph's dropout)

    @property
    def output(self) -> str:
        return self.outputs[0]


def metas_of(program: Program, unit: LoraSite | SiteGroup) -> dict[str, Meta]:
    """Shape and dtype of every name the program reads or defines."""
    metas = dict(ops.shapes_and_dtypes(unit, program.graph_dropout))
    for step in (*program.forward, *program.backward):
        metas[step.out] = infer(step, metas)
    return metas


# ---- building ----------------------------------------------------------------------------------


class _Builder:
    """One phase's steps, each name emitted once, with shapes and dtypes tracked and casts
    inserted where an operand is stored in another dtype than the product reads."""

    def __init__(self, metas: dict[str, Meta], forward: _Builder | None = None) -> None:
        self.metas = metas
        self.steps: list[Step] = []
        self.defined: set[str] = set()
        self.forward = forward  # the backward's: the forward it reads (it draws no new bits)

    @property
    def backward(self) -> bool:
        return self.forward is not None

    def emit(self, step: Step) -> str:
        if step.out not in self.defined:  # shared subexpression: computed once
            self.defined.add(step.out)
            self.metas[step.out] = infer(step, self.metas)
            self.steps.append(step)
        return step.out

    def cast(self, name: str, dtype: torch.dtype, recompute: bool = False) -> str:
        """`name` in `dtype`. Of x and its cast the backward keeps the narrower: it reads the
        forward's cast down (autocast's bf16 copy of fp32 x), and casts up again itself
        (PEFT's fp32 copy of bf16 x, whose forward cast is recomputed, not kept)."""
        if self.metas[name][1] == dtype:
            return name
        out = f"{name}:{_short(dtype)}"
        narrows = dtype.itemsize < self.metas[name][1].itemsize
        if self.forward is not None and narrows and out in self.forward.defined:
            return out
        widens_x = name == ops.X and not narrows and self.forward is None
        return self.emit(Step(out, "cast", (name,), dtype=dtype, recompute=recompute or widens_x))

    def mm(self, out: str, a: str, b: str, transpose: tuple[bool, bool] = (False, False),
           fusion: tuple[str, int] | None = None, recompute: bool = False) -> str:
        return self.emit(Step(out, "mm", (a, b), transpose, recompute=recompute, fusion=fusion))


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class _Member:
    """What one member's steps need: its site, index, dtypes under the plan, scale offset."""

    site: LoraSite
    m: int
    scale0: int  # index of its first adapter's scale in the unit's scales

    @property
    def base(self) -> torch.dtype:
        return self.site.base_dtype

    def lora(self, plan: Plan) -> torch.dtype:
        """The dtype its LoRA products run in under `plan`."""
        return self.site.base_dtype if plan.branch is Precision.BASE else self.site.lora_dtype

    def sparse_p(self, plan: Plan, k: int) -> float | None:
        """Adapter k's dropout p where the plan draws its dropped positions, else None."""
        p = self.site.adapters[k].dropout_p
        return p if p > 0.0 and plan.sparse_dropout else None

    def lora_input(self, plan: Plan, k: int) -> str:
        return ops.lora_input(self.site, self.m, k, graph_dropout=not plan.sparse_dropout)

    @property
    def w_transposed(self) -> bool:
        """Whether x·W needs W transposed (F.linear's out×in layout)."""
        return self.site.weight_layout is WeightLayout.OUT_IN

    @property
    def weff_dtype(self) -> torch.dtype:
        """W + sBA is summed in at least fp32, then rounded once to the base dtype."""
        site = self.site
        return torch.promote_types(torch.float32, torch.promote_types(site.w_dtype, site.a_dtype))


def _weff(b: _Builder, plan: Plan, mem: _Member, recompute: bool) -> str:
    """W_eff = W + Σ s_k B_k A_k (in W's layout), summed in fp32 or wider, rounded once."""
    site, m, acc = mem.site, mem.m, mem.weff_dtype
    terms = [b.cast(ops.weight(m), acc, recompute)]
    for k in range(len(site.adapters)):
        a, bb = b.cast(ops.lora_a(m, k), acc, recompute), b.cast(ops.lora_b(m, k), acc, recompute)
        if mem.w_transposed:  # B·A: d_out×d_in
            ba = b.mm(f"BA{m}.{k}", bb, a, recompute=recompute)
        else:  # Aᵀ·Bᵀ: d_in×d_out
            ba = b.mm(f"BA{m}.{k}", a, bb, (True, True), recompute=recompute)
        p = mem.sparse_p(plan, k)  # D(x) = (x − S)/q: the dense part is x·(s/q)·BA
        terms.append(b.emit(Step(f"sBA{m}.{k}", "scale", (ba,), scale=mem.scale0 + k,
                                 factor=1.0 if p is None else 1.0 / (1.0 - p),
                                 recompute=recompute)))
    total = b.emit(Step(f"Wsum{m}", "add", tuple(terms), recompute=recompute))
    if b.metas[total][1] == mem.base:
        return total
    return b.emit(Step(f"Weff{m}", "round", (total,), dtype=mem.base, rounding=plan.rounding,
                       recompute=recompute))


def _positions(b: _Builder, plan: Plan, mem: _Member, k: int) -> str:
    """Adapter k's dropped positions: drawn from a fresh seed in the forward; the backward reads
    them, or redraws them from the kept seed (dropout.py)."""
    m, p = mem.m, mem.sparse_p(plan, k)
    assert p is not None
    redrawn = plan.dropout is Dropout.SPARSE_REDRAWN
    name, seed = f"P{m}.{k}", f"seed{m}.{k}"
    if b.backward:
        if redrawn:
            b.emit(Step(name, "positions", (seed, ops.X), p=p))
        return name
    b.emit(Step(seed, "seed", (ops.X,)))
    return b.emit(Step(name, "positions", (seed, ops.X), p=p, recompute=redrawn))


def _dense_minus_sparse(b: _Builder, dense: str, sparse: str, q: float, name: str,
                        dtype: torch.dtype, recompute: bool) -> str:
    """(dense − sparse)/q, rounded once to `dtype`, named `name`."""
    diff = b.emit(Step(f"{dense}−{sparse}", "sub", (dense, sparse), recompute=recompute))
    if b.metas[diff][1] == dtype:
        return b.emit(Step(name, "scale", (diff,), factor=1.0 / q, recompute=recompute))
    wide = b.emit(Step(f"{name}/q", "scale", (diff,), factor=1.0 / q, recompute=recompute))
    return b.emit(Step(name, "cast", (wide,), dtype=dtype, recompute=recompute))


def _s_times_a(b: _Builder, plan: Plan, mem: _Member, k: int, recompute: bool) -> str:
    """S·A_kᵀ (N×r) at adapter k's dropped positions, in at least fp32."""
    lora, m = mem.lora(plan), mem.m
    source = b.cast(ops.X, lora, recompute)
    a = b.cast(ops.lora_a(m, k), lora, recompute)
    return b.emit(Step(f"SA{m}.{k}", "s_times_at", (source, _positions(b, plan, mem, k), a),
                       recompute=recompute))


def _hidden(b: _Builder, plan: Plan, mem: _Member, k: int, recompute: bool, name: str,
            recompute_correction: bool | None = None) -> str:
    """h_k = D(x) A_kᵀ in the LoRA dtype; under sparse dropout (x·A_kᵀ − S·A_kᵀ)/q, whose
    correction is recomputed with h even where the dense GEMM is shared (and so not)."""
    lora, m = mem.lora(plan), mem.m
    source = mem.lora_input(plan, k)
    fusion = ("xA", m) if source == ops.X else None
    a = b.cast(ops.lora_a(m, k), lora, recompute)
    p = mem.sparse_p(plan, k)
    if p is None:
        return b.mm(name, b.cast(source, lora, recompute), a, (False, True), fusion, recompute)
    fixed = recompute if recompute_correction is None else recompute_correction
    dense = b.mm(f"x{name}", b.cast(source, lora, recompute), a, (False, True), fusion, recompute)
    return _dense_minus_sparse(b, dense, _s_times_a(b, plan, mem, k, fixed), 1.0 - p, name,
                               lora, fixed)


def _member_forward(b: _Builder, plan: Plan, mem: _Member) -> str:
    site, m = mem.site, mem.m
    bias = (b.cast(ops.bias(m), mem.base),) if site.has_bias else ()
    shares_h = plan.fold_x or plan.group_h  # a fused GEMM is never recomputed: see _backward
    recompute_h = plan.hidden is Hidden.RECOMPUTE and not shares_h
    recompute_correction = plan.hidden is Hidden.RECOMPUTE  # the backward's twin is not saved
    lora = mem.lora(plan)
    if plan.forward is Forward.MERGED:
        weff = _weff(b, plan, mem, recompute=plan.input_grad is not InputGrad.MERGED_KEEP)
        terms = [b.mm(f"xW{m}", b.cast(ops.X, mem.base), weff, (False, mem.w_transposed),
                      ("xW", m)), *bias]
        for k in range(len(site.adapters)):
            p = mem.sparse_p(plan, k)
            if p is None:
                continue
            # x·W_effᵀ holds x·((s/q)·BA)ᵀ: take back (s/q)·(S·Aᵀ)·Bᵀ at the dropped positions
            sa = b.cast(_s_times_a(b, plan, mem, k, recompute_correction), lora)
            sab = b.mm(f"SAB{m}.{k}", sa, b.cast(ops.lora_b(m, k), lora), (False, True))
            terms.append(b.emit(Step(f"sSAB{m}.{k}", "scale", (sab,), scale=mem.scale0 + k,
                                     factor=-1.0 / (1.0 - p))))
        y = b.emit(Step(f"ysum{m}", "add", tuple(terms))) if len(terms) > 1 else terms[0]
        if plan.hidden is Hidden.SAVE:
            for k in range(len(site.adapters)):
                _hidden(b, plan, mem, k, False, f"h{m}.{k}")
    else:
        if site.base is Base.OPAQUE:
            terms = [ops.base_result(m)]
        else:
            x = b.cast(ops.X, mem.base)
            w = b.cast(ops.weight(m), mem.base)
            terms = [b.mm(f"xW{m}", x, w, (False, mem.w_transposed), ("xW", m)), *bias]
        for k in range(len(site.adapters)):
            h = _hidden(b, plan, mem, k, recompute_h, f"h{m}.{k}", recompute_correction)
            hb = b.mm(f"hB{m}.{k}", h, b.cast(ops.lora_b(m, k), lora), (False, True))
            terms.append(b.emit(Step(f"shB{m}.{k}", "scale", (hb,), scale=mem.scale0 + k)))
        y = b.emit(Step(f"ysum{m}", "add", tuple(terms)))
    if plan.input_grad is InputGrad.MERGED_KEEP and plan.forward is Forward.SPLIT:
        _weff(b, plan, mem, recompute=False)
    return b.cast(y, site.result_dtype)


def _member_backward(b: _Builder, plan: Plan, mem: _Member) -> list[tuple[str, str]]:
    """The member's grads as (operand, grad) pairs; dx contributions come back as ("x", …)
    pairs, summed by the caller."""
    site, m = mem.site, mem.m
    lora = mem.lora(plan)
    grads: list[tuple[str, str]] = []
    dy_sum = b.cast(ops.tangent(m), site.sum_dtype)  # through the cast back to the result dtype
    dy_base, dy_lora = b.cast(dy_sum, mem.base), b.cast(dy_sum, lora)
    shares_h = plan.fold_x or plan.group_h

    def scaled_b(k: int) -> str:  # s·B_k: the scale on the small side of dh = s·dy·B
        bb = b.cast(ops.lora_b(m, k), lora)
        return b.emit(Step(f"sB{m}.{k}", "scale", (bb,), scale=mem.scale0 + k))

    def dh(k: int) -> str:  # dh_k = s_k · dy B_k
        return b.mm(f"dh{m}.{k}", dy_lora, scaled_b(k), fusion=("dyB", m))

    def times_d(left: str, k: int, name: str, fusion: tuple[str, int] | None,
                dtype: torch.dtype) -> str:
        """leftᵀ·D(x) for adapter k (left N×c): one GEMM on the graph's D(x), or under sparse
        dropout (leftᵀ·x − leftᵀ·S)/q in `dtype`, its GEMM on x shareable by the group."""
        reads_x = mem.lora_input(plan, k) == ops.X
        source = b.cast(mem.lora_input(plan, k), lora)
        p = mem.sparse_p(plan, k)
        if p is None:
            return b.mm(name, left, source, (True, False), fusion if reads_x else None)
        dense = b.mm(f"{name}:x", left, source, (True, False), fusion)
        s_part = b.emit(Step(f"{name}:S", "lt_times_s", (left, _positions(b, plan, mem, k),
                                                          source)))
        return _dense_minus_sparse(b, dense, s_part, 1.0 - p, name, dtype, False)

    def gram(k: int) -> str:  # G = dyᵀ D(x): d_out×d_in, shared by adapters reading one input
        source = b.cast(mem.lora_input(plan, k), lora)
        if mem.sparse_p(plan, k) is not None:  # each sparse adapter drops its own positions
            source = f"P{m}.{k}"
        return times_d(dy_lora, k, f"G{m}[{source}]", None, lora)

    for k, adapter in enumerate(site.adapters):
        a_name, b_name = ops.lora_a(m, k), ops.lora_b(m, k)
        if adapter.a_requires_grad:
            if plan.grad_a is GradA.VIA_DH:
                da = times_d(dh(k), k, f"dA{m}.{k}", ("dhx", m), site.a_dtype)
            else:
                bg = b.mm(f"BG{m}.{k}", b.cast(b_name, lora), gram(k), (True, False))
                da = b.emit(Step(f"dA{m}.{k}", "scale", (bg,), scale=mem.scale0 + k))
            grads.append((a_name, b.cast(da, site.a_dtype)))
        if adapter.b_requires_grad:
            if plan.grad_b is GradB.VIA_H:
                h = f"h{m}.{k}"
                if plan.hidden is Hidden.RECOMPUTE:  # its own GEMM when the forward's is fused
                    h = _hidden(b, plan, mem, k, False, h + "~" if shares_h else h)
                dyh = b.mm(f"dyh{m}.{k}", dy_lora, h, (True, False))
            else:
                dyh = b.mm(f"GA{m}.{k}", gram(k), b.cast(a_name, lora), (False, True))
            db = b.emit(Step(f"dB{m}.{k}", "scale", (dyh,), scale=mem.scale0 + k))
            grads.append((b_name, b.cast(db, site.a_dtype)))

    x_dtype = site.dtype
    if plan.input_grad is InputGrad.SPLIT:
        if site.base is Base.OPAQUE:
            grads.append((ops.base_result(m), dy_base))
        else:
            w = b.cast(ops.weight(m), mem.base)
            dyw = b.mm(f"dyW{m}", dy_base, w, (False, not mem.w_transposed), ("dyW", m))
            grads.append((ops.X, b.cast(dyw, x_dtype)))
        for k, adapter in enumerate(site.adapters):
            dha = b.mm(f"dhA{m}.{k}", dh(k), b.cast(ops.lora_a(m, k), lora))
            p = mem.sparse_p(plan, k)
            if adapter.reads_base_input:
                grads.append((ops.X, b.cast(dha, x_dtype)))
            elif p is not None:  # D'(dh·A) = (dh·A with the dropped positions zeroed)/q
                kept = b.emit(Step(f"dhA{m}.{k}·m", "zero_at", (dha, _positions(b, plan, mem, k))))
                dxk = b.emit(Step(f"dhA{m}.{k}·m/q", "scale", (kept,), factor=1.0 / (1.0 - p)))
                grads.append((ops.X, b.cast(dxk, x_dtype)))
            else:  # the grad of D(x); autograd routes it through the dropout's own backward
                grads.append((ops.dropped(m, k), b.cast(dha, site.lora_dtype)))
    elif plan.input_grad is not None:
        weff = _weff(b, plan, mem, recompute=False) if (
            plan.input_grad is InputGrad.MERGED_RECOMPUTE) else _weff_name(b, m)
        dx = b.mm(f"dx{m}", dy_base, weff, (False, not mem.w_transposed), ("dyW", m))
        for k in range(len(site.adapters)):
            p = mem.sparse_p(plan, k)
            if p is not None:  # dy·W_eff gave every element (dh·A)/q: a dropped one gets none
                a = b.cast(ops.lora_a(m, k), lora)
                dx = b.emit(Step(f"{dx}−C{k}", "minus_dots_at",
                                 (dx, _positions(b, plan, mem, k), dh(k), a),
                                 factor=1.0 / (1.0 - p)))
        grads.append((ops.X, b.cast(dx, x_dtype)))
    if site.bias_requires_grad:
        db = b.emit(Step(f"db{m}", "colsum", (dy_base,)))
        grads.append((ops.bias(m), b.cast(db, site.w_dtype)))
    return grads


def _weff_name(b: _Builder, m: int) -> str:
    """The forward's W_eff (kept for the backward): rounded, or the fp32 sum when not rounded."""
    return f"Weff{m}" if f"Weff{m}" in b.metas else f"Wsum{m}"


def _members(unit: SiteGroup) -> list[_Member]:
    found, offset = [], 0
    for m, site in enumerate(unit.members):
        found.append(_Member(site, m, offset))
        offset += len(site.adapters)
    return found


def _member_plan(plan: Plan, site: LoraSite) -> Plan:
    """The unit's plan as one member runs it: its own irrelevant choices dropped, the GEMM
    sharing flags kept (they are the unit's)."""
    flags = {flag: getattr(plan, flag) for flag, _ in FUSIONS}
    return replace(canonical(plan, site), **flags)


def program_for(plan: Plan, unit: LoraSite | SiteGroup) -> Program:
    group = as_group(unit)
    metas = dict(ops.shapes_and_dtypes(group, not plan.sparse_dropout))
    forward = _Builder(metas)
    outputs = []
    for mem in _members(group):
        outputs.append(_member_forward(forward, _member_plan(plan, mem.site), mem))
    backward = _Builder(dict(forward.metas), forward)
    pairs: list[tuple[str, str]] = []
    for mem in _members(group):
        pairs += _member_backward(backward, _member_plan(plan, mem.site), mem)
    dx_terms = [grad for name, grad in pairs if name == ops.X]
    grads = [(name, grad) for name, grad in pairs if name != ops.X]
    if dx_terms:
        dx = dx_terms[0] if len(dx_terms) == 1 else backward.emit(
            Step("dx", "add", tuple(dx_terms)))
        grads.insert(0, (ops.X, dx))
    backward_steps = fuse(backward.steps, plan, backward.metas)
    tangents = tuple(ops.tangent(m) for m in range(len(group.members)))
    saved = _saved(backward_steps, tangents)
    forward_steps = _leaving_slices_copied(fuse(forward.steps, plan, forward.metas),
                                           {*saved, *outputs})
    return Program(
        forward=tuple(forward_steps),
        backward=tuple(backward_steps),
        outputs=tuple(outputs),
        tangents=tangents,
        grads=tuple(grads),
        saved=saved,
        graph_dropout=not plan.sparse_dropout,
    )


def _leaving_slices_copied(forward: list[Step], leaving: set[str]) -> list[Step]:
    """A slice of a fused GEMM's result that leaves the forward — saved for the backward, or a
    member's output, which the model may save (v into attention) — gets its own storage: as a
    view it would keep the whole result (its siblings' columns too) alive until the backward.
    Inductor folds the copy into a pointwise consumer; it is materialised only where kept."""
    steps: list[Step] = []
    for step in forward:
        if step.op == "slice" and step.out in leaving:
            view = replace(step, out=f"{step.out}@")
            steps += [view, Step(step.out, "copy", (view.out,))]
        else:
            steps.append(step)
    return steps


def _saved(backward: list[Step], tangents: tuple[str, ...]) -> tuple[str, ...]:
    defined = {s.out for s in backward}
    saved: dict[str, None] = {}
    for step in backward:
        # a redrawn positions step reads its source's shape only: the tensor is not kept
        args = step.args[:1] if step.op == "positions" else step.args
        for name in args:
            if name not in tangents and name not in defined:
                saved[name] = None
    return tuple(saved)


