"""Algorithm "gemm": a 1x1 convolution is a matrix product over pixels (strided: subsample first).

``(N*H*W, Cin) @ (Cin, Cout)`` is the shape XLA's dot runs fastest; autodiff gives the two gradients as the two
other products (``dy @ W^T`` scattered back to the kept pixels, and ``x^T @ dy``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from resnet_jax.ops.spec import Algorithm, accumulation_dtype


def kept_pixels(x, spec):
    """The pixels a 1x1 convolution reads: the padded input at every stride-th row and column."""
    if any(spec.padding[0]) or any(spec.padding[1]):
        x = jnp.pad(x, ((0, 0), *spec.padding, (0, 0)))
    return x[:, ::spec.strides[0], ::spec.strides[1], :]


def forward(x, kernel, spec):
    x = kept_pixels(x, spec)
    n, h, w, cin = x.shape
    y = lax.dot_general(x.reshape(-1, cin), kernel.reshape(cin, -1), (((1,), (0,)), ((), ())),
                        preferred_element_type=accumulation_dtype(x.dtype))
    return y.reshape(n, h, w, -1).astype(x.dtype)


def limits(spec) -> str | None:
    if spec.kernel != (1, 1) or spec.groups != 1:
        return "computes ungrouped 1x1 convolutions only"
    return None


GEMM = Algorithm.from_forward("gemm", forward, limits=limits)
ALGORITHMS = (GEMM,)
