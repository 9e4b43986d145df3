"""Module paths of graph nodes, as PEFT and the reports name modules."""

from __future__ import annotations

import re

import torch.fx as fx


def module_path(node: fx.Node) -> str | None:
    """`L['self'].__dict__['_modules']['base_model']…q_proj` → `base_model…q_proj`."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return normalise_path(list(stack.values())[-1][0])


def normalise_path(path: str) -> str:
    path = re.sub(r"^L\['[^']*'\]", "", path)
    path = re.sub(r"\.__dict__\['_modules'\]\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return path.lstrip(".")


def common_path(nodes: list[fx.Node]) -> str:
    """The innermost module holding all `nodes` (their module paths' common prefix), or ""."""
    paths = [p for p in map(module_path, nodes) if p]
    common = []
    for level in zip(*(p.split(".") for p in paths)):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)
