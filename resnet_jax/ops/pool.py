"""The stem's 3x3 stride-2 max-pool as the maximum of nine strided views, for CPUs.

XLA:CPU runs ``reduce_window`` (and its gradient, ``select_and_scatter``) far below memory speed: 37 ms forward
and 206 ms forward + backward for ResNet-50's 112x112x64 pool at batch 32, ~7% of a training step and of
inference. The maximum of the nine shifted, strided slices of the padded input is one fused elementwise pass
(8 ms; 40 ms with the gradient below; BENCHMARKS.md, attempts). The gradient
goes to the first maximum of each window in row-major order, as XLA's ``select_and_scatter`` (with ``ge``)
does, so values and gradients equal ``flax.linen.max_pool``'s exactly, ties included (ties are common after a
ReLU). Other backends keep ``reduce_window``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
    """``nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))`` (NHWC)."""
    if jax.default_backend() != "cpu":
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return _sliced_max_pool(x)


def _taps(x):
    """The padded input and its nine strided views (row-major window order), each (N, Ho, Wo, C)."""
    ho, wo = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    taps = [xp[:, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2, :] for i in range(3) for j in range(3)]
    return xp, taps


@jax.custom_jvp
def _sliced_max_pool(x):
    return functools.reduce(jnp.maximum, _taps(x)[1])


@_sliced_max_pool.defjvp
def _sliced_max_pool_jvp(primals, tangents):
    """Each window's tangent is its first maximum's (row-major), as ``select_and_scatter`` routes gradients.

    The map is linear in the tangent (strided slices of the zero-padded tangent, selected by masks of the
    primal), so forward mode uses it as it is and reverse mode is its transpose: the selected cotangent padded
    back into place, which is the first-max gradient."""
    (x,), (dx,) = primals, tangents
    y = _sliced_max_pool(x)
    _, taps = _taps(x)
    ho, wo = y.shape[1:3]
    dxp = jnp.pad(dx, ((0, 0), (1, 1), (1, 1), (0, 0)))
    free = jnp.ones(y.shape, bool)  # windows whose maximum has not been found yet
    t = jnp.zeros_like(y)
    for k, tap in enumerate(taps):
        hit = free & (tap == y)
        free = free & ~hit
        i, j = divmod(k, 3)
        t = t + jnp.where(hit, dxp[:, i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2, :], jnp.zeros_like(t))
    return y, t
