"""`runlora_fx.compile(model)`: compile a model in place with runlora, for HF Trainer, TRL and
plain training loops, gradient checkpointing included.

Like `nn.Module.compile`, it sets the model's `_compiled_call_impl`, so a Trainer handed the
model sees the same object (a PeftModel stays one). Two things differ from
`model.compile(backend="runlora")`, and both are scoped to this model's compiled calls:

- Dynamo's `skip_fwd_side_effects_in_bwd_under_checkpoint` is True while the call runs.
  transformers >= 5.25 sets a context variable outside each checkpointed layer and reads it
  inside; Dynamo refuses that side effect in a checkpoint body and runs the layer, LoRA
  included, eagerly. Dynamo reads the setting when it traces a checkpoint (the trace and every
  recompile happen inside the call), and no guard records it, so patching the call is enough;
  the process-wide value is never changed.
- `use_cache=False` is passed when transformers would turn the cache off itself (training,
  gradients on, a module checkpointing): it does so with a `logger.warning_once` inside the
  forward, which Dynamo does not trace — a graph break in every compiled forward. Passed before
  the compiled call, the switch never runs there. One INFO line says so.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from runlora_fx.backend import Backend

log = logging.getLogger("runlora_fx")

M = TypeVar("M", bound=torch.nn.Module)

DYNAMO_SETTING = "skip_fwd_side_effects_in_bwd_under_checkpoint"
USE_CACHE_OFF = (
    "runlora: {model} trains with gradient checkpointing: its compiled calls get "
    "use_cache=False, as transformers sets it then (passed before the compiled forward: "
    "transformers' own switch logs a warning inside it, where the graph would break)"
)


def compile(model: M, *, backend: Backend | None = None, mode: str | None = None,
            **options: Any) -> M:
    """Compile `model` in place with the runlora backend and return it (the same object).

    `options` are the backend's (`runlora_fx.parse_options`; an unknown one raises
    ValueError), `mode` is Inductor's. Or pass `backend=runlora_fx.Backend(...)`, to read its
    `reports` afterwards. Gradient checkpointing compiles (Dynamo's side-effect setting during
    this model's calls only) and use_cache is turned off where transformers turns it off."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"runlora_fx.compile: expected a torch.nn.Module, not {type(model)!r}")
    if backend is None:
        backend = Backend(options, mode)  # parses the options now: a bad one raises here
    elif options or mode is not None:
        raise ValueError("runlora_fx.compile: give options (and mode) or a Backend, not both")
    elif not isinstance(backend, Backend):
        raise TypeError(f"runlora_fx.compile: backend must be a runlora_fx.Backend, not "
                        f"{type(backend)!r}")
    # torch.compile of the bound _call_impl, as nn.Module.compile does: the coverage accounting
    # finds the model through it (coverage.models_of)
    compiled = torch.compile(model._call_impl, backend=backend)
    model._compiled_call_impl = CompiledCall(model, compiled)
    return model


class CompiledCall:
    """What `model(...)` runs once compiled: the compiled call under this model's settings."""

    def __init__(self, model: torch.nn.Module, compiled: Callable[..., Any]) -> None:
        self.model = model  # as nn.Module.compile's bound method holds it
        self.compiled = compiled
        self.use_cache_at = _use_cache_position(model)
        self.said = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = self.without_cache(args, kwargs)
        with torch._dynamo.config.patch(**{DYNAMO_SETTING: True}):
            return self.compiled(*args, **kwargs)

    def without_cache(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """`kwargs` with use_cache=False where transformers would set it so itself
        (utils/generic.py `merge_with_config_defaults`, modeling_layers.py): training, grad
        enabled, a module checkpointing, and the cache asked for or on in the config."""
        if self.use_cache_at is None or len(args) > self.use_cache_at:
            return kwargs  # the forward takes no use_cache, or it came positionally
        wanted = kwargs.get("use_cache")
        if wanted is None:
            wanted = _config_use_cache(self.model)
        if not (wanted and self.model.training and torch.is_grad_enabled()
                and _checkpointing(self.model)):
            return kwargs
        if not self.said:
            self.said = True
            log.info(USE_CACHE_OFF.format(model=type(self.model).__name__))
        return {**kwargs, "use_cache": False}


def _use_cache_position(model: torch.nn.Module) -> int | None:
    """How many positional arguments may come before `use_cache` is among them (sys.maxsize
    when it can only come as a keyword); None when the model's forward takes no use_cache."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read: leave use_cache alone
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for at, (name, parameter) in enumerate(parameters.items()):
        if name == "use_cache":
            return at if parameter.kind in positional else sys.maxsize
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return sys.maxsize if takes_any else None  # PeftModel's forward(*args, **kwargs)


def _config_use_cache(model: torch.nn.Module) -> bool:
    """The model's config default for use_cache (a PeftModel reads its base model's)."""
    config = getattr(model, "config", None)
    value = getattr(config, "use_cache", None)
    if value is None and callable(getattr(config, "get_text_config", None)):
        value = getattr(config.get_text_config(), "use_cache", None)  # a multimodal model's
    return bool(value)


def _checkpointing(model: torch.nn.Module) -> bool:
    """Whether a module of `model` checkpoints: transformers' per-module flag, read as its
    `is_activation_checkpointing` reads it. Per call: Trainer and TRL turn checkpointing on
    after the model was compiled."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
