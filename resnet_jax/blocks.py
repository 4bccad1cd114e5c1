"""Residual blocks: BasicBlock (two 3x3 convs) and Bottleneck (1x1, 3x3, 1x1), plain or pre-activation.

Blocks receive ``conv`` and ``norm`` as pre-configured factories from the stack, so compute dtype, BatchNorm
momentum/epsilon and train/eval mode are decided once in ``resnet.py``, and a block only says *where* a
convolution or normalisation goes. Module names (``conv1``, ``bn1``, ``downsample_conv``...) mirror
torchvision's so the weight converter is a rename, not a translation.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

ModuleFactory = Callable[..., nn.Module]

# How a block's input reaches its output when the shape changes (stride > 1 or a new width):
#   projection - 1x1 strided conv + BN (torchvision, "option B")
#   avg_pool   - 2x2 average pool, then 1x1 conv + BN (ResNet-D, "Bag of Tricks")
#   zero_pad   - strided subsample + zero channels, parameter-free (He et al. 2015 CIFAR, "option A")
SHORTCUTS = ("projection", "avg_pool", "zero_pad")


def _avg_pool_ceil(x: jnp.ndarray) -> jnp.ndarray:
    """2x2/2 average pool with a partial last window on odd sizes (torch's ceil_mode, count_include_pad=False)."""
    pad = ((0, x.shape[1] % 2), (0, x.shape[2] % 2))
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding=pad, count_include_pad=False)


class Shortcut(nn.Module):
    """The residual path: identity when shapes match, otherwise the configured downsampling."""

    features: int
    strides: int
    kind: str
    conv: ModuleFactory
    norm: ModuleFactory | None  # None for pre-activation blocks: the projection sees already-normalised input

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.strides == 1 and x.shape[-1] == self.features:
            return x
        if self.kind == "zero_pad":
            x = x[:, :: self.strides, :: self.strides, :]
            missing = self.features - x.shape[-1]
            return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (missing // 2, missing - missing // 2)))
        strides = self.strides
        if self.kind == "avg_pool" and strides > 1:
            x, strides = _avg_pool_ceil(x), 1
        x = self.conv(self.features, (1, 1), strides=strides, name="conv")(x)
        return x if self.norm is None else self.norm(name="bn")(x)


class ResidualBlock(nn.Module):
    """Fields and helpers shared by both block kinds; ``width`` is the stage's base width (64, 128, ...)."""

    width: int
    strides: int
    conv: ModuleFactory
    norm: ModuleFactory
    act: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu
    shortcut: str = "projection"
    preact: bool = False
    zero_init_residual: bool = False
    groups: int = 1
    width_per_group: int = 64

    expansion = 1

    def residual(self, x: jnp.ndarray, preact: bool) -> jnp.ndarray:
        norm = None if preact else self.norm
        out = self.width * self.expansion
        return Shortcut(out, self.strides, self.shortcut, self.conv, norm, name="downsample")(x)

    def last_norm(self, name: str) -> nn.Module:
        """The BN closing a plain block; zero scale makes the block start as identity (Goyal et al. 2017)."""
        init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        return self.norm(name=name, scale_init=init)

    def last_conv(self, features: int, name: str) -> nn.Module:
        """Pre-activation blocks end in a conv, not a BN: zero-init that conv for the same identity start."""
        extra = {"kernel_init": nn.initializers.zeros} if self.zero_init_residual else {}
        return self.conv(features, (1, 1) if self.expansion > 1 else (3, 3), name=name, **extra)


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR ResNets); the output has ``width`` channels."""

    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.groups != 1 or self.width_per_group != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64 (as torchvision); use a "
                             "Bottleneck model such as resnext50_32x4d or wide_resnet50_2 for grouped or wide blocks")
        if self.preact:
            pre = self.act(self.norm(name="bn1")(x))
            y = self.conv(self.width, (3, 3), strides=self.strides, name="conv1")(pre)
            y = self.last_conv(self.width, "conv2")(self.act(self.norm(name="bn2")(y)))
            return self.residual(pre, preact=True) + y
        y = self.act(self.norm(name="bn1")(self.conv(self.width, (3, 3), strides=self.strides, name="conv1")(x)))
        y = self.last_norm("bn2")(self.conv(self.width, (3, 3), name="conv2")(y))
        return self.act(self.residual(x, preact=False) + y)


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (strided, grouped), 1x1 expand x4: torchvision's "v1.5" with the stride on the 3x3.

    The output has ``4 * width`` channels and the inner 3x3 has ``width * width_per_group / 64 * groups``:
    ResNeXt and Wide ResNet are just these two knobs.
    """

    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        inner = int(self.width * (self.width_per_group / 64.0)) * self.groups
        out = self.width * self.expansion
        conv2 = self.conv(inner, (3, 3), strides=self.strides, feature_group_count=self.groups, name="conv2")
        if self.preact:
            pre = self.act(self.norm(name="bn1")(x))
            y = self.conv(inner, (1, 1), name="conv1")(pre)
            y = conv2(self.act(self.norm(name="bn2")(y)))
            y = self.last_conv(out, "conv3")(self.act(self.norm(name="bn3")(y)))
            return self.residual(pre, preact=True) + y
        y = self.act(self.norm(name="bn1")(self.conv(inner, (1, 1), name="conv1")(x)))
        y = self.act(self.norm(name="bn2")(conv2(y)))
        y = self.last_norm("bn3")(self.conv(out, (1, 1), name="conv3")(y))
        return self.act(self.residual(x, preact=False) + y)


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}
