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
from jax import lax


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


@jax.custom_vjp
def _sliced_max_pool(x):
    return functools.reduce(jnp.maximum, _taps(x)[1])


def _fwd(x):
    y = _sliced_max_pool(x)
    return y, (x, y)


def _bwd(saved, dy):
    x, y = saved
    xp, taps = _taps(x)
    ho, wo = y.shape[1:3]
    free = jnp.ones(y.shape, bool)  # windows whose gradient has not been given to an element yet
    placed = []
    for k, tap in enumerate(taps):
        hit = free & (tap == y)
        free = free & ~hit
        part = jnp.where(hit, dy, jnp.zeros_like(dy))
        i, j = divmod(k, 3)
        # put the window's gradient back at its element: rows i, i + 2, ..., columns j, j + 2, ...
        config = [(0, 0, 0), (i, xp.shape[1] - i - (2 * ho - 1), 1), (j, xp.shape[2] - j - (2 * wo - 1), 1), (0, 0, 0)]
        placed.append(lax.pad(part, jnp.zeros((), dy.dtype), config))
    # An element shared by overlapping windows sums their gradients in window order, as select_and_scatter does
    # (so the rounding is the same too): a later tap (i, j) reaches an element from an earlier window.
    dxp = functools.reduce(jnp.add, placed[::-1])
    return (dxp[:, 1:-1, 1:-1, :],)


_sliced_max_pool.defvjp(_fwd, _bwd)
