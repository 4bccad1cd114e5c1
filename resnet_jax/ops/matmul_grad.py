"""Kernel gradient (and, for "im2col", the forward too) as one matrix product over input patches.

XLA:CPU lowers the gradient of a convolution with respect to its kernel to a convolution that runs far below
oneDNN at large spatial sizes (docs/cpu-convolution.md). ``kernel_grad`` computes it as ``patches(x).T @ dy``
instead, where the patches are the k*k shifted (strided) slices of the padded input concatenated on the
channel axis, in HWIO order, so the product reshapes straight into the kernel layout. Algorithm "matmul_grad"
is XLA's forward and input gradient with this kernel gradient; "im2col" also computes the forward as
``patches @ kernel``. Grouped convolutions keep XLA's kernel gradient (one product per group would be needed).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from resnet_jax.ops.spec import Algorithm, accumulation_dtype
from resnet_jax.ops.xla import XLA


def patches(x: jnp.ndarray, spec) -> jnp.ndarray:
    """(N*Ho*Wo, kh*kw*C) rows of input windows, tap-major then channel, matching an HWIO kernel's rows."""
    (kh, kw), (sh, sw), (_, ho, wo, _) = spec.kernel, spec.strides, spec.y_shape
    if (kh, kw) == (1, 1) and spec.padding == ((0, 0), (0, 0)):
        return x[:, ::sh, ::sw, :][:, :ho, :wo, :].reshape(-1, x.shape[-1])
    xp = jnp.pad(x, ((0, 0), *spec.padding, (0, 0)))
    taps = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(taps, axis=-1).reshape(-1, kh * kw * x.shape[-1])


def kernel_grad(x, dy, spec):
    """(kh*kw*Cin, N*Ho*Wo) @ (N*Ho*Wo, Cout): the product shape XLA's dot runs fastest."""
    if spec.groups != 1:
        return XLA.kernel_grad(x, dy, spec)
    dk = lax.dot_general(patches(x, spec), dy.reshape(-1, spec.out_channels), (((0,), (0,)), ((), ())),
                         preferred_element_type=accumulation_dtype(x.dtype))
    return dk.reshape(spec.kernel_shape).astype(x.dtype)


def im2col_forward(x, kernel, spec):
    y = lax.dot_general(patches(x, spec), kernel.reshape(-1, spec.out_channels), (((1,), (0,)), ((), ())),
                        preferred_element_type=accumulation_dtype(x.dtype))
    return y.reshape(spec.y_shape).astype(x.dtype)


def im2col_limits(spec) -> str | None:
    return "computes ungrouped convolutions only" if spec.groups != 1 else None


ALGORITHMS = (
    Algorithm(name="matmul_grad", forward=XLA.forward, input_grad=XLA.input_grad, kernel_grad=kernel_grad),
    Algorithm(name="im2col", forward=im2col_forward, input_grad=XLA.input_grad, kernel_grad=kernel_grad,
              limits=im2col_limits),
)
