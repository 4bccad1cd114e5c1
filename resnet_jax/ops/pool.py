"""``max_pool``: on CPU the maximum of the window's strided views, elsewhere ``reduce_window`` (and in a model
whose convolutions are XLA's own: ``rules.max_pool_method`` decides).

XLA:CPU runs ``reduce_window`` and its gradient, ``select_and_scatter``, far below memory speed (docs/
cpu-convolution.md). The maximum of the window's shifted, strided slices of the padded input is one fused
elementwise pass (with the extension, float32: one C++ pass that also records each window's first maximum).
The gradient goes to the first maximum of each window in row-major order, as XLA's
``select_and_scatter`` (with ``ge``) does, so values and gradients equal ``flax.linen.max_pool``'s exactly,
ties included (ties are common after a ReLU), in every window without a NaN. In a window holding a NaN (whose
output, and so the loss, is NaN) the gradient goes to the last tap, where ``select_and_scatter``'s sequential
``ge`` lands elsewhere (``[nan, 2, 1]``: on the 2). In bfloat16 the routing is the same and each input's gradient is
the float32 sum of the cotangents routed to it, rounded once (``select_and_scatter`` rounds after every add).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.ops.onednn import calls
from resnet_jax.ops.pool_grad import pooled_shape, route, taps
from resnet_jax.ops.rules import max_pool_method, may_use_extension
from resnet_jax.ops.spec import geometry, positive_pair

Pair = tuple[int, int]
# the strided views record each window's first maximum as an int8 tap index; a larger window (a global pool over
# a 12x12 map) is XLA's own reduce_window, which a window of that many views would not beat anyway
MAX_TAPS = 127


def max_pool(x: jnp.ndarray, window: Pair = (3, 3), strides: Pair = (2, 2),
             padding: tuple[Pair, Pair] = ((1, 1), (1, 1)), algorithm: str = "auto") -> jnp.ndarray:
    """``nn.max_pool(x, window, strides, padding)`` over NHWC ``x`` (default: the ResNet stem's 3x3/2 pool).

    ``algorithm`` is the model's convolution choice (its ``conv_impl``); the pool follows it as
    ``rules.max_pool_method`` says: a model of XLA's own convolutions keeps XLA's own window op, as the plain-XLA
    reference and the exported artifacts do; otherwise the strided views run on CPU.
    """
    window = positive_pair("window", window)
    strides, padding = geometry(x.shape[1:3], window, strides, padding)  # checked: a 0 divided by zero
    # flax's (N, 0, 0, C); the batch only by equality, which a symbolic one (jax.export) can answer
    empty = 0 in x.shape or min(pooled_shape(x.shape, window, strides, padding)[1:3]) < 1
    if (max_pool_method(algorithm, jax.default_backend()) == "reduce_window" or window[0] * window[1] > MAX_TAPS
            or empty):
        return nn.max_pool(x, window, strides=strides, padding=padding)
    return _sliced_max_pool(x, window, strides, padding, may_use_extension(algorithm, jax.default_backend()))


def _wide(dtype):
    """The dtype the pool computes in: float32 for narrower floats. A maximum is exact in any float dtype, so
    values and routing are unchanged; but in bfloat16 XLA:CPU rounds every intermediate of the fused window
    chain back to bfloat16 and ran the pool's forward + backward 25x slower than in float32 (2.0 s against 82 ms
    at ResNet-50's 32x112x112x64; BENCHMARKS.md, Machine A2, 2026-12-03, issue 33)."""
    return jnp.promote_types(dtype, jnp.float32)


def _sliced_max_pool(x, window, strides, padding, extension=False):
    return _pool_and_first(x, window, strides, padding, extension)[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _pool_and_first(x, window, strides, padding, extension):
    """``(y, first)``: the pool and, per window, which tap (row-major) holds its first maximum (int8), the
    routing of its derivative. With the extension, float32, both in one C++ pass over ``x``; else jnp, where
    XLA drops ``first`` when only ``y`` is used."""
    if extension and x.dtype == jnp.float32:
        return tuple(calls.max_pool(x, pooled_shape(x.shape, window, strides, padding), window, strides, padding))
    wide = _wide(x.dtype)
    views = taps(x.astype(wide), window, strides, padding, -jnp.inf)
    y = functools.reduce(jnp.maximum, views)
    first = jnp.full(y.shape, len(views) - 1, jnp.int8)  # where no tap equals y (a NaN): the last
    for k in reversed(range(len(views) - 1)):
        first = jnp.where(views[k] == y, jnp.int8(k), first)
    return y.astype(x.dtype), first


@_pool_and_first.defjvp
def _pool_and_first_jvp(window, strides, padding, extension, primals, tangents):
    """Each window's tangent is its first maximum's (row-major), as ``select_and_scatter`` routes gradients;
    ``first`` is an integer, with no tangent.

    The map is linear in the tangent (strided views of the zero-padded tangent, selected by which tap holds each
    window's first maximum), so forward mode uses it as it is and reverse mode is its transpose: the selected
    cotangent padded back into place, which is the first-max gradient. Both are ``pool_grad``'s primitives, so
    with the extension (``extension``) that transpose runs as one C++ pass. Both are computed in ``_wide``'s dtype;
    the tangent is rounded once at the end."""
    (x,), (dx,) = primals, tangents
    y, first = _pool_and_first(x, window, strides, padding, extension)  # higher orders: this rule again
    t = route(dx.astype(_wide(x.dtype)), first, window, strides, padding, extension=extension)
    return (y, first), (t.astype(dx.dtype), np.zeros(first.shape, jax.dtypes.float0))

