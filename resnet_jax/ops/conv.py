"""A 2-D NHWC convolution whose kernel gradient is one matmul, for backends where XLA's is slow (CPU).

XLA:CPU lowers the gradient of a convolution with respect to its kernel to a convolution that runs ~8x below
oneDNN at large spatial sizes (docs: /work/shared/notes/cpu-convolution.md). The forward pass and the input
gradient stay XLA's own convolutions; only d/dkernel is rewritten as ``patches(x).T @ dy``, where the patches
are the k*k shifted (strided) slices of the padded input concatenated on the channel axis, in HWIO order, so
the product reshapes straight into the kernel layout. Grouped convolutions (ResNeXt) keep XLA's gradient.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ("NHWC", "HWIO", "NHWC")
Padding = tuple[tuple[int, int], tuple[int, int]]


def _xla_conv(x, kernel, strides, padding, groups):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMS,
                                    feature_group_count=groups)


def _patches(x: jnp.ndarray, kernel_hw: tuple[int, int], strides, padding, out_hw) -> jnp.ndarray:
    """(N*Ho*Wo, kh*kw*C) rows of input windows, tap-major then channel, matching an HWIO kernel's rows."""
    (kh, kw), (sh, sw), (ho, wo) = kernel_hw, strides, out_hw
    if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
        return x[:, ::sh, ::sw, :][:, :ho, :wo, :].reshape(-1, x.shape[-1])
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    taps = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(taps, axis=-1).reshape(-1, kh * kw * x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, padding, groups):
    return _xla_conv(x, kernel, strides, padding, groups)


def _conv_fwd(x, kernel, strides, padding, groups):
    return _xla_conv(x, kernel, strides, padding, groups), (x, kernel)


def _conv_bwd(strides, padding, groups, residuals, dy):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, kernel, strides, padding, groups), x)
    (dx,) = input_vjp(dy)  # XLA's transposed convolution: already close to oneDNN on CPU
    kh, kw, cin, cout = kernel.shape
    patches = _patches(x, (kh, kw), strides, padding, dy.shape[1:3])
    dk = lax.dot_general(patches, dy.reshape(-1, cout), (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return dx, dk.reshape(kh, kw, cin, cout).astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int] = (1, 1),
           padding: str | Sequence[tuple[int, int]] = "SAME", groups: int = 1) -> jnp.ndarray:
    """NHWC x HWIO -> NHWC, equal to ``lax.conv_general_dilated`` (values and gradients), faster to train on CPU.

    ``padding`` is "SAME", "VALID" or explicit ``((top, bottom), (left, right))``; ``groups`` > 1 uses XLA's
    own gradient (the patch matmul would need one product per group).
    """
    strides = tuple(int(s) for s in strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if groups != 1:
        return _xla_conv(x, kernel, strides, padding, groups)
    return _conv(x, kernel, strides, padding, groups)


class MatmulGradConv(nn.Module):
    """Drop-in for a bias-free ``nn.Conv``: same ``kernel`` parameter (HWIO), same output, ``conv2d`` inside."""

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: str | Sequence[tuple[int, int]] = "SAME"
    feature_group_count: int = 1
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., jnp.ndarray] = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.use_bias:
            raise ValueError("MatmulGradConv is bias-free (ResNet convs are followed by BatchNorm)")
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
        shape = (*self.kernel_size, x.shape[-1] // self.feature_group_count, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return conv2d(x, kernel, strides, self.padding, self.feature_group_count)
