"""Find LoRA sites in a Dynamo graph by shape, not by module class.

A site is `base(x) + Σ_k s_k · linear(linear(D_k(x), A_k), B_k)`, optionally cast back to the
result dtype (PEFT), with the sum written `+` or `+=` (loralib), where the base is a linear in
any weight layout (patterns.py) or an opaque quantized linear (quantized.py), D_k is absent, a
dropout or a dtype cast of x, and s_k a constant or a graph value. Anything that looks like one
but would not be rewritten exactly becomes a `SkippedSite` with the reason; so does a site cut
across graphs (cut_sites.py), and a module that looks like LoRA but matched nothing
(lora_modules.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from runlora_fx.ir.compat import size_hint
from runlora_fx.ir.operands import Operand, Role
from runlora_fx.ir.site import Adapter, Base, LoraSite, SkippedSite, WeightLayout, dtype_name
from runlora_fx.passes.cut_sites import cut_sites
from runlora_fx.passes.graphs import node_order
from runlora_fx.passes.paths import common_path
from runlora_fx.passes.patterns import (
    ADD, IADD, Linear, Scale, Term, base_linear, cast_source, dropout_p, dropout_source, is_call,
    mutates, mutation_between, tensor_value, term, value,
)
from runlora_fx.passes.quantized import Opaque, opaque_base

Key = tuple[Role, int | None]


@dataclass(frozen=True)
class SiteMatch:
    """A site the rewriter may replace: its data and the nodes that feed and form it."""

    site: LoraSite
    root: fx.Node  # the site's result: its users get the rewritten one
    x: fx.Node
    nodes: dict[Key, fx.Node]  # the site's own operands by (role, adapter)
    scales: tuple[Scale, ...]
    owned: tuple[fx.Node, ...]  # replaced by the rewrite, in graph order
    transposed: frozenset[Key] = frozenset()  # adapter weights stored in×out: read as `.t()`
    # the branches' own dropouts (and the casts only they read): replaced too by a plan that
    # draws its own dropped positions
    dropout_nodes: tuple[fx.Node, ...] = ()

    def node_for(self, operand: Operand) -> fx.Node:
        return self.x if operand.role is Role.X else self.nodes[(operand.role, operand.adapter)]


class Unsupported(Exception):
    """A LoRA-shaped pattern that cannot be rewritten exactly; the message is the reason."""


# ---- sums --------------------------------------------------------------------------------------


def site_path(base: fx.Node, terms: list[Term]) -> str:
    """The module holding both the base and the adapters (their common prefix)."""
    return common_path([base, *(t.lora_a.node for t in terms)]) or base.name

BaseForm = Linear | Opaque


def parse_sum(node: object) -> tuple[BaseForm, list[Term], list[fx.Node]] | None:
    """(base, terms, adds) of `base + t_1 + … + t_k` (each add `+`, or `+=` onto the base)."""
    base = base_linear(node) or opaque_base(node)
    if base is not None:
        return base, [], []
    if not (is_call(node, ADD + IADD) and len(node.args) == 2 and not node.kwargs):  # type: ignore[union-attr]
        return None
    left, right = node.args  # type: ignore[union-attr]
    in_place = node.target in IADD  # type: ignore[union-attr]
    for inner, term_node in ((left, right), (right, left)):
        if in_place and inner is not left:
            continue  # `acc += term`: the accumulator is the left operand
        found = term(term_node)
        inner_sum = parse_sum(inner) if found is not None else None
        if inner_sum is not None:
            base, terms, adds = inner_sum
            return base, [*terms, found], [*adds, node]  # type: ignore[list-item]
    return None


def parse_site(node: fx.Node) -> tuple[fx.Node, BaseForm, list[Term], list[fx.Node]] | None:
    """(sum node, base, terms, adds) of a site whose result is `node`: the sum itself, or its
    cast back to the result dtype (PEFT's `result.to(torch_result_dtype)`)."""
    for candidate in (node, cast_source(node)):
        parsed = parse_sum(candidate) if candidate is not None else None
        if parsed is not None and parsed[1]:
            return candidate, *parsed  # type: ignore[return-value]
    return None


# ---- checks ------------------------------------------------------------------------------------


def rows(x: torch.Tensor) -> int | torch.SymInt:
    """N: the rows a site reads x as (all its dims but the last); a SymInt when dynamic."""
    return math.prod(x.shape[:-1])


def _tensor(node: object, what: str) -> torch.Tensor:
    found = tensor_value(node)
    if found is None:
        raise Unsupported(f"{what} has no tensor example value")
    return found


def _only_user(node: fx.Node, user: fx.Node, what: str) -> None:
    if set(node.users) != {user}:
        raise Unsupported(f"{what} ({node.name}) is also used outside the site")


def _chain(inner: list[fx.Node], last: fx.Node, what: str) -> None:
    """Each node feeds only the next: the rewrite removes them all."""
    for node, user in zip(inner, [*inner[1:], last]):
        _only_user(node, user, what)


# ---- the branch input --------------------------------------------------------------------------


@dataclass(frozen=True)
class BranchInput:
    dropout: fx.Node | None  # the branch's own dropout, None when it reads x (or a cast of it)
    casts: tuple[fx.Node, ...]  # casts of x on the way (PEFT's cast to the adapter dtype)

    @property
    def p(self) -> float:
        return dropout_p(self.dropout) if self.dropout is not None else 0.0


def branch_input(source: fx.Node, x: fx.Node) -> BranchInput | None:
    """How lora_A's input `source` derives from the base's input `x`: itself, dtype casts of it,
    or a dropout of those; None when it is another tensor. (A dropout that produced x itself —
    the model's own, as in BERT and T5 — is part of x, not of the branch.)"""
    dropout = None
    node: object = source
    inner = dropout_source(node) if node is not x else None
    if inner is not None:
        dropout, node = source, inner
    casts: list[fx.Node] = []
    while node is not x:
        inner = cast_source(node)
        if inner is None:
            return None
        casts.append(node)  # type: ignore[arg-type]
        node = inner
    return BranchInput(dropout, tuple(casts))


def _check_casts(casts: tuple[fx.Node, ...], x: torch.Tensor, lora: torch.dtype) -> None:
    """The branch's casts of x must equal one cast to the dtype its products run in: upcasts
    (exact) or a last cast to that dtype."""
    dtype = x.dtype
    for cast in reversed(casts):
        to = _tensor(cast, "a cast of x").dtype
        if to.itemsize < dtype.itemsize and not (cast is casts[0] and to == lora):
            raise Unsupported(f"the LoRA branch casts x down to {dtype_name(to)} before its "
                              f"products run in {dtype_name(lora)}")
        dtype = to


# ---- one site ----------------------------------------------------------------------------------


def _dropout_chain(t: Term, source: BranchInput) -> tuple[fx.Node, ...]:
    """The branch's dropout and the casts of x that feed only it, when the dropout feeds only
    this branch's lora_A (else empty: only the graph's mask gives every reader one D(x))."""
    if source.dropout is None or source.p == 0 or set(source.dropout.users) != {t.lora_a.node}:
        return ()
    chain = [source.dropout]
    for cast in source.casts:  # from the dropout's input back towards x
        if set(cast.users) != {chain[-1]}:
            break
        chain.append(cast)
    return tuple(chain)


def _adapter(t: Term, source: BranchInput, x: torch.Tensor, d_out: int,
             own_dropout: bool) -> Adapter:
    if t.lora_a.bias is not None or t.lora_b.bias is not None:
        raise Unsupported("a LoRA linear has a bias")
    a, b = _tensor(t.lora_a.weight, "lora_A weight"), _tensor(t.lora_b.weight, "lora_B weight")
    # stored in×out (`x @ A`): the plans read the out×in view A.t()
    a = a.t() if t.lora_a.layout is WeightLayout.IN_OUT else a
    b = b.t() if t.lora_b.layout is WeightLayout.IN_OUT else b
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != x.shape[-1] or b.shape != (d_out, a.shape[0]):
        raise Unsupported(f"adapter shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit")
    for lin, what in ((t.lora_a, "lora_A"), (t.lora_b, "lora_B")):
        view = lin.weight_view  # `A.T` of `x @ A.T`: only this use may read it, and A
        pairs = ((view, lin.node), (lin.weight, view)) if view is not None else (
            (lin.weight, lin.node),)
        for node, user in pairs:
            _only_user(node, user, f"{what} weight (shared adapter weights)")
    scale = value(t.scale)
    if isinstance(scale, torch.Tensor):
        raise Unsupported("the LoRA scale is a tensor")
    return Adapter(
        r=int(a.shape[0]),
        dropout_p=source.p,
        scale=float(scale) if isinstance(scale, (int, float)) else None,
        a_requires_grad=a.requires_grad,
        b_requires_grad=b.requires_grad,
        own_dropout=own_dropout,
    )


def _dtypes(base: BaseForm, terms: list[Term], root: fx.Node, x: torch.Tensor,
            w: torch.Tensor | None) -> dict[str, torch.dtype]:
    """The site's dtypes besides x's: its base product's, W's, the adapters', the LoRA
    products' and its result's."""
    base_out = _tensor(base.node, "the base's result").dtype
    weights = [(_tensor(t.lora_a.weight, "A").dtype, _tensor(t.lora_b.weight, "B").dtype)
               for t in terms]
    if any(a != b for a, b in weights):
        raise Unsupported("lora_A and lora_B weights differ in dtype")
    if len({a for a, _ in weights}) != 1:  # several adapters, each in its own dtype
        raise Unsupported(f"the adapters are stored in several dtypes: "
                          f"{sorted(dtype_name(a) for a, _ in weights)}")
    lora = {_tensor(t.lora_a.node, "h").dtype for t in terms}
    lora |= {_tensor(t.product_end, "a LoRA term").dtype for t in terms}
    if len(lora) != 1:
        raise Unsupported("the LoRA products run in several dtypes: "
                          f"{sorted(map(dtype_name, lora))}")
    branch = lora.pop()
    for t in terms:  # a cast of the term: to the base result's dtype (QLoRA) or a no-op
        if t.cast is not None and _tensor(t.cast, "a LoRA term").dtype not in (base_out, branch):
            raise Unsupported("a LoRA term is cast to another dtype than the base result's")
    out = _tensor(root, "the site's result").dtype
    adapter = weights[0][0]
    return {
        "base_dtype": base_out,
        "weight_dtype": w.dtype if w is not None else x.dtype,
        "adapter_dtype": adapter,
        "lora_dtype": branch,
        "result_dtype": out,
    }


def match_site(root: fx.Node, sum_node: fx.Node, base: BaseForm, terms: list[Term],
               adds: list[fx.Node], order: dict[fx.Node, int]) -> SiteMatch:
    """The site whose result is `root`; `order`: its graph's node_order."""
    x_node = base.x
    x = _tensor(x_node, "x")
    sources = []
    for t in terms:
        found = branch_input(t.lora_input, x_node)
        if found is None:
            raise Unsupported(
                f"a LoRA branch reads a different input ({t.lora_input.name}) than the base "
                f"linear ({x_node.name})")
        sources.append(found)
    if isinstance(base, Linear):
        w = _tensor(base.weight, "base weight")
        if w.requires_grad:
            raise Unsupported("the base weight requires grad (full fine-tuning, not LoRA)")
        d_in = w.shape[1] if base.layout.name == "OUT_IN" else w.shape[0]
        d_out = w.shape[0] if base.layout.name == "OUT_IN" else w.shape[1]
        if x.dim() < 2 or w.dim() != 2 or x.shape[-1] != d_in:
            raise Unsupported(f"x{tuple(x.shape)} and W{tuple(w.shape)} are not a 2-D linear")
        bias = _tensor(base.bias, "bias") if base.bias is not None else None
    else:
        w, bias = None, None
        d_in, d_out = x.shape[-1], _tensor(base.node, "the base's result").shape[-1]
        if x.dim() < 2:
            raise Unsupported(f"x{tuple(x.shape)} is not a batch of rows")
    if any(mutates(user) and user not in adds for user in x_node.users):
        raise Unsupported("x is mutated in place")
    # The nodes the rewrite removes must feed nothing else.
    chain = [base.node, *adds] + ([root] if root is not sum_node else [])
    for node, user in zip(chain, chain[1:]):
        _only_user(node, user, "the base linear" if node is base.node else "a partial sum")
    if isinstance(base, Linear):
        _chain(list(base.inner), base.node, "the base linear")
    for t, add in zip(terms, adds):
        inner = [t.lora_a.node, t.lora_b.node] + [n for n in (t.mul, t.cast) if n is not None]
        _chain(inner[:-1], inner[-1], "a LoRA intermediate")
        _only_user(inner[-1], add, "a LoRA intermediate")
    chains = [_dropout_chain(t, s) for t, s in zip(terms, sources)]
    # a plan drawing its own positions reads x at the site's end: x must not change before
    own = [s.p == 0 or bool(c) and mutation_between(min(c, key=order.__getitem__), root,
                                                    set(adds)) is None
           for s, c in zip(sources, chains)]
    adapters = tuple(_adapter(t, s, x, int(d_out), o)
                     for t, s, o in zip(terms, sources, own))
    dtypes = _dtypes(base, terms, root, x, w)
    for source in sources:
        _check_casts(source.casts, x, dtypes["lora_dtype"])
    tensors = [x, *([w] if w is not None else []), *([bias] if bias is not None else [])]
    tensors += [_tensor(t.lora_a.weight, "A") for t in terms]
    if len({t.device for t in tensors}) != 1:
        raise Unsupported("x, W, bias and adapters are on different devices")
    n = rows(x)
    site = LoraSite(
        path=site_path(base.node, terms),
        n=size_hint(n),
        d_in=int(d_in),
        d_out=int(d_out),
        adapters=adapters,
        dtype=x.dtype,
        has_bias=bias is not None,
        bias_requires_grad=bias is not None and bias.requires_grad,
        x_requires_grad=x.requires_grad,
        training=_tensor(root, "the site's result").requires_grad,
        n_symbolic=None if isinstance(n, int) else str(n),
        device=str(x.device),
        weight_layout=base.layout if isinstance(base, Linear) else WeightLayout.OUT_IN,
        base=Base.LINEAR if isinstance(base, Linear) else Base.OPAQUE,
        base_op=None if isinstance(base, Linear) else base.op,
        **dtypes,  # type: ignore[arg-type]
    )
    nodes = _operand_nodes(base, terms, sources)
    transposed = frozenset(
        (role, k) for k, t in enumerate(terms)
        for role, lin in ((Role.LORA_A, t.lora_a), (Role.LORA_B, t.lora_b))
        if lin.layout is WeightLayout.IN_OUT
    )
    owned = _owned(root, base, terms, adds, sources)
    # the site's own `+=` may run in place: the rewrite reads x, W, b and the adapters at root
    mutation = mutation_between(min(owned, key=order.__getitem__), root, set(adds))
    if mutation is not None:
        raise Unsupported(
            f"an in-place op ({mutation.name}) runs between the site's reads and its sum"
        )
    dropout_nodes = {node for chain, o in zip(chains, own) if o for node in chain}
    return SiteMatch(site, root, x_node, nodes, tuple(t.scale for t in terms),
                     tuple(sorted(owned, key=order.__getitem__)), transposed,
                     tuple(sorted(dropout_nodes, key=order.__getitem__)))


def _operand_nodes(base: BaseForm, terms: list[Term],
                   sources: list[BranchInput]) -> dict[Key, fx.Node]:
    nodes: dict[Key, fx.Node] = {}
    if isinstance(base, Linear):
        nodes[(Role.WEIGHT, None)] = base.weight
        if base.bias is not None:
            nodes[(Role.BIAS, None)] = base.bias
    else:
        nodes[(Role.BASE_RESULT, None)] = base.node
    for k, (t, source) in enumerate(zip(terms, sources)):
        if source.p > 0:  # D(x) comes from the graph's own dropout
            assert source.dropout is not None
            nodes[(Role.LORA_INPUT, k)] = source.dropout
        nodes[(Role.LORA_A, k)] = t.lora_a.weight
        nodes[(Role.LORA_B, k)] = t.lora_b.weight
    return nodes


def _owned(root: fx.Node, base: BaseForm, terms: list[Term], adds: list[fx.Node],
           sources: list[BranchInput]) -> set[fx.Node]:
    """The nodes the rewrite replaces: the sum, the LoRA products, the base when it is a linear
    we compute, and the casts and identity dropouts only the branches read."""
    owned = {root, *adds}
    if isinstance(base, Linear):
        owned |= {base.node, *base.inner}
        if base.weight_view is not None and set(base.weight_view.users) == {base.node}:
            owned.add(base.weight_view)
    for t in terms:
        owned |= {t.lora_a.node, t.lora_b.node} | {n for n in (t.mul, t.cast) if n is not None}
        owned |= {v for v in (t.lora_a.weight_view, t.lora_b.weight_view) if v is not None}
    for t, source in zip(terms, sources):
        # the branch's input chain (identity dropout, casts): dead once the site reads x
        chain = ([source.dropout] if source.dropout is not None and source.p == 0 else [])
        chain += list(source.casts) if source.p == 0 or source.dropout is None else []
        for node in chain:
            if set(node.users) <= owned | {t.lora_a.node}:
                owned.add(node)
    return owned


# ---- the graph ---------------------------------------------------------------------------------


def find_sites(graph: fx.Graph) -> tuple[list[SiteMatch], list[SkippedSite]]:
    """Every LoRA-shaped sum in the graph: matched sites and skipped ones with reasons."""
    matches: list[SiteMatch] = []
    skipped: list[SkippedSite] = []
    claimed: set[fx.Node] = set()
    summed: set[fx.Node] = set()  # term ends in a parsed sum
    order = node_order(graph)
    for node in reversed(graph.nodes):  # outermost sums first
        if node in claimed:
            continue
        parsed = parse_site(node)
        if parsed is None:
            continue
        sum_node, base, terms, adds = parsed
        claimed.update([sum_node, *adds])
        summed.update(t.end for t in terms)
        try:
            matches.append(match_site(node, sum_node, base, terms, adds, order))
        except (Unsupported, ValueError) as why:
            skipped.append(SkippedSite(site_path(base.node, terms), str(why)))
    skipped += cut_sites(graph, summed)
    matches.sort(key=lambda m: order[m.root])
    return matches, skipped
