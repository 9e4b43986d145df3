"""Bad input the option checks in test_end_to_end.py and test_debug.py do not cover: options
that are not a mapping and a debug_dir that is not a path. (Unknown options and criteria, an
invalid inner compiler and an unwritable debug_dir are tested there.)"""

from __future__ import annotations

import pytest
import torch

import runlora_fx


@pytest.mark.parametrize("options", [["criterion"], "flops", 3])
def test_options_that_are_not_a_mapping_are_refused_clearly(options):
    with pytest.raises(ValueError, match="runlora: options must be a dict of option names"):
        runlora_fx.Backend(options)


@pytest.mark.parametrize("debug_dir", [3, ["/tmp"], True])
def test_a_debug_dir_that_is_not_a_path_is_refused(debug_dir):
    with pytest.raises(ValueError, match="runlora: option debug_dir=.* is not a path"):
        runlora_fx.Backend({"debug_dir": debug_dir})


def test_a_refused_option_leaves_eager_training_usable():
    """A bad option fails the compile, not the model: the same module still trains eagerly."""
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="runlora", options={"criterion": "x"})
    with pytest.raises(Exception, match="criterion='x' is not valid"):
        compiled(torch.randn(2, 4))
    model(torch.randn(2, 4)).sum().backward()
    assert model.weight.grad is not None
