"""Residual blocks: BasicBlock (two 3x3 convs) and Bottleneck (1x1, 3x3, 1x1), plain or pre-activation.

In the stack, blocks receive ``conv_norm`` (a convolution followed by its BatchNorm, optionally a residual add
and a ReLU) and ``norm`` as pre-configured factories, so compute dtype, convolution algorithm, BatchNorm
momentum/epsilon, train/eval mode and BatchNorm folding are decided once in ``resnet.py``, and a block only says
*where* a convolution or normalisation goes. Used on their own (``BasicBlock(64, strides=2)``, in a model of
one's own), blocks build torchvision's defaults themselves: convolutions padded as torchvision's, BatchNorm with
momentum 0.9 (torch's 0.1) and epsilon 1e-5, in train mode when ``deterministic=False``. Module names
(``conv1``, ``bn1``, ``downsample_conv``...) mirror torchvision's so the weight converter is a rename, not a
translation.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resnet_jax.attention import ATTENTION, attention
from resnet_jax.ops import BatchNorm, Conv

ModuleFactory = Callable[..., nn.Module]
# conv_norm(features, kernel_size, *, strides, groups, conv_name, norm_name, scale_init, kernel_init) returns
# apply(x, residual=None, relu=False, fan_out=False) = relu(BN(conv(x)) + residual): conv then BN, or one conv with
# the BN folded; with fan_out also x, for the shortcut (the gradient's sum then runs in the conv's pass)
ConvNormFactory = Callable[..., Callable[..., jnp.ndarray]]

# How a block's input reaches its output when the shape changes (stride > 1 or a new width):
#   projection - 1x1 strided conv + BN (torchvision, "option B")
#   avg_pool   - 2x2 average pool, then 1x1 conv + BN (ResNet-D, "Bag of Tricks")
#   zero_pad   - strided subsample + zero channels, parameter-free (He et al. 2015 CIFAR, "option A")
SHORTCUTS = ("projection", "avg_pool", "zero_pad")


def _avg_pool_ceil(x: jnp.ndarray) -> jnp.ndarray:
    """2x2/2 average pool with a partial last window on odd sizes (torch's ceil_mode, count_include_pad=False).
    On odd sizes: the input zero-padded to even ones, its four 2x2 phases (strided slices) added, and each window's
    sum divided by its cells. Not by a padded ``reduce_window`` (``nn.avg_pool``'s padding, or a pad XLA folds into
    one): XLA:CPU (jaxlib 0.10.2) summed a 1x1 input padded so as 4x once the batch held 4096 values (a ResNet-D
    bottleneck's last shortcut at 16 px, batch 4: logits 8 off those of one image at a time)."""
    rows, cols = x.shape[1] % 2, x.shape[2] % 2
    if not (rows or cols):
        return nn.avg_pool(x, (2, 2), strides=(2, 2))
    padded = jnp.pad(x, ((0, 0), (0, rows), (0, cols), (0, 0)))
    summed = sum(lax.slice(padded, (0, i, j, 0), padded.shape, (1, 2, 2, 1)) for i in (0, 1) for j in (0, 1))
    per_row, per_col = np.full(summed.shape[1], 2.0), np.full(summed.shape[2], 2.0)
    per_row[-1], per_col[-1] = 2 - rows, 2 - cols  # the cells of the last row's and column's windows
    return summed * jnp.asarray(1.0 / np.outer(per_row, per_col)[None, :, :, None], x.dtype)


def _avg_pool_same(x: jnp.ndarray) -> jnp.ndarray:
    """2x2/1 average pool over the input zero-padded by one row and column at the end (every window divides by
    4): what timm's ResNet-D shortcut does where a dilated stage replaced its stride (``AvgPool2dSame``)."""
    return nn.avg_pool(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))), (2, 2), strides=(1, 1))


