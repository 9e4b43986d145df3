"""LoRA branches whose sum with the base linear is in another graph.

Dynamo's DDP optimizer splits a graph at bucket boundaries, and a graph break splits a frame:
either may fall inside a site, leaving `s · linear(linear(x, A), B)` (or its lora_B half) in one
graph and the add in another. Neither graph holds the whole site, so it runs unrewritten; say
so, once.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from runlora_fx.passes.paths import common_path
from runlora_fx.passes.patterns import (
    ADD, MUL, Term, dropout_source, is_call, is_scalar, linear, strip_casts, tensor_value, term,
    value,
)
from runlora_fx.ir.site import SkippedSite

CUT_REASON = (
    "the site is cut across graphs (a DDP bucket boundary or a graph break): its LoRA branch "
    "and the sum with its base linear are compiled apart"
)


def _source(t: Term) -> object:
    """x as the branch reads it, dropout and casts stripped."""
    inner = dropout_source(t.lora_input)
    return strip_casts(inner if inner is not None else t.lora_input)


def _number_scaled(t: Term) -> bool:
    """Scaled by a number (not a tensor): PEFT always scales, and Dynamo keeps even `· 1.0`."""
    return t.mul is not None and not isinstance(value(t.scale), torch.Tensor)


def _whole_branch(t: Term) -> bool:
    """A whole LoRA branch: rank-shaped, bias-free A (r×d_in) and B (d_out×r), r ≤ d_in, d_out;
    with a number scale or a linear beside it reading x into its shape (the base). Without
    either, a bare `linear(linear(x, W1), W2)` is as likely a factorized layer."""
    a, b, out = (tensor_value(n) for n in (t.lora_a.weight, t.lora_b.weight, t.end))
    if t.lora_a.bias is not None or t.lora_b.bias is not None or a is None or b is None:
        return False
    r = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or not r <= min(a.shape[1], b.shape[0]):
        return False
    source = _source(t)
    return _number_scaled(t) or any(
        (found := linear(user)) is not None and user is not t.lora_a.node and found.x is source
        and out is not None and getattr(tensor_value(user), "shape", None) == out.shape
        for user in getattr(source, "users", ())
    )


def _lora_b_half(node: fx.Node) -> fx.Node | None:
    """The lora_B linear of `s · linear(h, B)`, s a number, h a graph input (lora_A ran in an
    earlier graph) with r < d_out columns, B trainable; else None. The number scale tells it
    from a projection added to a residual, `res + linear(h, W)`."""
    if not is_call(node, MUL) or len(node.args) != 2:
        return None
    lora_b = next((a for a in node.args if linear(a) is not None), None)
    scale = node.args[1] if lora_b is node.args[0] else node.args[0]
    if lora_b is None or not is_scalar(value(scale)) or isinstance(value(scale), torch.Tensor):
        return None
    found = linear(lora_b)
    assert found is not None
    h_value, b = tensor_value(found.x), tensor_value(found.weight)
    if not (found.x.op == "placeholder" and found.bias is None and not found.inner):
        return None
    if h_value is None or b is None or b.dim() != 2:
        return None
    return lora_b if b.requires_grad and h_value.shape[-1] == b.shape[1] < b.shape[0] else None  # type: ignore[return-value]


def _unsummed_users(end: fx.Node, source: object) -> list[fx.Node]:
    """The users showing that the branch's sum with its base linear is in another graph: the
    graph output, or an add with a graph input (the base result from an earlier graph; not x
    itself, which a residual adapter adds) or with a linear (the base, when lora_A ran earlier)."""
    found = []
    for user in end.users:
        if user.op == "output":
            found.append(user)
        elif is_call(user, ADD) and len(user.args) == 2:
            other = user.args[1] if user.args[0] is end else user.args[0]
            is_input = isinstance(other, fx.Node) and other.op == "placeholder"
            if (is_input and other is not source) or linear(other) is not None:
                found.append(user)
    return found


def cut_sites(graph: fx.Graph, summed: set[fx.Node]) -> list[SkippedSite]:
    """One skipped entry per cut site; `summed`: term ends already in a matched or skipped sum."""
    skipped: list[SkippedSite] = []
    for node in graph.nodes:
        found = term(node)
        if found is not None and found.mul is None and any(
            (outer := term(user)) is not None and outer.mul is user for user in node.users
        ):
            continue  # the scaled form `s · linear(…)` is looked at from its mul
        if found is not None and node not in summed and _whole_branch(found):
            named, source = [found.lora_a.node, found.lora_b.node], _source(found)
        elif (lora_b := _lora_b_half(node)) is not None:
            named, source = [lora_b], None
        else:
            continue
        users = _unsummed_users(node, source)
        if users:
            adds = [u for u in users if u.op != "output"]  # they run in the site's module
            path = common_path([*named, *adds]) or named[-1].name
            skipped.append(SkippedSite(path, CUT_REASON))
    return skipped
