"""Channel attention inside residual blocks, with timm's parameter names: Squeeze-and-Excitation (Hu et al.
2018) and Efficient Channel Attention (Wang et al. 2020). Both rescale each channel of the block's last
normalised output by a gate in (0, 1) computed from the globally pooled feature map, before the residual add.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


def se_channels(channels: int, ratio: float = 1 / 16, divisor: int = 8) -> int:
    """The squeezed width: ``channels * ratio`` rounded to the nearest multiple of ``divisor``, at least
    ``divisor`` (timm's ``make_divisible`` with ``round_limit=0``, which is what its SE-ResNets use)."""
    return max(divisor, int(channels * ratio + divisor / 2) // divisor * divisor)


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """The paper's adaptive 1-D kernel size: the odd number nearest ``(log2(C) + beta) / gamma``, at least 3."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


class SqueezeExcite(nn.Module):
    """``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``; fc1/fc2 are timm's 1x1 convolutions with bias, held as
    Dense layers (the converter reshapes them)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        channels = x.shape[-1]
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        s = jnp.mean(x, axis=(1, 2))  # (N, C): a plain matrix product for the dense layers (and the ONNX export)
        s = dense(channels, "fc2")(nn.relu(dense(se_channels(channels), "fc1")(s)))
        return x * nn.sigmoid(s)[:, None, None, :].astype(x.dtype)


class EfficientChannelAttention(nn.Module):
    """``x * sigmoid(conv1d(mean_hw(x)))``: a k-tap convolution across the channel axis (zero padded, no bias)
    instead of SE's two dense layers. The kernel is timm's ``conv.weight`` (1, 1, k) stored as (k, 1, 1)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        channels = x.shape[-1]
        k = eca_kernel_size(channels)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, 1, 1), self.param_dtype)
        s = jnp.mean(x, axis=(1, 2))  # (N, C)
        padded = jnp.pad(s, ((0, 0), ((k - 1) // 2, (k - 1) // 2)))
        taps = kernel.reshape(k).astype(s.dtype)
        # a cross-correlation, as torch's Conv1d; lax slices, which numpy-style indexing is not under a symbolic
        # batch (a gather there, which the ONNX export does not translate)
        s = sum(lax.slice_in_dim(taps, j, j + 1) * lax.slice_in_dim(padded, j, j + channels, axis=1)
                for j in range(k))
        return x * nn.sigmoid(s)[:, None, None, :].astype(x.dtype)


ATTENTION = {"se": SqueezeExcite, "eca": EfficientChannelAttention}


def attention(kind: str, dtype: Any, param_dtype: Any, name: str) -> nn.Module:
    """The attention module ``kind`` names ("se", "eca"); ECA's parameter sits in a submodule ``conv`` as timm's."""
    if kind == "eca":
        return _Eca(dtype=dtype, param_dtype=param_dtype, name=name)
    return ATTENTION[kind](dtype=dtype, param_dtype=param_dtype, name=name)


class _Eca(nn.Module):
    """ECA under timm's module path ``se.conv``."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return EfficientChannelAttention(self.dtype, self.param_dtype, name="conv")(x)