def drop_path(module: nn.Module, x: jnp.ndarray, rate: float) -> jnp.ndarray:
    """Stochastic depth (Huang et al. 2016): each sample's residual branch is zeroed with probability ``rate``
    and the kept ones scaled by ``1 / (1 - rate)``, so the expected branch is unchanged. Draws from the
    ``"dropout"`` rng."""
    if not module.has_rng("dropout"):
        raise ValueError("drop_path_rate > 0 drops residual branches at random in train mode: pass an rng for "
                         "them, model.apply(variables, x, train=True, rngs={'dropout': key}, ...), or build the "
                         "model with drop_path_rate=0")
    keep = 1.0 - rate
    kept = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(kept, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def padded_conv(features: int, kernel_size: tuple[int, int], strides: int = 1, *, dtype: Any, param_dtype: Any,
                impl: str = "auto", dilation: int = 1, **kwargs: Any) -> nn.Module:
    """A conv padded by k//2 on both sides, as torchvision (not XLA "SAME", which pads (2, 3) at stride 2 and
    would shift every feature map by a pixel against torchvision weights); He-normal fan-out init.

    ``impl`` names the convolution algorithm (``ops.ALGORITHMS``, "auto" or "jax"); parameters do not depend on
    it. ``dilation`` spaces a kernel's taps (padded by ``dilation * (k // 2)``, which keeps the size, as
    torchvision and timm pad their dilated 3x3s); a 1x1 kernel ignores it.
    """
    dilation = dilation if max(kernel_size) > 1 else 1
    pad = [(dilation * (k // 2), dilation * (k // 2)) for k in kernel_size]
    kwargs.setdefault("kernel_init", nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
    return Conv(features, kernel_size, strides=strides, padding=pad, dtype=dtype, param_dtype=param_dtype,
                algorithm=impl, kernel_dilation=dilation, **kwargs)


def conv_norm_factory(conv, norm, folded: bool = False):
    """The ``conv_norm`` factory blocks receive: conv -> BN (-> + residual) (-> ReLU).

    With ``folded`` the BatchNorm is already inside the convolution (scaled kernel, BN shift as bias, see
    ``ops.fold_batchnorm``), and the residual add and ReLU become that convolution's epilogue, which the oneDNN
    algorithm fuses. ``norm_name=None`` is a bare convolution (pre-activation blocks end in one). ``fan_out``
    also returns the input, for the block's shortcut (``ops.conv2d`` says why).
    """

    def make(features, kernel_size, *, conv_name, norm_name, strides=1, groups=1, scale_init=None, **conv_kwargs):
        fold = folded and norm_name is not None
        c = conv(features, kernel_size, strides=strides, feature_group_count=groups, use_bias=fold, name=conv_name,
                 **conv_kwargs)
        if fold or norm_name is None:
            return lambda x, residual=None, relu=False, fan_out=False: c(x, residual=residual, relu=relu,
                                                                         fan_out=fan_out)
        n = norm(name=norm_name, **({} if scale_init is None else {"scale_init": scale_init}))

        def apply(x, residual=None, relu=False, fan_out=False):
            if fan_out:
                y, x = c(x, fan_out=True)
                return n(y, residual=residual, relu=relu), x
            return n(c(x), residual=residual, relu=relu)
        return apply
    return make


class Shortcut(nn.Module):
    """The residual path where the shape changes: the configured downsampling to ``features`` channels."""

    features: int
    strides: int
    kind: str
    conv_norm: ConvNormFactory
    normalized: bool  # False for pre-activation blocks: the projection sees already-normalised input
    dilation: int = 1  # the block's: >1 in a stage whose stride became dilation (output_stride)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.kind == "zero_pad":  # lax.slice, not x[:, ::s, ::s]: one strided slice, where numpy-style indexing
            x = lax.slice(x, (0,) * 4, x.shape, (1, self.strides, self.strides, 1))  # traces to a gather
            missing = self.features - x.shape[-1]
            return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (missing // 2, missing - missing // 2)))
        strides = self.strides
        if self.kind == "avg_pool" and strides > 1:
            x, strides = _avg_pool_ceil(x), 1
        elif self.kind == "avg_pool" and self.dilation > 1:
            x = _avg_pool_same(x)
        return self.conv_norm(self.features, (1, 1), strides=strides, conv_name="conv",
                              norm_name="bn" if self.normalized else None)(x)


class ResidualBlock(nn.Module):
    """Fields and helpers shared by both block kinds; ``width`` is the stage's base width (64, 128, ...).

    ``first_dilation`` is the dilation of the block's first 3x3 and ``dilation`` of the others: in a stage whose
    stride became dilation (``output_stride``), the first block keeps the previous stage's dilation on its 3x3
    (DeepLab's rule, as torchvision and timm). ``attn_layer`` ("se", "eca") gates the branch's channels before
    the residual add; ``drop_path`` is this block's stochastic-depth rate, applied unless ``deterministic``.
    """

    width: int
    strides: int = 1
    conv_norm: ConvNormFactory | None = None  # None (a block on its own): torchvision's conv + BN (module doc)
    norm: ModuleFactory | None = None
    shortcut: str = "projection"
    preact: bool = False
    zero_init_residual: bool = False
    groups: int = 1
    width_per_group: int = 64
    dilation: int = 1
    first_dilation: int = 1
    attn_layer: str | None = None
    drop_path: float = 0.0
    deterministic: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    expansion = 1

    def factories(self) -> tuple[ConvNormFactory, ModuleFactory]:
        """``(conv_norm, norm)``: the stack's, or on a block of its own, torchvision's defaults; BatchNorm then
        normalises by the batch and updates its running averages when ``deterministic=False`` (train mode),
        by the running averages otherwise, as a ``ResNet`` applied with ``train=`` does."""
        if self.conv_norm is not None and self.norm is not None:
            return self.conv_norm, self.norm
        if self.conv_norm is not None or self.norm is not None:
            raise ValueError("give a block both conv_norm and norm (as ResNet does), or neither (torchvision's "
                             "convolution and BatchNorm)")
        conv = functools.partial(padded_conv, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(BatchNorm, use_running_average=self.deterministic, momentum=0.9, epsilon=1e-5,
                                 dtype=self.dtype, param_dtype=self.param_dtype)
        return conv_norm_factory(conv, norm), norm

    def first_conv(self, conv_norm: Callable[..., Any], x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """``(relu(bn(conv(x))), x)`` with the returned ``x`` the convolution's pass-through (``fan_out``), for
        the shortcut (itself or its downsampling; a pre-activation block's downsampling reads the normalised
        input its first convolution reads): the gradients reaching ``x`` by both paths are then summed inside the
        convolution's input-gradient pass where its algorithm can, not by a pass of their own
        (``ops/fanout.py``)."""
        return conv_norm(x, relu=True, fan_out=True)

    def residual(self, x: jnp.ndarray, pre: jnp.ndarray | None = None) -> jnp.ndarray:
        """What the block adds to its last convolution: its input ``x`` itself when the shape is kept, else the
        downsampling. Pre-activation blocks pass ``pre = relu(bn1(x))``, which only the downsampling reads: the
        identity path stays clean, never normalised, which is the point of He et al. 2016's v2 design (and what
        timm's ResNetV2 computes)."""
        out = self.width * self.expansion
        if self.strides == 1 and x.shape[-1] == out:
            return x
        return Shortcut(out, self.strides, self.shortcut, self.factories()[0], pre is None, self.dilation,
                        name="downsample")(x if pre is None else pre)

    def close(self, last: Callable[..., jnp.ndarray], y: jnp.ndarray, residual: jnp.ndarray,
              relu: bool) -> jnp.ndarray:
        """``relu(drop_path(attention(last(y))) + residual)``: with neither, ``last`` fuses the add and ReLU
        into its epilogue, as before these knobs (and as folding needs); with either, they go in between."""
        stochastic = self.drop_path > 0 and not self.deterministic
        if self.attn_layer is None and not stochastic:
            return last(y, residual=residual, relu=relu)
        z = last(y)
        if self.attn_layer is not None:
            z = attention(self.attn_layer, self.dtype, self.param_dtype, name="se")(z)
        if stochastic:
            z = drop_path(self, z, self.drop_path)
        z = z + residual.astype(z.dtype)
        return nn.relu(z) if relu else z

    def last_conv_norm(self, features: int, kernel_size, conv_name: str, norm_name: str):
        """The conv + BN closing a plain block; zero BN scale makes the block start as identity (Goyal et al.)."""
        init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        conv_norm = self.factories()[0]
        return conv_norm(features, kernel_size, conv_name=conv_name, norm_name=norm_name, scale_init=init,
                         dilation=self.dilation)

    def last_conv(self, features: int, name: str):
        """Pre-activation blocks end in a conv, not a BN: zero-init that conv for the same identity start."""
        extra = {"kernel_init": nn.initializers.zeros} if self.zero_init_residual else {}
        conv_norm = self.factories()[0]
        return conv_norm(features, (1, 1) if self.expansion > 1 else (3, 3), conv_name=name, norm_name=None,
                         dilation=self.dilation, **extra)

    def pre_activation(self, x: jnp.ndarray, norm_name: str) -> jnp.ndarray:
        return nn.relu(self.factories()[1](name=norm_name)(x))


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR ResNets); the output has ``width`` channels."""

    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.groups != 1 or self.width_per_group != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64 (as torchvision); use a "
                             "Bottleneck model such as resnext50_32x4d or wide_resnet50_2 for grouped or wide blocks")
        conv1 = dict(strides=self.strides, dilation=self.first_dilation, conv_name="conv1")
        conv_norm, _ = self.factories()
        if self.preact:
            y, pre = self.first_conv(conv_norm(self.width, (3, 3), norm_name="bn2", **conv1),
                                     self.pre_activation(x, "bn1"))
            return self.close(self.last_conv(self.width, "conv2"), y, self.residual(x, pre), relu=False)
        y, x = self.first_conv(conv_norm(self.width, (3, 3), norm_name="bn1", **conv1), x)
        return self.close(self.last_conv_norm(self.width, (3, 3), "conv2", "bn2"), y, self.residual(x), relu=True)


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
        conv2 = dict(strides=self.strides, groups=self.groups, dilation=self.first_dilation, conv_name="conv2")
        conv_norm, _ = self.factories()
        if self.preact:
            y, pre = self.first_conv(conv_norm(inner, (1, 1), conv_name="conv1", norm_name="bn2"),
                                     self.pre_activation(x, "bn1"))
            y = conv_norm(inner, (3, 3), norm_name="bn3", **conv2)(y, relu=True)
            return self.close(self.last_conv(out, "conv3"), y, self.residual(x, pre), relu=False)
        y, x = self.first_conv(conv_norm(inner, (1, 1), conv_name="conv1", norm_name="bn1"), x)
        y = conv_norm(inner, (3, 3), norm_name="bn2", **conv2)(y, relu=True)
        return self.close(self.last_conv_norm(out, (1, 1), "conv3", "bn3"), y, self.residual(x), relu=True)


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}
ATTENTION_LAYERS = tuple(ATTENTION)
