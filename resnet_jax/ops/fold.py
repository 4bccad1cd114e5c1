"""``fold_batchnorm``: inference variables with every BatchNorm that follows a convolution folded into it.

In inference a BatchNorm is an affine map per channel, so ``BN(conv(x, w)) == conv(x, w * s) + (beta - mean * s)``
with ``s = gamma / sqrt(var + eps)``. The folded model skips one pass over every activation, and the residual
add and ReLU that follow become the convolution's epilogue, which the oneDNN algorithms fuse into the kernel.

Which BatchNorm belongs to which convolution is read off the model itself: the unfolded model is traced once
(shapes only) and a BatchNorm whose input is exactly a convolution's output is that convolution's partner. The
folded model (``folded=True``) must then have a bias on exactly those convolutions and no such BatchNorm; the
two are checked against each other, so a model the rule does not fit is refused, never folded wrongly.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.ops.conv import Conv

Path = tuple[str, ...]


def conv_batchnorm_pairs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[Path, tuple[Path, float]]:
    """``{conv path: (batchnorm path, epsilon)}`` for every BatchNorm applied directly to a ``Conv``'s output
    (one computed without a residual or ReLU epilogue)."""
    produced: dict[int, tuple[Path, Any]] = {}  # id(output) -> (conv path, output); outputs kept alive
    pairs: dict[Path, tuple[Path, float]] = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            module = context.module
            plain = len(args) == 1 and kwargs.get("residual") is None and not kwargs.get("relu")
            if isinstance(module, Conv) and plain:  # an output with an epilogue is no longer the conv's alone
                produced[id(out)] = (tuple(module.scope.path), out)
            elif isinstance(module, nn.BatchNorm) and args and id(args[0]) in produced:
                conv_path, source = produced[id(args[0])]
                if source is args[0]:
                    pairs[conv_path] = (tuple(module.scope.path), float(module.epsilon))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32), train=False))
    return pairs


def _get(tree: dict, path: Path) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict, path: Path, value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _copy(tree: Any) -> Any:
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _input_shape(model, input_shape) -> tuple[int, ...]:
    """The input the pairing is traced on (shapes only): the caller's, else the one the model says it takes."""
    if input_shape is not None:
        return tuple(input_shape)
    probe = getattr(model, "probe_shape", None)
    if probe is None:
        raise ValueError(f"{type(model).__name__} does not say what input it takes; pass input_shape= (any shape "
                         "it accepts, e.g. (1, 224, 224, 3))")
    return tuple(probe())


def fold_batchnorm(model: nn.Module, variables: dict[str, Any],
                   input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``(folded_model, folded_variables)`` for inference: outputs equal ``model.apply(variables, x,
    train=False)`` within float32 rounding. Works under ``jax.jit`` (the pairing is read from shapes only).

    ``model`` needs a ``folded`` field, which builds the same network with biased convolutions and no BatchNorm
    after them (every ``ResNet`` has one); ``variables`` are its usual ``{"params", "batch_stats"}``.
    ``input_shape`` is any input the model accepts (default: ``model.probe_shape()``).
    """
    if getattr(model, "folded", None) is None:
        raise ValueError(f"{type(model).__name__} has no 'folded' option; fold_batchnorm needs a resnet_jax model")
    if model.folded:
        raise ValueError("this model is already folded; pass the unfolded model and its variables")
    params, stats = _copy(dict(variables["params"])), _copy(dict(variables.get("batch_stats", {})))
    shape = _input_shape(model, input_shape)
    pairs = conv_batchnorm_pairs(model, shape)
    for conv_path, (bn_path, eps) in pairs.items():
        bn, moments = _get(params, bn_path), _get(stats, bn_path)
        scale = bn["scale"] * jax.lax.rsqrt(moments["var"] + eps)
        kernel = _get(params, conv_path)["kernel"]
        _set(params, conv_path, {"kernel": (kernel * scale).astype(kernel.dtype),
                                 "bias": (bn["bias"] - moments["mean"] * scale).astype(kernel.dtype)})
        _set(params, bn_path, None)
        _set(stats, bn_path, None)
    folded_model = model.clone(folded=True)
    result = {"params": _prune(params), "batch_stats": _prune(stats)}
    _check_structure(folded_model, result, shape)
    return folded_model, result


def _prune(tree: Any) -> Any:
    """Drop the None leaves left by folding, and the dicts they empty."""
    if not isinstance(tree, dict):
        return tree
    kept = {k: _prune(v) for k, v in tree.items() if v is not None}
    return {k: v for k, v in kept.items() if not (isinstance(v, dict) and not v)}


def _check_structure(folded_model, variables, shape) -> None:
    expected = jax.eval_shape(lambda: folded_model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    expected = {k: v for k, v in expected.items() if k in ("params", "batch_stats")}
    got = {k: v for k, v in variables.items() if v or k in expected}
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)  # noqa: E731
    if shapes(jax.tree.map(jnp.asarray, got)) != shapes({k: expected.get(k, {}) for k in got}):
        raise ValueError("folding BatchNorm into the convolutions gave variables that do not fit the folded model; "
                         "this model's BatchNorm placement is not supported by fold_batchnorm")
