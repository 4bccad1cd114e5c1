"""Algorithm "matmul_grad": XLA's own forward and input gradient, the kernel gradient as one matrix product.

XLA:CPU lowers the gradient of a convolution with respect to its kernel to a convolution that runs ~8x below
oneDNN at large spatial sizes (docs/cpu-convolution.md). Here d/dkernel is ``patches(x).T @ dy`` instead, where
the patches are the k*k shifted (strided) slices of the padded input concatenated on the channel axis, in HWIO
order, so the product reshapes straight into the kernel layout. Grouped convolutions (ResNeXt) keep XLA's
gradient: the patch product would need one matmul per group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.ops.xla import xla_conv


def patches(x: jnp.ndarray, kernel_hw: tuple[int, int], strides, padding, out_hw) -> jnp.ndarray:
    """(N*Ho*Wo, kh*kw*C) rows of input windows, tap-major then channel, matching an HWIO kernel's rows."""
    (kh, kw), (sh, sw), (ho, wo) = kernel_hw, strides, out_hw
    if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
        return x[:, ::sh, ::sw, :][:, :ho, :wo, :].reshape(-1, x.shape[-1])
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    taps = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(taps, axis=-1).reshape(-1, kh * kw * x.shape[-1])


def kernel_gradient(x, dy, kernel_shape, kernel_dtype, strides, padding):
    """d/dkernel of a groups=1 convolution as one (kh*kw*Cin, N*Ho*Wo) @ (N*Ho*Wo, Cout) product."""
    kh, kw, cin, cout = kernel_shape
    rows = patches(x, (kh, kw), strides, padding, dy.shape[1:3])
    dk = lax.dot_general(rows, dy.reshape(-1, cout), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dk.reshape(kh, kw, cin, cout).astype(kernel_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x, kernel, strides, padding, groups):
    return xla_conv(x, kernel, strides, padding, groups)


def _fwd(x, kernel, strides, padding, groups):
    return xla_conv(x, kernel, strides, padding, groups), (x, kernel)


def _bwd(strides, padding, groups, saved, dy):
    x, kernel = saved
    _, input_vjp = jax.vjp(lambda x_: xla_conv(x_, kernel, strides, padding, groups), x)
    (dx,) = input_vjp(dy)  # XLA's transposed convolution: already close to oneDNN on CPU
    if groups != 1:
        _, kernel_vjp = jax.vjp(lambda k_: xla_conv(x, k_, strides, padding, groups), kernel)
        return dx, kernel_vjp(dy)[0]
    return dx, kernel_gradient(x, dy, kernel.shape, kernel.dtype, strides, padding)


conv.defvjp(_fwd, _bwd)


# Algorithm "im2col": the forward pass as one matrix product too (patches @ kernel rows); same backward.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def im2col(x, kernel, strides, padding, groups):
    return _im2col_forward(x, kernel, strides, padding)


def _im2col_forward(x, kernel, strides, padding):
    kh, kw, cin, cout = kernel.shape
    ho = (x.shape[1] + sum(padding[0]) - kh) // strides[0] + 1
    wo = (x.shape[2] + sum(padding[1]) - kw) // strides[1] + 1
    rows = patches(x, (kh, kw), strides, padding, (ho, wo))
    y = lax.dot_general(rows, kernel.reshape(-1, cout), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return y.reshape(x.shape[0], ho, wo, cout).astype(x.dtype)


im2col.defvjp(lambda x, kernel, strides, padding, groups: (_im2col_forward(x, kernel, strides, padding), (x, kernel)),
              _bwd)


def im2col_limits(g) -> str | None:
    return "computes ungrouped convolutions only" if g.groups != 1 else None
