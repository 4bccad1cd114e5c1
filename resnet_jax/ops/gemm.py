"""Algorithm "gemm": a 1x1 convolution is a matrix product over pixels (strided: subsample first).

``(N*H*W, Cin) @ (Cin, Cout)`` is the shape XLA's dot runs fastest; autodiff gives the two gradients as the two
other products (``dy @ W^T`` scattered back to the kept pixels, and ``x^T @ dy``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def forward(x, kernel, strides, padding, groups):
    sh, sw = strides
    if any(padding[0]) or any(padding[1]):
        x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    x = x[:, ::sh, ::sw, :]
    n, h, w, cin = x.shape
    y = lax.dot_general(x.reshape(-1, cin), kernel.reshape(cin, -1), (((1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32)
    return y.reshape(n, h, w, -1).astype(x.dtype)


def limits(g) -> str | None:
    if g.kernel != (1, 1) or g.groups != 1:
        return "computes ungrouped 1x1 convolutions only"
    return None
