"""Find LoRA sites in a Dynamo graph by shape, not by module class.

A site is `linear(x, W, b) + Σ_k s_k · linear(linear(D_k(x), A_k), B_k)` where D_k is absent or
a dropout, and s_k a constant or a graph value. Anything that looks like one but would not be
rewritten exactly becomes a `SkippedSite` with the reason; so does a site cut across graphs.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import optimization_hint

from runlora_fx.site import Adapter, LoraSite, SkippedSite

LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)
MATMUL = (operator.matmul, torch.matmul)
ADD = (operator.add, torch.add, torch.Tensor.add)
MUL = (operator.mul, torch.mul, torch.Tensor.mul)
DROPOUT = (torch.nn.functional.dropout, torch.dropout)
IN_PLACE = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem)

Scale = float | fx.Node

CUT_REASON = (
    "the site is cut across graphs (a DDP bucket boundary or a graph break): its LoRA branch "
    "and the sum with its base linear are compiled apart"
)


@dataclass(frozen=True)
class Term:
    """`s · linear(linear(D(x), A), B)` as nodes."""

    mul: fx.Node | None
    lora_b: fx.Node
    lora_a: fx.Node
    dropout: fx.Node | None
    source: fx.Node  # x, with the dropout stripped
    scale: Scale


@dataclass(frozen=True)
class SiteMatch:
    """A site the rewriter may replace: its data and the nodes that feed and form it."""

    site: LoraSite
    root: fx.Node  # the last add: its users get the rewritten result
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    lora_inputs: tuple[fx.Node | None, ...]  # D_k(x) of dropout branches, None where x itself
    lora_a: tuple[fx.Node, ...]
    lora_b: tuple[fx.Node, ...]
    scales: tuple[Scale, ...]
    owned: tuple[fx.Node, ...]  # replaced by the rewrite, in graph order


class Unsupported(Exception):
    """A LoRA-shaped pattern that cannot be rewritten exactly; the message is the reason."""


def _is(node: object, targets: tuple[object, ...]) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _transpose_source(node: object) -> fx.Node | None:
    """`M` when `node` is `M.T`, `M.mT`, `M.t()`, `M.transpose(0, 1)` or `M.permute(1, 0)` of a
    2-D `M`, else None."""
    if not isinstance(node, fx.Node) or node.kwargs or not node.args:
        return None
    source, rest = node.args[0], tuple(node.args[1:])
    if node.op == "call_function" and node.target is getattr:
        is_t = rest in (("T",), ("mT",))
    elif node.op == "call_method" and node.target == "t" or _is(node, (torch.t,)):
        is_t = rest == ()
    elif node.op == "call_method" and node.target == "transpose" or _is(node, (torch.transpose,)):
        is_t = len(rest) == 2 and all(isinstance(d, int) for d in rest) and {
            d % 2 for d in rest} == {0, 1}
    elif node.op == "call_method" and node.target == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        is_t = tuple(dims) in ((1, 0), (-1, -2), (1, -2), (-1, 0))
    else:
        return None
    value = _value(source)
    if not is_t or not isinstance(value, torch.Tensor) or value.dim() != 2:
        return None
    return source


def _weight_view(node: fx.Node) -> fx.Node | None:
    """The transpose node of `x @ M.T` (a linear with weight M), None for F.linear."""
    return node.args[1] if _is(node, MATMUL) else None


def _is_linear(node: object) -> bool:
    """`F.linear(x, W, b)`, or `x @ W.T` / `torch.matmul(x, W.t())` (a linear without bias)."""
    if _is(node, LINEAR):
        return True
    return (
        _is(node, MATMUL) and len(node.args) == 2 and not node.kwargs
        and _transpose_source(node.args[1]) is not None
    )


def _linear_parts(node: fx.Node) -> tuple[object, object, object]:
    """(input, weight in F.linear's out×in layout, bias) of a node `_is_linear` accepts."""
    if _is(node, MATMUL):
        return node.args[0], _transpose_source(node.args[1]), None
    return _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")


def _value(node: object) -> object:
    return node.meta.get("example_value") if isinstance(node, fx.Node) else node


def _is_scalar(value: object) -> bool:
    if isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        return not isinstance(value, bool)
    return isinstance(value, torch.Tensor) and value.dim() == 0


def _parse_term(node: object) -> Term | None:
    mul, lora_b, scale = None, node, 1.0
    if _is(node, MUL) and len(node.args) == 2:
        left, right = node.args
        if _is_linear(left) and _is_scalar(_value(right)):
            mul, lora_b, scale = node, left, right
        elif _is_linear(right) and _is_scalar(_value(left)):
            mul, lora_b, scale = node, right, left
    if not _is_linear(lora_b):
        return None
    lora_a = _linear_parts(lora_b)[0]
    if not _is_linear(lora_a):
        return None
    source = _linear_parts(lora_a)[0]
    dropout = source if _is(source, DROPOUT) else None
    if dropout is not None:
        source = _arg(dropout, 0, "input")
    if not isinstance(source, fx.Node):
        return None
    return Term(mul, lora_b, lora_a, dropout, source, scale)


def _parse_sum(node: object) -> tuple[fx.Node, list[Term], list[fx.Node]] | None:
    """(base linear, terms, adds) of `base + t_1 + … + t_k`, or None."""
    if _is_linear(node):
        return node, [], []
    if not (_is(node, ADD) and len(node.args) == 2 and not node.kwargs):
        return None
    left, right = node.args
    for inner, term_node in ((left, right), (right, left)):
        term = _parse_term(term_node)
        inner_sum = _parse_sum(inner) if term is not None else None
        if inner_sum is not None:
            base, terms, adds = inner_sum
            return base, [*terms, term], [*adds, node]
    return None


def module_path(node: fx.Node) -> str | None:
    """`L['self'].__dict__['_modules']['base_model']…q_proj` → `base_model…q_proj`."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']*'\]", "", path)
    path = re.sub(r"\.__dict__\['_modules'\]\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return path.lstrip(".")


def _common_path(nodes: list[fx.Node]) -> str:
    """The innermost module holding all `nodes` (their module paths' common prefix), or ""."""
    paths = [p for p in map(module_path, nodes) if p]
    common = []
    for level in zip(*(p.split(".") for p in paths)):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _site_path(base: fx.Node, terms: list[Term]) -> str:
    """The module holding both the base linear and the adapters (their common prefix)."""
    return _common_path([base, *(t.lora_a for t in terms)]) or base.name


def _mutates(node: fx.Node) -> bool:
    target = node.target
    if _is(node, DROPOUT) and _arg(node, 3, "inplace", False) is not False:
        return True
    if node.op == "call_method":
        return str(target).endswith("_") and not str(target).startswith("_")
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("_") or target in IN_PLACE


def _mutation_inside(first: fx.Node, root: fx.Node) -> fx.Node | None:
    """An in-place op strictly between `first` and `root` in graph order, if any.

    The rewrite reads x, W, b and the adapters at the root, not where the old nodes read them:
    a mutation in between — of x through a view, `x[...] = v`, a hook — would change what the
    rewritten site sees.
    """
    node = first.next
    while node is not root and node.op != "root":
        if _mutates(node):
            return node
        node = node.next
    return None


def _tensor(node: object, what: str) -> torch.Tensor:
    value = _value(node)
    if not isinstance(value, torch.Tensor):
        raise Unsupported(f"{what} has no tensor example value")
    return value


def _only_user(node: fx.Node, user: fx.Node, what: str) -> None:
    if set(node.users) != {user}:
        raise Unsupported(f"{what} ({node.name}) is also used outside the site")


def _dropout_p(term: Term) -> float:
    """The branch's effective dropout probability (0.0 when it reads x itself)."""
    if term.dropout is None:
        return 0.0
    p, training = _arg(term.dropout, 1, "p", 0.5), _arg(term.dropout, 2, "training", True)
    inplace = _arg(term.dropout, 3, "inplace", False)
    if not isinstance(p, (int, float)) or not isinstance(training, bool) or inplace is not False:
        raise Unsupported("dropout with a non-constant p or training flag, or in place")
    return float(p) if training else 0.0


def _adapter(term: Term, x: torch.Tensor, d_out: int) -> Adapter:
    _, a_node, a_bias = _linear_parts(term.lora_a)
    _, b_node, b_bias = _linear_parts(term.lora_b)
    if a_bias is not None or b_bias is not None:
        raise Unsupported("a LoRA linear has a bias")
    a, b = _tensor(a_node, "lora_A weight"), _tensor(b_node, "lora_B weight")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != x.shape[-1] or b.shape != (d_out, a.shape[0]):
        raise Unsupported(f"adapter shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit")
    for weight, use, what in ((a_node, term.lora_a, "lora_A"), (b_node, term.lora_b, "lora_B")):
        view = _weight_view(use)  # `A.T` of `x @ A.T`: only this use may read it, and A
        for node, user in ((view, use), (weight, view)) if view is not None else ((weight, use),):
            _only_user(node, user, f"{what} weight (shared adapter weights)")
    scale = _value(term.scale)
    if isinstance(scale, torch.Tensor):
        raise Unsupported("the LoRA scale is a tensor")
    return Adapter(
        r=int(a.shape[0]),
        dropout_p=_dropout_p(term),
        scale=float(scale) if isinstance(scale, (int, float)) else None,
        a_requires_grad=a.requires_grad,
        b_requires_grad=b.requires_grad,
    )


def _match(root: fx.Node, base: fx.Node, terms: list[Term], adds: list[fx.Node]) -> SiteMatch:
    x_node, w_node, bias_node = _linear_parts(base)
    if not isinstance(x_node, fx.Node) or any(t.source is not x_node for t in terms):
        raise Unsupported("a LoRA branch reads a different input than the base linear")
    x, w = _tensor(x_node, "x"), _tensor(w_node, "base weight")
    bias = _tensor(bias_node, "bias") if bias_node is not None else None
    if w.requires_grad:
        raise Unsupported("the base weight requires grad (full fine-tuning, not LoRA)")
    if x.dim() < 2 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise Unsupported(f"x{tuple(x.shape)} and W{tuple(w.shape)} are not a 2-D linear")
    if any(_mutates(user) for user in x_node.users):
        raise Unsupported("x is mutated in place")
    # The nodes the rewrite removes must feed nothing else.
    chain = [base, *adds]
    for node, user in zip(chain, chain[1:]):
        _only_user(node, user, "the base linear" if node is base else "a partial sum")
    for term, add in zip(terms, adds):
        inner = [term.lora_a, term.lora_b] + ([term.mul] if term.mul is not None else [])
        for node, user in zip(inner, [*inner[1:], add]):
            _only_user(node, user, "a LoRA intermediate")
    adapters = tuple(_adapter(t, x, int(w.shape[0])) for t in terms)
    tensors = [x, w, *([bias] if bias is not None else [])]
    tensors += [_tensor(_linear_parts(t.lora_a)[1], "A") for t in terms]
    tensors += [_tensor(_linear_parts(t.lora_b)[1], "B") for t in terms]
    if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
        raise Unsupported("x, W, bias and adapters differ in dtype or device")
    n = math.prod(x.shape[:-1])
    n_hint = optimization_hint(n) if isinstance(n, torch.SymInt) else int(n)
    out = _tensor(root, "the site's result")
    site = LoraSite(
        path=_site_path(base, terms),
        n=int(n_hint),
        d_in=int(w.shape[1]),
        d_out=int(w.shape[0]),
        adapters=adapters,
        dtype=x.dtype,
        has_bias=bias is not None,
        bias_requires_grad=bias is not None and bias.requires_grad,
        x_requires_grad=x.requires_grad,
        training=out.requires_grad,
        n_symbolic=None if isinstance(n, int) else str(n),
        # under autocast x and W are fp32 but the linear returns bf16/fp16: merging is judged
        # by the dtype W_eff would be rounded to
        compute_dtype=out.dtype if out.dtype != x.dtype else None,
        device=str(x.device),
    )
    reads_x = [a.reads_base_input for a in adapters]
    # A dropout that is the identity (eval, p = 0) becomes dead once the site reads x itself.
    dead_dropouts = [
        t.dropout for t, r in zip(terms, reads_x) if t.dropout is not None and r
        and set(t.dropout.users) == {t.lora_a}
    ]
    owned = {base, *adds, *dead_dropouts}
    base_view = _weight_view(base)
    if base_view is not None and set(base_view.users) == {base}:
        owned.add(base_view)
    for term in terms:
        owned |= {term.lora_a, term.lora_b} | ({term.mul} if term.mul is not None else set())
        owned |= {v for v in (_weight_view(term.lora_a), _weight_view(term.lora_b)) if v}
    order = {node: i for i, node in enumerate(root.graph.nodes)}
    mutation = _mutation_inside(min(owned, key=order.__getitem__), root)
    if mutation is not None:
        raise Unsupported(
            f"an in-place op ({mutation.name}) runs between the site's reads and its sum"
        )
    return SiteMatch(
        site=site,
        root=root,
        x=x_node,
        weight=w_node,
        bias=bias_node,
        lora_inputs=tuple(None if r else t.dropout for t, r in zip(terms, reads_x)),
        lora_a=tuple(_linear_parts(t.lora_a)[1] for t in terms),
        lora_b=tuple(_linear_parts(t.lora_b)[1] for t in terms),
        scales=tuple(t.scale for t in terms),
        owned=tuple(sorted(owned, key=order.__getitem__)),
    )


def _term_end(term: Term) -> fx.Node:
    return term.mul if term.mul is not None else term.lora_b


def _number_scaled(term: Term) -> bool:
    """Scaled by a number (not a tensor): PEFT always scales, and Dynamo keeps even `· 1.0`."""
    return term.mul is not None and not isinstance(_value(term.scale), torch.Tensor)


def _cut_branch(term: Term) -> bool:
    """A whole LoRA branch: rank-shaped, bias-free A (r×d_in) and B (d_out×r), r ≤ d_in, d_out;
    with a number scale or a linear beside it reading x into its shape (the base). Without
    either, a bare `linear(linear(x, W1), W2)` is as likely a factorized layer."""
    (_, a_node, a_bias), (_, b_node, b_bias) = map(_linear_parts, (term.lora_a, term.lora_b))
    a, b, out = _value(a_node), _value(b_node), _value(_term_end(term))
    if a_bias is not None or b_bias is not None or not all(
        isinstance(t, torch.Tensor) for t in (a, b, out)
    ):
        return False
    r = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or not r <= min(a.shape[1], b.shape[0]):
        return False
    return _number_scaled(term) or any(
        _is_linear(user) and user is not term.lora_a and _linear_parts(user)[0] is term.source
        and getattr(_value(user), "shape", None) == out.shape
        for user in term.source.users
    )


def _lora_b_half(node: fx.Node) -> fx.Node | None:
    """The lora_B linear of `s · linear(h, B)`, s a number, h a graph input (lora_A ran in an
    earlier graph) with r < d_out columns, B trainable; else None. The number scale tells it
    from a projection added to a residual, `res + linear(h, W)`."""
    if not _is(node, MUL) or len(node.args) != 2:
        return None
    lora_b = next((a for a in node.args if _is_linear(a)), None)
    scale = node.args[1] if lora_b is node.args[0] else node.args[0]
    if lora_b is None or not _is_scalar(_value(scale)) or isinstance(_value(scale), torch.Tensor):
        return None
    h, b_node, bias = _linear_parts(lora_b)
    h_value, b = _value(h), _value(b_node)
    if not (isinstance(h, fx.Node) and h.op == "placeholder" and bias is None):
        return None
    if not (isinstance(h_value, torch.Tensor) and isinstance(b, torch.Tensor) and b.dim() == 2):
        return None
    return lora_b if b.requires_grad and h_value.shape[-1] == b.shape[1] < b.shape[0] else None


def _unsummed_users(end: fx.Node, source: fx.Node | None) -> list[fx.Node]:
    """The users showing that the branch's sum with its base linear is in another graph: the
    graph output, or an add with a graph input (the base result from an earlier graph; not x
    itself, which a residual adapter adds) or with a linear (the base, when lora_A ran earlier)."""
    found = []
    for user in end.users:
        if user.op == "output":
            found.append(user)
        elif _is(user, ADD) and len(user.args) == 2:
            other = user.args[1] if user.args[0] is end else user.args[0]
            is_input = isinstance(other, fx.Node) and other.op == "placeholder"
            if (is_input and other is not source) or _is_linear(other):
                found.append(user)
    return found


def _cut_branches(graph: fx.Graph, summed: set[fx.Node]) -> list[SkippedSite]:
    """LoRA branches whose sum with the base linear is in another graph.

    Dynamo's DDP optimizer splits a graph at bucket boundaries, and a graph break splits a frame:
    either may fall inside a site, leaving `s · linear(linear(x, A), B)` (or its lora_B half) in
    one graph and the add in another. Neither graph holds the whole site, so it runs unrewritten;
    say so, once. `summed`: the term ends already in a matched or skipped sum.
    """
    skipped: list[SkippedSite] = []
    for node in graph.nodes:
        term = _parse_term(node)
        if term is not None and term.mul is None and any(
            (outer := _parse_term(user)) is not None and outer.mul is user for user in node.users
        ):
            continue  # the scaled form `s · linear(…)` is looked at from its mul
        if term is not None and node not in summed and _cut_branch(term):
            named, source = [term.lora_a, term.lora_b], term.source
        elif (lora_b := _lora_b_half(node)) is not None:
            named, source = [lora_b], None
        else:
            continue
        users = _unsummed_users(node, source)
        if users:
            adds = [u for u in users if u.op != "output"]  # they run in the site's module
            path = _common_path([*named, *adds]) or named[-1].name
            skipped.append(SkippedSite(path, CUT_REASON))
    return skipped


def find_sites(graph: fx.Graph) -> tuple[list[SiteMatch], list[SkippedSite]]:
    """Every LoRA-shaped sum in the graph: matched sites and skipped ones with reasons."""
    matches: list[SiteMatch] = []
    skipped: list[SkippedSite] = []
    claimed: set[fx.Node] = set()
    summed: set[fx.Node] = set()  # term ends in a parsed sum
    for node in reversed(graph.nodes):  # outermost sums first
        if node in claimed:
            continue
        parsed = _parse_sum(node)
        if parsed is None or not parsed[1]:
            continue
        base, terms, adds = parsed
        claimed.update(adds)
        summed.update(_term_end(t) for t in terms)
        try:
            matches.append(_match(node, base, terms, adds))
        except Unsupported as why:
            skipped.append(SkippedSite(_site_path(base, terms), str(why)))
    skipped += _cut_branches(graph, summed)
    order = {node: i for i, node in enumerate(graph.nodes)}
    matches.sort(key=lambda m: order[m.root])
    return matches, skipped
