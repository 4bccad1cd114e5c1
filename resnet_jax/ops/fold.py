"""``fold_batchnorm``: inference variables with every BatchNorm that follows a convolution folded into it.

In inference a BatchNorm is an affine map per channel, so ``BN(conv(x, w)) == conv(x, w * s) + (beta - mean * s)``
with ``s = gamma / sqrt(var + eps)``. The folded model skips one pass over every activation, and the residual
add and ReLU that follow become the convolution's epilogue, which the oneDNN algorithms fuse into the kernel.

Which BatchNorm belongs to which convolution is read off the model's calls (``trace.py``, shapes only): a
BatchNorm whose input is exactly a ``Conv``'s output is that convolution's partner, where the folded model
agrees (a bias on that convolution, no such BatchNorm). The trace alone cannot see a plain addition: a
pre-activation block's BatchNorm reading a bare stem convolution's output, which its identity shortcut also
takes, must stay. A model takes part by saying how it is built without its foldable BatchNorms, a small protocol
(every resnet_jax model implements it):

    with_batchnorm_folded() -> the same network with a bias on every convolution whose output feeds a BatchNorm
                               directly and no such BatchNorm, called the same way; ValueError if already folded
    probe_shape()           -> optional: an input shape it accepts (else the caller passes ``input_shape``)

Both models are traced by their default call, which must be inference. The folded variables are checked against
the folded model's own, so a model the rule does not fit is refused, never folded wrongly.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.ops.conv import Conv
from resnet_jax.ops.trace import module_calls

Path = tuple[str, ...]


def conv_batchnorm_pairs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[Path, tuple[Path, float, Any]]:
    """``{conv path: (batchnorm path, epsilon, the conv's compute dtype or None)}`` for every BatchNorm applied
    directly to a ``Conv``'s output (one computed without a residual or ReLU epilogue)."""
    produced: dict[int, tuple[Path, Any, Any]] = {}  # id(output) -> (conv path, output, compute dtype)
    pairs: dict[Path, tuple[Path, float, Any]] = {}
    for call in module_calls(model, input_shape):
        plain = len(call.args) == 1 and call.kwargs.get("residual") is None and not call.kwargs.get("relu")
        if isinstance(call.module, Conv) and plain:  # an output with an epilogue is no longer the conv's alone
            output = call.output[0] if call.kwargs.get("fan_out") else call.output  # (y, x) passed through
            produced[id(output)] = (call.path, output, call.module.dtype)
        elif isinstance(call.module, nn.BatchNorm) and call.args and id(call.args[0]) in produced:
            conv_path, source, dtype = produced[id(call.args[0])]
            if source is call.args[0]:
                pairs[conv_path] = (call.path, float(call.module.epsilon), dtype)
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
    """``(folded_model, folded_variables)`` for inference: outputs equal ``model.apply(variables, x)`` (its
    default, inference call) within float32 rounding. Works under ``jax.jit`` (the pairing is read from shapes).

    ``model`` implements the protocol above (``with_batchnorm_folded``, and ``probe_shape`` unless
    ``input_shape``, any input the model accepts, is given); ``variables`` are its ``{"params", "batch_stats"}``.

    Folded kernels and biases come in their convolution's compute dtype (bfloat16 in a ``dtype=bfloat16``
    model), the values it would cast them to on every call: the same outputs, without a pass over every weight
    per call (15 of ~38 ms of a bfloat16 ResNet-50's batch-1 inference on an AMX Xeon, BENCHMARKS.md).
    """
    make_folded = getattr(model, "with_batchnorm_folded", None)
    if make_folded is None:
        raise ValueError(f"{type(model).__name__} does not say how it is built with its BatchNorm folded; "
                         "fold_batchnorm needs a model with a with_batchnorm_folded() method (ops/fold.py), as "
                         "every resnet_jax model has")
    folded_model = make_folded()
    params, stats = _copy(dict(variables["params"])), _copy(dict(variables.get("batch_stats", {})))
    shape = _input_shape(model, input_shape)
    expected = _variable_shapes(folded_model, shape)
    pairs = {conv: pair for conv, pair in conv_batchnorm_pairs(model, shape).items()
             if _has(expected, ("params", *conv, "bias")) and not _has(expected, ("params", *pair[0]))}
    for conv_path, (bn_path, eps, compute_dtype) in pairs.items():
        bn, moments = _get(params, bn_path), _get(stats, bn_path)
        scale = bn["scale"] * jax.lax.rsqrt(moments["var"] + eps)
        kernel = _get(params, conv_path)["kernel"]
        dtype = compute_dtype or kernel.dtype  # what the folded Conv casts them to on every call anyway
        _set(params, conv_path, {"kernel": (kernel * scale).astype(dtype),
                                 "bias": (bn["bias"] - moments["mean"] * scale).astype(dtype)})
        _set(params, bn_path, None)
        _set(stats, bn_path, None)
    result = {"params": _prune(params), "batch_stats": _prune(stats)}
    _check_structure(expected, result)
    return folded_model, result


def _variable_shapes(model: nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
    return {k: v for k, v in variables.items() if k in ("params", "batch_stats")}


def _has(tree: dict, path: Path) -> bool:
    for name in path:
        if not isinstance(tree, dict) or name not in tree:
            return False
        tree = tree[name]
    return True


def _prune(tree: Any) -> Any:
    """Drop the None leaves left by folding, and the dicts they empty."""
    if not isinstance(tree, dict):
        return tree
    kept = {k: _prune(v) for k, v in tree.items() if v is not None}
    return {k: v for k, v in kept.items() if not (isinstance(v, dict) and not v)}


def _check_structure(expected, variables) -> None:
    got = {k: v for k, v in variables.items() if v or k in expected}
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)  # noqa: E731
    if shapes(jax.tree.map(jnp.asarray, got)) != shapes({k: expected.get(k, {}) for k in got}):
        raise ValueError("folding BatchNorm into the convolutions gave variables that do not fit the folded model; "
                         "this model's BatchNorm placement is not supported by fold_batchnorm")
