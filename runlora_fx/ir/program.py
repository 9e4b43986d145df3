"""A plan as a straight-line program over named tensors — the one thing the cost model, the
timer and the executor read, so the counted cost is the cost of what runs.

Every name comes from operands.py: the operands (x, W0, A0.0, …, dy0), the values a step
computes (`value("h", m, k)`) and those derived from others (`derived`). Each name has a shape
and a dtype (`infer`), and products run in the dtype the plan says: a cast step appears
wherever an operand is stored in another dtype, as PEFT's and autocast's casts do (builder.py).
Shared subexpressions are named once and computed once. GEMMs that share an operand are then
fused into one (`fuse`), as the plan's sharing flags say (sharing.SHARING): every output element
of the fused GEMM is the same dot product as before, so fusing is exact in any dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from runlora_fx.ir import operands as ops
from runlora_fx.ir.builder import Builder, Member, members
from runlora_fx.ir.fusion import fuse
from runlora_fx.ir.operands import Derived, derived, value
from runlora_fx.ir.plans import Dropout, Forward, GradA, GradB, Hidden, InputGrad, Plan, canonical
from runlora_fx.ir.sharing import SHARING, Gemm
from runlora_fx.ir.site import Base, LoraSite, SiteGroup
from runlora_fx.ir.stacks import Stack, persist, without_dead
from runlora_fx.ir.steps import Meta, Step, infer


@dataclass(frozen=True)
class Program:
    forward: tuple[Step, ...]
    backward: tuple[Step, ...]
    outputs: tuple[str, ...]  # one per member
    tangents: tuple[str, ...]  # the incoming grad of each output
    grads: tuple[tuple[str, str], ...]  # (operand name, grad name) pairs the backward returns
    saved: tuple[str, ...]  # forward names the backward reads
    graph_dropout: bool = True  # its dropout branches' D(x) are operands (the graph's dropout)
    # joined operands held across steps (stacks.py): read like operands, refreshed outside
    stacks: tuple[Stack, ...] = ()


def program_operands(unit: SiteGroup, program: Program) -> tuple[ops.Operand, ...]:
    """The operands the program reads, in call order: the unit's (operands.py), then one per
    persistent stack (a buffer the backend holds; no grad flows into it)."""
    found = ops.operands(unit, program.graph_dropout)
    owner = {op.name: op.member for op in found}
    return found + tuple(
        ops.Operand(s.name, ops.Role.STACK, s.meta[0], s.meta[1], False,
                    min(owner[leaf] for leaf in s.leaves()))
        for s in program.stacks
    )


def operand_metas(program: Program, unit: SiteGroup) -> dict[str, Meta]:
    """Shape and dtype of every operand (stacks included) and tangent of the program."""
    metas = dict(ops.shapes_and_dtypes(unit, program.graph_dropout))
    metas.update((s.name, s.meta) for s in program.stacks)
    return metas


def metas_of(program: Program, unit: SiteGroup) -> dict[str, Meta]:
    """Shape and dtype of every name the program reads or defines."""
    metas = operand_metas(program, unit)
    for step in (*program.forward, *program.backward):
        metas[step.out] = infer(step, metas)
    return metas


def _weff(b: Builder, plan: Plan, mem: Member, recompute: bool) -> str:
    """W_eff = W + Σ s_k B_k A_k (in W's layout), summed in fp32 or wider, rounded once."""
    site, m, acc = mem.site, mem.m, mem.weff_dtype
    terms = [b.cast(ops.weight(m), acc, recompute)]
    for k in range(len(site.adapters)):
        a, bb = b.cast(ops.lora_a(m, k), acc, recompute), b.cast(ops.lora_b(m, k), acc, recompute)
        if mem.w_transposed:  # B·A: d_out×d_in
            ba = b.mm(value("BA", m, k), bb, a, recompute=recompute)
        else:  # Aᵀ·Bᵀ: d_in×d_out
            ba = b.mm(value("BA", m, k), a, bb, (True, True), recompute=recompute)
        p = mem.sparse_p(plan, k)  # D(x) = (x − S)/q: the dense part is x·(s/q)·BA
        terms.append(b.emit(Step(value("sBA", m, k), "scale", (ba,), scale=mem.scale0 + k,
                                 factor=1.0 if p is None else 1.0 / (1.0 - p),
                                 recompute=recompute)))
    total = b.emit(Step(value("Wsum", m), "add", tuple(terms), recompute=recompute))
    if b.metas[total][1] == mem.base:
        return total
    return b.emit(Step(value("Weff", m), "round", (total,), dtype=mem.base,
                       rounding=plan.rounding, recompute=recompute))


def _positions(b: Builder, plan: Plan, mem: Member, k: int) -> str:
    """Adapter k's dropped positions: drawn from a fresh seed in the forward; the backward reads
    them, or redraws them from the kept seed (dropout.py)."""
    m, p = mem.m, mem.sparse_p(plan, k)
    assert p is not None
    redrawn = plan.dropout is Dropout.SPARSE_REDRAWN
    name, seed = value("P", m, k), value("seed", m, k)
    if b.backward:
        if redrawn:
            b.emit(Step(name, "positions", (seed, ops.X), p=p))
        return name
    b.emit(Step(seed, "seed", (ops.X,)))
    return b.emit(Step(name, "positions", (seed, ops.X), p=p, recompute=redrawn))


def _dense_minus_sparse(b: Builder, dense: str, sparse: str, q: float, name: str,
                        dtype: torch.dtype, recompute: bool) -> str:
    """(dense − sparse)/q, rounded once to `dtype`, named `name`."""
    diff = b.emit(Step(derived(Derived.DIFFERENCE, dense, sparse), "sub", (dense, sparse),
                       recompute=recompute))
    if b.metas[diff][1] == dtype:
        return b.emit(Step(name, "scale", (diff,), factor=1.0 / q, recompute=recompute))
    wide = b.emit(Step(derived(Derived.OVER_Q, name), "scale", (diff,), factor=1.0 / q,
                       recompute=recompute))
    return b.emit(Step(name, "cast", (wide,), dtype=dtype, recompute=recompute))


def _s_times_a(b: Builder, plan: Plan, mem: Member, k: int, recompute: bool) -> str:
    """S·A_kᵀ (N×r) at adapter k's dropped positions, in at least fp32."""
    lora, m = mem.lora(plan), mem.m
    source = b.cast(ops.X, lora, recompute)
    a = b.cast(ops.lora_a(m, k), lora, recompute)
    return b.emit(Step(value("SA", m, k), "s_times_at",
                       (source, _positions(b, plan, mem, k), a), recompute=recompute))


def _hidden(b: Builder, plan: Plan, mem: Member, k: int, recompute: bool, name: str,
            recompute_correction: bool | None = None) -> str:
    """h_k = D(x) A_kᵀ in the LoRA dtype; under sparse dropout (x·A_kᵀ − S·A_kᵀ)/q, whose
    correction is recomputed with h even where the dense GEMM is shared (and so not)."""
    lora, m = mem.lora(plan), mem.m
    source = mem.lora_input(plan, k)
    fusion = (Gemm.XA, m) if source == ops.X else None
    a = b.cast(ops.lora_a(m, k), lora, recompute)
    p = mem.sparse_p(plan, k)
    if p is None:
        return b.mm(name, b.cast(source, lora, recompute), a, (False, True), fusion, recompute)
    fixed = recompute if recompute_correction is None else recompute_correction
    dense = b.mm(derived(Derived.ON_X, name), b.cast(source, lora, recompute), a, (False, True),
                 fusion, recompute)
    return _dense_minus_sparse(b, dense, _s_times_a(b, plan, mem, k, fixed), 1.0 - p, name,
                               lora, fixed)


def _member_forward(b: Builder, plan: Plan, mem: Member) -> str:
    site, m = mem.site, mem.m
    bias = (b.cast(ops.bias(m), mem.base),) if site.has_bias else ()
    shares_h = plan.fold_x or plan.group_h  # a fused GEMM is never recomputed: see _backward
    recompute_h = plan.hidden is Hidden.RECOMPUTE and not shares_h
    recompute_correction = plan.hidden is Hidden.RECOMPUTE  # the backward's twin is not saved
    lora = mem.lora(plan)
    if plan.forward is Forward.MERGED:
        weff = _weff(b, plan, mem, recompute=plan.input_grad is not InputGrad.MERGED_KEEP)
        # x·W_effᵀ holds x·((s/q)·BA)ᵀ: take back (s/q)·(S·Aᵀ)·Bᵀ at the dropped positions,
        # −s/q on the N×r side (in its wide dtype), so no N×d_out pass scales the product
        corrections = [
            (b.emit(Step(value("sSA", m, k), "scale",
                         (_s_times_a(b, plan, mem, k, recompute_correction),),
                         scale=mem.scale0 + k, factor=-1.0 / (1.0 - p),
                         recompute=recompute_correction)), k)
            for k in range(len(site.adapters)) if (p := mem.sparse_p(plan, k)) is not None]
        terms = _merged_terms(b, plan, mem, weff, corrections, bias, recompute_correction)
        y = terms[0] if len(terms) == 1 else b.emit(Step(value("ysum", m), "add", tuple(terms)))
        if plan.hidden is Hidden.SAVE:
            for k in range(len(site.adapters)):
                _hidden(b, plan, mem, k, False, value("h", m, k))
    else:
        if site.base is Base.OPAQUE:
            terms = [ops.base_result(m)]
        else:
            x = b.cast(ops.X, mem.base)
            w = b.cast(ops.weight(m), mem.base)
            terms = [b.mm(value("xW", m), x, w, (False, mem.w_transposed), (Gemm.XW, m)), *bias]
        for k in range(len(site.adapters)):
            h = _hidden(b, plan, mem, k, recompute_h, value("h", m, k), recompute_correction)
            hb = b.mm(value("hB", m, k), h, b.cast(ops.lora_b(m, k), lora), (False, True))
            terms.append(b.emit(Step(value("shB", m, k), "scale", (hb,), scale=mem.scale0 + k)))
        y = b.emit(Step(value("ysum", m), "add", tuple(terms)))
    if plan.input_grad is InputGrad.MERGED_KEEP and plan.forward is Forward.SPLIT:
        _weff(b, plan, mem, recompute=False)
    return b.cast(y, site.result_dtype)


def _merged_terms(b: Builder, plan: Plan, mem: Member, weff: str,
                  corrections: list[tuple[str, int]], bias: tuple[str, ...],
                  recompute: bool) -> list[str]:
    """The merged forward's terms: x·W_effᵀ, the bias, and the sparse corrections
    c_k·B_kᵀ with c_k = −(s/q)·S·A_kᵀ (N×r). Where x·W_effᵀ is the member's own GEMM (not shared
    with another product) and c_k is in x's dtype, each correction is added into that GEMM's
    fresh result in place ("add_mm"); otherwise it is a GEMM of its own whose N×d_out product
    the sum adds (on a CPU Inductor makes that an addmm, which copies x·W_effᵀ first)."""
    m, x, lora = mem.m, b.cast(ops.X, mem.base), mem.lora(plan)
    xw = b.mm(value("xW", m), x, weff, (False, mem.w_transposed), (Gemm.XW, m))
    if corrections and not (plan.fold_x or plan.stack_w) and lora == mem.base:
        for c, k in corrections:
            xw = b.emit(Step(derived(Derived.CORRECTED, value("xW", m), k), "add_mm",
                             (xw, b.cast(c, lora), b.cast(ops.lora_b(m, k), lora)),
                             (False, True)))
        return [xw, *bias]
    return [xw, *bias, *(b.mm(value("sSAB", m, k), b.cast(ssa, lora, recompute),
                              b.cast(ops.lora_b(m, k), lora), (False, True))
                         for ssa, k in corrections)]


def _member_backward(b: Builder, plan: Plan, mem: Member) -> list[tuple[str, str]]:
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
        return b.emit(Step(value("sB", m, k), "scale", (bb,), scale=mem.scale0 + k))

    def dh(k: int) -> str:  # dh_k = s_k · dy B_k
        return b.mm(value("dh", m, k), dy_lora, scaled_b(k), fusion=(Gemm.DYB, m))

    def times_d(left: str, k: int, name: str, fusion: tuple[Gemm, int] | None,
                dtype: torch.dtype) -> str:
        """leftᵀ·D(x) for adapter k (left N×c): one GEMM on the graph's D(x), or under sparse
        dropout (leftᵀ·x − leftᵀ·S)/q in `dtype`, its GEMM on x shareable by the group."""
        reads_x = mem.lora_input(plan, k) == ops.X
        source = b.cast(mem.lora_input(plan, k), lora)
        p = mem.sparse_p(plan, k)
        if p is None:
            return b.mm(name, left, source, (True, False), fusion if reads_x else None)
        dense = b.mm(derived(Derived.DENSE, name), left, source, (True, False), fusion)
        s_part = b.emit(Step(derived(Derived.AT_DROPPED, name), "lt_times_s",
                             (left, _positions(b, plan, mem, k), source)))
        return _dense_minus_sparse(b, dense, s_part, 1.0 - p, name, dtype, False)

    def gram(k: int) -> str:  # G = dyᵀ D(x): d_out×d_in, shared by adapters reading one input
        source = b.cast(mem.lora_input(plan, k), lora)
        if mem.sparse_p(plan, k) is not None:  # each sparse adapter drops its own positions
            source = value("P", m, k)
        return times_d(dy_lora, k, derived(Derived.GRAM, m, source), None, lora)

    for k, adapter in enumerate(site.adapters):
        a_name, b_name = ops.lora_a(m, k), ops.lora_b(m, k)
        if adapter.a_requires_grad:
            if plan.grad_a is GradA.VIA_DH:
                da = times_d(dh(k), k, value("dA", m, k), (Gemm.DHX, m), site.adapter_dtype)
            else:
                bg = b.mm(value("BG", m, k), b.cast(b_name, lora), gram(k), (True, False))
                da = b.emit(Step(value("dA", m, k), "scale", (bg,), scale=mem.scale0 + k))
            grads.append((a_name, b.cast(da, site.adapter_dtype)))
        if adapter.b_requires_grad:
            if plan.grad_b is GradB.VIA_H:
                h = value("h", m, k)
                if plan.hidden is Hidden.RECOMPUTE:  # its own GEMM when the forward's is fused
                    own = derived(Derived.RECOMPUTED, h) if shares_h else h
                    h = _hidden(b, plan, mem, k, False, own)
                dyh = b.mm(value("dyh", m, k), dy_lora, h, (True, False))
            else:
                dyh = b.mm(value("GA", m, k), gram(k), b.cast(a_name, lora), (False, True))
            db = b.emit(Step(value("dB", m, k), "scale", (dyh,), scale=mem.scale0 + k))
            grads.append((b_name, b.cast(db, site.adapter_dtype)))

    x_dtype = site.dtype
    if plan.input_grad is InputGrad.SPLIT:
        if site.base is Base.OPAQUE:
            grads.append((ops.base_result(m), dy_base))
        else:
            w = b.cast(ops.weight(m), mem.base)
            dyw = b.mm(value("dyW", m), dy_base, w, (False, not mem.w_transposed),
                       (Gemm.DYW, m))
            grads.append((ops.X, b.cast(dyw, x_dtype)))
        for k, adapter in enumerate(site.adapters):
            dha = b.mm(value("dhA", m, k), dh(k), b.cast(ops.lora_a(m, k), lora))
            p = mem.sparse_p(plan, k)
            if adapter.reads_base_input:
                grads.append((ops.X, b.cast(dha, x_dtype)))
            elif p is not None:  # D'(dh·A) = (dh·A with the dropped positions zeroed)/q
                masked = derived(Derived.MASKED, dha)
                kept = b.emit(Step(masked, "zero_at", (dha, _positions(b, plan, mem, k))))
                dxk = b.emit(Step(derived(Derived.OVER_Q, masked), "scale", (kept,),
                                  factor=1.0 / (1.0 - p)))
                grads.append((ops.X, b.cast(dxk, x_dtype)))
            else:  # the grad of D(x); autograd routes it through the dropout's own backward
                grads.append((ops.dropped(m, k), b.cast(dha, site.lora_dtype)))
    elif plan.input_grad is not None:
        weff = _weff(b, plan, mem, recompute=False) if (
            plan.input_grad is InputGrad.MERGED_RECOMPUTE) else _weff_name(b, m)
        dx = b.mm(value("dx", m), dy_base, weff, (False, not mem.w_transposed),
                  (Gemm.DYW, m))
        for k in range(len(site.adapters)):
            p = mem.sparse_p(plan, k)
            if p is not None:  # dy·W_eff gave every element (dh·A)/q: a dropped one gets none
                a = b.cast(ops.lora_a(m, k), lora)
                dx = b.emit(Step(derived(Derived.CORRECTED, dx, k), "minus_dots_at",
                                 (dx, _positions(b, plan, mem, k), dh(k), a),
                                 factor=1.0 / (1.0 - p)))
        grads.append((ops.X, b.cast(dx, x_dtype)))
    if site.bias_requires_grad:
        db = b.emit(Step(value("db", m), "colsum", (dy_base,)))
        grads.append((ops.bias(m), b.cast(db, site.weight_dtype)))
    return grads


def _weff_name(b: Builder, m: int) -> str:
    """The forward's W_eff (kept for the backward): rounded, or the fp32 sum when not rounded."""
    return value("Weff", m) if value("Weff", m) in b.metas else value("Wsum", m)


def _for_member(plan: Plan, site: LoraSite) -> Plan:
    """The unit's plan as one member runs it: its own irrelevant choices dropped, the GEMM
    sharing flags kept (they are the unit's)."""
    flags = {way.flag: getattr(plan, way.flag) for way in SHARING}
    return replace(canonical(plan, SiteGroup((site,))), **flags)


def program_for(plan: Plan, unit: SiteGroup) -> Program:
    metas = dict(ops.shapes_and_dtypes(unit, not plan.sparse_dropout))
    forward = Builder(metas)
    outputs = []
    for mem in members(unit):
        outputs.append(_member_forward(forward, _for_member(plan, mem.site), mem))
    backward = Builder(dict(forward.metas), forward)
    pairs: list[tuple[str, str]] = []
    for mem in members(unit):
        pairs += _member_backward(backward, _for_member(plan, mem.site), mem)
    dx_terms = [grad for name, grad in pairs if name == ops.X]
    grads = [(name, grad) for name, grad in pairs if name != ops.X]
    if dx_terms:
        dx = dx_terms[0] if len(dx_terms) == 1 else backward.emit(
            Step(ops.DX, "add", tuple(dx_terms)))
        grads.insert(0, (ops.X, dx))
    tangents = tuple(ops.tangent(m) for m in range(len(unit.members)))
    fused_forward = fuse(forward.steps, plan.sharing, forward.metas)
    fused_backward = fuse(backward.steps, plan.sharing, backward.metas)
    holding = _Holding(unit, not plan.sparse_dropout, fused_forward)
    backward_steps = holding.take(fused_backward, backward.metas, set())
    saved = _saved(backward_steps, tangents)
    forward_steps = holding.take(fused_forward, forward.metas, {*saved, *outputs})
    forward_steps = _leaving_slices_copied(forward_steps, {*saved, *outputs})
    return Program(
        forward=tuple(forward_steps),
        backward=tuple(backward_steps),
        outputs=tuple(outputs),
        tangents=tangents,
        grads=tuple(grads),
        saved=saved,
        graph_dropout=not plan.sparse_dropout,
        stacks=tuple(holding.stacks.values()),
    )


class _Holding:
    """The persistent stacks of a program, phase by phase (stacks.py): each phase's cats that
    may persist come out, and with them the steps that only fed them."""

    def __init__(self, unit: SiteGroup, graph_dropout: bool, forward: list[Step]) -> None:
        self.held = [site.weights_held for site in unit.members]
        self.static = [a.scale is not None for site in unit.members for a in site.adapters]
        self.operands = {op.name: op for op in ops.operands(unit, graph_dropout)}
        self.forward = {s.out: s for s in forward}
        self.stacks: dict[str, Stack] = {}
        self.fed: set[str] = set()  # results of the steps that fed a stack

    def take(self, steps: list[Step], metas: dict[str, Meta], live: set[str]) -> list[Step]:
        if not any(self.held):
            return steps
        producers = {**self.forward, **{s.out: s for s in steps}}
        kept, stacks = persist(steps, producers, self.operands, self.held, self.static, metas)
        for stack in stacks:
            self.stacks.setdefault(stack.name, stack)
            self.fed |= {s.out for s in stack.derive}
        return without_dead(kept, self.fed, live)


def _leaving_slices_copied(forward: list[Step], leaving: set[str]) -> list[Step]:
    """A slice of a fused GEMM's result that leaves the forward — saved for the backward, or a
    member's output, which the model may save (v into attention) — gets its own storage: as a
    view it would keep the whole result (its siblings' columns too) alive until the backward.
    Inductor folds the copy into a pointwise consumer; it is materialised only where kept."""
    steps: list[Step] = []
    for step in forward:
        if step.op == "slice" and step.out in leaving:
            view = replace(step, out=derived(Derived.VIEW, step.out))
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


