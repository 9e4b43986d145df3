"""What the partitioned graphs really do — saved set and FLOPs — the check on every plan's claim."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.utils.flop_counter import FlopCounterMode

from runlora_fx.ir.compat import size_hint


@dataclass(frozen=True)
class SavedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    is_parameter: bool


def saved_tensors(
    forward: fx.GraphModule, backward: fx.GraphModule, parameter_inputs: tuple[bool, ...]
) -> list[SavedTensor]:
    """The backward graph's non-tangent tensor inputs; a saved graph input keeps its forward
    placeholder's name, so parameters are told apart by position among the forward inputs."""
    forward_inputs = [n.name for n in forward.graph.nodes if n.op == "placeholder"]
    is_param = dict(zip(forward_inputs, parameter_inputs))
    saved = []
    for node in backward.graph.nodes:
        value = node.meta.get("val")
        if node.op != "placeholder" or node.name.startswith("tangents"):
            continue
        if not isinstance(value, torch.Tensor):
            continue  # saved SymInts
        shape = tuple(size_hint(d) for d in value.shape)
        numel = 1
        for d in shape:
            numel *= d
        saved.append(
            SavedTensor(
                node.name, shape, value.dtype, numel * value.element_size(),
                is_param.get(node.name, False),
            )
        )
    return saved


def saved_activation_bytes(
    forward: fx.GraphModule, backward: fx.GraphModule, parameter_inputs: tuple[bool, ...]
) -> int:
    return sum(
        t.nbytes for t in saved_tensors(forward, backward, parameter_inputs) if not t.is_parameter
    )


def graph_flops(gm: fx.GraphModule) -> int:
    """FLOPs of one run of a partitioned graph, counted by FlopCounterMode on its fake inputs.

    (A FlopCounterMode around a compiled step sees eager ops only: Dynamo runs frames eagerly
    while a dispatch mode is active.)
    """
    inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    fake_mode = detect_fake_mode(inputs)
    assert fake_mode is not None, "the graph's placeholders carry no fake values"
    with fake_mode, FlopCounterMode(display=False) as counter:
        gm(*inputs)
    return counter.get_total_flops()
