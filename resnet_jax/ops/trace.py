"""A model's layers as it calls them: every module call of one shape-only ``init``, in the order they return.

``fold.py`` (which BatchNorm reads which convolution's output) and ``tuning.py`` (which convolutions a model
computes) learn a model's structure from these calls, never from a field of the model, so both work for any
flax model built of ops' layers. Nothing is computed: the trace runs under ``jax.eval_shape``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModuleCall:
    """One ``__call__`` of a submodule: the module, its path of names, its arguments and its output (shape-dtype
    tracers, kept alive so that ``is`` tells which call's output another call read)."""

    module: nn.Module
    path: tuple[str, ...]
    args: tuple
    kwargs: dict[str, Any]
    output: Any


def module_calls(model: nn.Module, input_shape: tuple[int, ...], dtype: Any = jnp.float32) -> list[ModuleCall]:
    """The calls of ``model.init(key, zeros(input_shape, dtype))``, the model's default call (inference for
    the models of this package), in the order they return."""
    calls: list[ModuleCall] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            module = context.module
            calls.append(ModuleCall(module, tuple(module.scope.path), args, kwargs, out))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, dtype)))
    return calls
