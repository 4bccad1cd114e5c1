"""Kernel gradient (and, for "im2col", the forward too) as one matrix product over input patches.

XLA:CPU lowers the gradient of a convolution with respect to its kernel to a convolution that runs ~8x below
oneDNN at large spatial sizes (docs/cpu-convolution.md). ``kernel_grad`` computes it as ``patches(x).T @ dy``
instead, where the patches are the k*k shifted (strided) slices of the padded input concatenated on the
channel axis, in HWIO order, so the product reshapes straight into the kernel layout. Algorithm "matmul_grad"
is XLA's forward and input gradient with this kernel gradient; "im2col" also computes the forward as
``patches @ kernel``. Grouped convolutions keep XLA's kernel gradient (one product per group would be needed).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from resnet_jax.ops import xla


def patches(x: jnp.ndarray, kernel_hw: tuple[int, int], strides, padding, out_hw) -> jnp.ndarray:
    """(N*Ho*Wo, kh*kw*C) rows of input windows, tap-major then channel, matching an HWIO kernel's rows."""
    (kh, kw), (sh, sw), (ho, wo) = kernel_hw, strides, out_hw
    if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
        return x[:, ::sh, ::sw, :][:, :ho, :wo, :].reshape(-1, x.shape[-1])
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    taps = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(taps, axis=-1).reshape(-1, kh * kw * x.shape[-1])


def kernel_grad(x, dy, kernel_shape, kernel_dtype, strides, padding, groups):
    """(kh*kw*Cin, N*Ho*Wo) @ (N*Ho*Wo, Cout): the product shape XLA's dot runs fastest."""
    if groups != 1:
        return xla.kernel_grad(x, dy, kernel_shape, kernel_dtype, strides, padding, groups)
    kh, kw, cin, cout = kernel_shape
    rows = patches(x, (kh, kw), strides, padding, dy.shape[1:3])
    dk = lax.dot_general(rows, dy.reshape(-1, cout), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dk.reshape(kh, kw, cin, cout).astype(kernel_dtype)


def im2col_forward(x, kernel, strides, padding, groups):
    kh, kw, cin, cout = kernel.shape
    ho = (x.shape[1] + sum(padding[0]) - kh) // strides[0] + 1
    wo = (x.shape[2] + sum(padding[1]) - kw) // strides[1] + 1
    rows = patches(x, (kh, kw), strides, padding, (ho, wo))
    y = lax.dot_general(rows, kernel.reshape(-1, cout), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return y.reshape(x.shape[0], ho, wo, cout).astype(x.dtype)


def im2col_limits(g) -> str | None:
    return "computes ungrouped convolutions only" if g.groups != 1 else None
