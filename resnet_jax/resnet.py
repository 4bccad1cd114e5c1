"""The ResNet stack (stem, stages, head, feature outputs), the named models, and ``create_model``.

Every variant in the family is a setting of the knobs on one ``ResNet`` module; the named models are a table
of those settings. Parameter names follow torchvision (``conv1``, ``bn1``, ``layer1_0/conv1``, ``fc``), so a
``features_only`` model shares every name with its classifier except the head.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.blocks import ATTENTION_LAYERS, BLOCKS, SHORTCUTS, conv_norm_factory, padded_conv
from resnet_jax.ops import BatchNorm, max_pool
from resnet_jax.ops.rules import compute_dtype
from resnet_jax.ops.rules import names as algorithm_names

STEMS = ("imagenet", "cifar", "deep", "deep_tiered")
OUTPUT_STRIDES = (8, 16, 32)
class ResNet(nn.Module):
    """A ResNet on NHWC images; ``__call__(x, train)`` returns float32 logits, or the stage outputs.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block: "basic" or "bottleneck".
      num_classes: classifier outputs; 0 returns the pooled features instead of logits.
      in_channels: image channels the model accepts (1 for greyscale/medical images).
      stage_widths: base width of each stage (Bottleneck stages output 4x this).
      stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool), "cifar" (3x3/1 conv, no pool), "deep" (three 3x3
        convs + max-pool, ResNet-C/D) or "deep_tiered" (the same at widths 3/8, 1/2 and 1 of ``stem_width``:
        timm's "t" models).
      stem_width: channels out of the stem.
      shortcut: how blocks downsample their residual path: "projection" (1x1 conv + BN), "avg_pool" (ResNet-D)
        or "zero_pad" (parameter-free, He et al. CIFAR "option A").
      groups, width_per_group: ResNeXt cardinality and per-group width (wide ResNets: width_per_group=128).
      preact: pre-activation (BN-ReLU-conv) blocks of He et al. 2016, with a final BN-ReLU before the head.
      zero_init_residual: start every block as the identity (last BN scale, or last conv when preact, at 0).
      remat: recompute each block's activations in the backward pass instead of storing them.
      features_only: return the list of stage outputs (strides 4/8/16/32 for the ImageNet stem, see
        ``feature_strides``), no head.
      output_stride: 32, 16 or 8: the stride of the last stage output of a model with an ImageNet-size stem
        (stride 4 before the stages). Below 32, the last stages replace their stride by dilation (DeepLab;
        torchvision's ``replace_stride_with_dilation``, timm's ``output_stride``): the same parameters, denser
        features. The CIFAR stem's models end at stride 8 (``resnet18_cifar``) or 4 (``resnet20``) and take only
        the default.
      drop_path_rate: stochastic depth (Huang et al. 2016): in train mode each block's residual branch is
        dropped per sample with a rate rising linearly from 0 (first block) to this (last block), as timm's
        ResNet; needs a ``"dropout"`` rng in ``apply``. Eval is unchanged.
      attn_layer: channel attention in every block before the residual add: None, "se" (Squeeze-and-Excitation,
        Hu et al. 2018) or "eca" (Efficient Channel Attention, Wang et al. 2020), with timm's names.
      dtype: compute dtype (e.g. jnp.bfloat16); param_dtype: storage dtype of parameters (keep float32).
        Under "auto" and "jax" a bfloat16 model on a CPU without bfloat16 instructions (AVX2, AVX-512 without
        BF16) computes in float32 throughout and returns its features in bfloat16 (``rules.compute_dtype``):
        there bfloat16 has no instructions to run on, and converting around every float32 convolution made
        it slower than float32 (BENCHMARKS.md, 2026-12-04).
      bn_momentum, bn_epsilon: BatchNorm running-average decay and epsilon (torchvision's momentum 0.1 = 0.9);
        the running variance averages the unbiased batch variance, as torch's does (``ops.batchnorm``).
      conv_impl: how convolutions are computed; parameters are identical for every choice and outputs agree
        within float32 rounding (Winograd's a few times coarser than direct kernels; README "Speed on CPU").
        "auto" (the default) picks per layer shape, dtype and backend (``ops.choose``): oneDNN kernels on CPU
        where the extension is usable (Linux x86_64 with a C++ compiler; its wheels are default
        dependencies there), the fastest pure-JAX algorithm otherwise, XLA's own on GPU/TPU; "jax" picks
        among the pure-JAX algorithms only. Any name in ``ops.ALGORITHMS`` runs that algorithm on every layer
        it can compute (Winograd: the 3x3 stride-1 ones) and "auto" on the rest; three names joined by "/"
        choose the forward, input-gradient and kernel-gradient algorithms apart.
      folded: BatchNorm folded into the convolutions (inference only): made by ``ops.fold_batchnorm``, whose
        variables it takes; ``train=True`` is refused.
    """

    stage_sizes: Sequence[int]
    block: str = "basic"
    num_classes: int = 1000
    in_channels: int = 3
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    stem_width: int = 64
    shortcut: str = "projection"
    groups: int = 1
    width_per_group: int = 64
    preact: bool = False
    zero_init_residual: bool = False
    remat: bool = False
    features_only: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    conv_impl: str = "auto"
    folded: bool = False
    output_stride: int = 32
    drop_path_rate: float = 0.0
    attn_layer: str | None = None

    def __post_init__(self) -> None:
        _check_choice("block", self.block, BLOCKS)
        _check_choice("stem", self.stem, STEMS)
        _check_choice("shortcut", self.shortcut, SHORTCUTS)
        if self.attn_layer is not None:
            _check_choice("attn_layer", self.attn_layer, ATTENTION_LAYERS)
        if self.output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {list(OUTPUT_STRIDES)} (the stride of the last feature "
                             f"map), got {self.output_stride!r}")
        if self.output_stride != 32 and self.stem == "cifar":
            raise ValueError("output_stride applies to models with an ImageNet-size stem (stride 4 before the "
                             f"stages, 32 after); this CIFAR-stem model's last stage is at stride "
                             f"{2 ** (len(self.stage_sizes) - 1)} already, with nothing to trade for dilation: "
                             "leave output_stride out")
        rate = self.drop_path_rate
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path_rate must be a number in [0, 1), got {rate!r}")
        momentum, epsilon = self.bn_momentum, self.bn_epsilon  # out of range: NaN logits, no error
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"bn_momentum is the running averages' decay, in [0, 1] (flax's convention: torch's "
                             f"momentum 0.1 is 0.9), got {momentum!r}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not 0.0 <= epsilon < float("inf"):
            raise ValueError(f"bn_epsilon must be a finite number >= 0 (added to the variance), got {epsilon!r}")
        if (isinstance(self.num_classes, bool) or not isinstance(self.num_classes, numbers.Integral)
                or self.num_classes < 0):
            raise ValueError(f"num_classes must be a whole number >= 0 (0: no head, the pooled features), got "
                             f"{self.num_classes!r}")
        try:
            algorithm_names(self.conv_impl)
        except ValueError as err:
            raise ValueError(f"conv_impl: {err}") from None
        _check_kinds(self)
        if len(self.stage_sizes) != len(self.stage_widths):
            raise ValueError(f"stage_sizes {tuple(self.stage_sizes)} and stage_widths {tuple(self.stage_widths)} "
                             "must have the same length (one entry per stage)")
        _check_widths(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray | list[jnp.ndarray]:
        self._check_input(x)
        if self.folded and train:
            raise ValueError("this model has its BatchNorm folded into the convolutions (ops.fold_batchnorm), "
                             "which is for inference only; train the unfolded model")
        dtype = self.layer_dtype()
        conv = functools.partial(padded_conv, dtype=dtype, param_dtype=self.param_dtype, impl=self.conv_impl)
        norm = functools.partial(BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                                 epsilon=self.bn_epsilon, dtype=dtype, param_dtype=self.param_dtype,
                                 conv_impl=self.conv_impl)
        conv_norm = conv_norm_factory(conv, norm, self.folded)
        x = self._stem(jnp.asarray(x, dtype), conv_norm)

        block_cls = BLOCKS[self.block]
        if self.remat:
            block_cls = nn.remat(block_cls)
        features = []
        layout, rates = self.block_layout(), self.drop_path_rates()
        for i, (size, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            for j in range(size):
                index, strides, dilation, first_dilation = layout[i][j]
                x = block_cls(width, strides, conv_norm, norm, shortcut=self.shortcut,
                              preact=self.preact, zero_init_residual=self.zero_init_residual, groups=self.groups,
                              width_per_group=self.width_per_group, dilation=dilation, first_dilation=first_dilation,
                              attn_layer=self.attn_layer, drop_path=rates[index],
                              deterministic=not train, dtype=dtype, param_dtype=self.param_dtype,
                              name=f"layer{i + 1}_{j}")(x)
            features.append(x)
        if self.features_only:
            return [f.astype(self.dtype) for f in features] if self.dtype is not None else features

        if self.preact:  # pre-activation blocks leave the sum un-normalised: close the stack with BN-ReLU
            x = nn.relu(norm(name="bn_final")(x))
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # pool and classify in float32 whatever the compute dtype
        if self.num_classes == 0:
            return x
        return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), name="fc")(x)

    def layer_dtype(self):
        """The dtype the layers compute in: ``dtype``, except bfloat16 where ``rules.compute_dtype`` says this
        backend computes it in float32 (a CPU without bfloat16 instructions, under "auto" or "jax")."""
        if self.dtype is None:
            return None
        return jnp.dtype(compute_dtype(jnp.dtype(self.dtype).name, self.conv_impl, jax.default_backend()))

    def _stem(self, x, conv_norm):
        bn = None if self.preact else "bn1"  # the first pre-activation block normalises the stem output itself
        if self.stem == "cifar":
            return conv_norm(self.stem_width, (3, 3), conv_name="conv1", norm_name=bn)(x, relu=not self.preact)
        if self.stem in ("deep", "deep_tiered"):
            half = self.stem_width // 2
            first = 3 * (half // 4) if self.stem == "deep_tiered" else half
            for k, (width, strides) in enumerate([(first, 2), (half, 1), (self.stem_width, 1)]):
                last = k == 2 and self.preact
                x = conv_norm(width, (3, 3), strides=strides, conv_name=f"conv1_{k}",
                              norm_name=None if last else f"bn1_{k}")(x, relu=not last)
        else:
            x = conv_norm(self.stem_width, (7, 7), strides=2, conv_name="conv1", norm_name=bn)(x, relu=not self.preact)
        return max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), algorithm=self.conv_impl)

    def block_layout(self) -> list[list[tuple[int, int, int, int]]]:
        """``(global index, stride, dilation, first_dilation)`` of every block, stage by stage: where the stride
        so far reaches ``output_stride``, a stage's stride 2 becomes dilation x 2, and its first block keeps the
        previous dilation on its first 3x3 (torchvision's ``_make_layer``, timm's ``make_blocks``)."""
        stride, dilation, index, layout = (1 if self.stem == "cifar" else 4), 1, 0, []
        for i, size in enumerate(self.stage_sizes):
            step, previous = (1 if i == 0 else 2), dilation
            if step > 1 and stride >= self.output_stride:
                dilation, step = dilation * step, 1
            stride *= step
            layout.append([(index + j, step if j == 0 else 1, dilation, previous if j == 0 else dilation)
                           for j in range(size)])
            index += size
        return layout

    def drop_path_rates(self) -> tuple[float, ...]:
        """Each block's stochastic-depth rate, by global block index: ``drop_path_rate * index / (blocks - 1)``,
        0 for the first block and the full rate for the last (timm's ResNet; Huang et al.'s linear decay)."""
        total = sum(self.stage_sizes)
        return tuple(self.drop_path_rate * index / max(total - 1, 1) for index in range(total))

    def feature_strides(self) -> tuple[int, ...]:
        """The stride of each stage output ``features_only`` returns (4, 8, 16, 32; 4, 8, 16, 16 at
        ``output_stride=16``; 4, 8, 8, 8 at 8)."""
        stride, out = (1 if self.stem == "cifar" else 4), []
        for stage in self.block_layout():
            stride *= stage[0][1] if stage else 1
            out.append(stride)
        return tuple(out)

    def with_batchnorm_folded(self) -> ResNet:
        """This network with every BatchNorm that follows a convolution folded into it (a bias there instead):
        ``ops.fold_batchnorm``'s protocol, which makes the variables."""
        if self.folded:
            raise ValueError("this model is already folded; pass the unfolded model and its variables")
        return self.clone(folded=True)

    def probe_shape(self) -> tuple[int, int, int, int]:
        """A small input every stage can downsample (the stem's factor, then x 2 per later stage, twice over):
        what shape-only traces of this model (``ops.fold_batchnorm``) run on."""
        stem = 1 if self.stem == "cifar" else 4
        size = 2 * stem * 2 ** max(len(self.stage_sizes) - 1, 0)
        return (1, size, size, self.in_channels)

    def _check_input(self, x) -> None:
        if not hasattr(x, "shape"):  # a nested list, say: what jnp would make of it
            x = np.asarray(x)
        shape, dtype = tuple(x.shape), getattr(x, "dtype", None)
        if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
            # Flax would promote them silently; torch refuses them, and 0..255 pixels are never what was meant
            raise ValueError(f"expected normalised floating-point images, got {jnp.dtype(dtype).name}: scale and "
                             f"normalise them first, e.g. resnet_jax.data.normalize(images, mean, std), or "
                             f"weights_info(name).transforms() for published weights")
        if len(shape) == 4 and shape[-1] == self.in_channels:
            if 0 in shape[1:3]:  # the global average pool would divide by zero: NaN logits, no error
                raise ValueError(f"got images of shape {shape}, with no pixels: height and width must be >= 1")
            return
        hint = ""
        if len(shape) == 4 and shape[1] == self.in_channels:
            hint = " It looks channels-first (NCHW): transpose with x.transpose(0, 2, 3, 1)."
        elif len(shape) == 3 and self.in_channels == 1 and shape[-1] != 1:  # x[None] led to "in_channels=W"
            hint = " A greyscale batch (N, H, W) needs its channel axis: x[..., None]."
        elif len(shape) == 3:
            hint = " Add a batch axis with x[None]."
        elif len(shape) == 4:
            hint = f" Build the model with in_channels={shape[-1]} or convert the images."
        raise ValueError(f"expected NHWC images of shape (batch, height, width, {self.in_channels}), "
                         f"got shape {shape}.{hint}")


_FLAGS = ("preact", "zero_init_residual", "remat", "features_only", "folded")
_COUNTS = ("in_channels", "stem_width", "groups", "width_per_group")  # each a whole number >= 1
_PER_STAGE = {"stage_sizes": 0, "stage_widths": 1}  # sequences of whole numbers, each at least this


def _whole(value, least: int = 1) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def _check_widths(model: "ResNet") -> None:
    """Widths the layers cannot be built with: a deep stem's first convolutions take half the stem width (the
    tiered one 3/8 of it, rounded down), which reached 0 (ZeroDivisionError in the initialiser); the zero_pad
    shortcut pads channels and cannot narrow them (numpy's "index can't contain negative values")."""
    least = {"deep": 2, "deep_tiered": 8}.get(model.stem, 1)
    if model.stem_width < least:
        raise ValueError(f"stem={model.stem!r} needs stem_width >= {least} (its first convolutions are narrower), "
                         f"got {model.stem_width}")
    if model.shortcut == "zero_pad":
        expansion = BLOCKS[model.block].expansion
        widths = [model.stem_width, *(w * expansion for w, n in zip(model.stage_widths, model.stage_sizes) if n)]
        if any(b < a for a, b in zip(widths, widths[1:])):
            raise ValueError(f"shortcut='zero_pad' pads the channels, so the widths cannot shrink from the stem on: "
                             f"got {widths} (stem, then each stage's output); use shortcut='projection'")


def _check_kinds(model: "ResNet") -> None:
    """The fields whose wrong kind built another model or failed deep inside it: a flag given as text took its
    truthiness ("False" built a pre-activation model), a zero count divided by zero in the initialisers, a
    negative stage size was accepted, an unknown dtype failed at the first call."""
    for field in _FLAGS:
        if not isinstance(getattr(model, field), (bool, np.bool_)):
            raise ValueError(f"{field} must be True or False, got {getattr(model, field)!r}")
    for field in _COUNTS:
        if not _whole(getattr(model, field)):
            raise ValueError(f"{field} must be a whole number >= 1, got {getattr(model, field)!r}")
    for field, least in _PER_STAGE.items():
        value = getattr(model, field)
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or \
                not all(_whole(v, least) for v in value):
            raise ValueError(f"{field} must be a sequence of whole numbers >= {least}, one per stage (e.g. "
                             f"(2, 2, 2, 2)), got {value!r}")
    for field in ("dtype", "param_dtype"):
        try:
            floating = jnp.issubdtype(jnp.dtype(getattr(model, field)), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise ValueError(f"{field} must be a floating dtype (jnp.float32, jnp.bfloat16, jnp.float16), got "
                             f"{getattr(model, field)!r}")


def _check_choice(field: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {field} {value!r}; choose one of {sorted(choices)}")


def _imagenet(stage_sizes, block, **kw):
    return dict(stage_sizes=stage_sizes, block=block, **kw)


def _cifar_he(depth: int):
    """He et al. 2015 section 4.2: 6n+2 layers, widths 16/32/64, parameter-free shortcuts, 10 classes."""
    n = (depth - 2) // 6
    return dict(stage_sizes=(n, n, n), block="basic", stage_widths=(16, 32, 64), stem="cifar", stem_width=16,
                shortcut="zero_pad", num_classes=10)


_DEPTHS = {18: ((2, 2, 2, 2), "basic"), 34: ((3, 4, 6, 3), "basic"), 50: ((3, 4, 6, 3), "bottleneck"),
           101: ((3, 4, 23, 3), "bottleneck"), 152: ((3, 8, 36, 3), "bottleneck")}

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    **{f"resnet{d}": _imagenet(*_DEPTHS[d]) for d in _DEPTHS},
    "resnext50_32x4d": _imagenet(*_DEPTHS[50], groups=32, width_per_group=4),
    "resnext101_32x8d": _imagenet(*_DEPTHS[101], groups=32, width_per_group=8),
    "resnext101_64x4d": _imagenet(*_DEPTHS[101], groups=64, width_per_group=4),
    "wide_resnet50_2": _imagenet(*_DEPTHS[50], width_per_group=128),
    "wide_resnet101_2": _imagenet(*_DEPTHS[101], width_per_group=128),
    **{f"resnet{d}d": _imagenet(*_DEPTHS[d], stem="deep", shortcut="avg_pool") for d in _DEPTHS},
    **{f"preact_resnet{d}": _imagenet(*_DEPTHS[d], preact=True) for d in _DEPTHS},
    # timm's names for the pre-activation family (ResNetV2 with BatchNorm), plain and with ResNet-D's changes
    **{f"resnetv2_{d}": _imagenet(*_DEPTHS[d], preact=True) for d in _DEPTHS},
    **{f"resnetv2_{d}d": _imagenet(*_DEPTHS[d], preact=True, stem="deep", shortcut="avg_pool") for d in _DEPTHS},
    **{f"resnet{d}_cifar": _imagenet(*_DEPTHS[d], stem="cifar", num_classes=10) for d in (18, 34, 50)},
    **{f"resnet{d}": _cifar_he(d) for d in (20, 32, 44, 56, 110)},
    # timm's channel-attention ResNets (its ResNet class with block_args attn_layer "se"/"eca"); "d": ResNet-D's
    # deep stem and average-pool shortcuts, "t": the same with the tiered stem
    **{f"seresnet{d}": _imagenet(*_DEPTHS[d], attn_layer="se") for d in _DEPTHS},
    "seresnet152d": _imagenet(*_DEPTHS[152], stem="deep", shortcut="avg_pool", attn_layer="se"),
    "seresnext26d_32x4d": _imagenet((2, 2, 2, 2), "bottleneck", groups=32, width_per_group=4, stem="deep",
                                    shortcut="avg_pool", attn_layer="se"),
    "seresnext50_32x4d": _imagenet(*_DEPTHS[50], groups=32, width_per_group=4, attn_layer="se"),
    "seresnext101_32x4d": _imagenet(*_DEPTHS[101], groups=32, width_per_group=4, attn_layer="se"),
    "seresnext101_32x8d": _imagenet(*_DEPTHS[101], groups=32, width_per_group=8, attn_layer="se"),
    "seresnext101d_32x8d": _imagenet(*_DEPTHS[101], groups=32, width_per_group=8, stem="deep",
                                     shortcut="avg_pool", attn_layer="se"),
    "seresnext101_64x4d": _imagenet(*_DEPTHS[101], groups=64, width_per_group=4, attn_layer="se"),
    "ecaresnet26t": _imagenet((2, 2, 2, 2), "bottleneck", stem="deep_tiered", shortcut="avg_pool", attn_layer="eca"),
    "ecaresnet50d": _imagenet(*_DEPTHS[50], stem="deep", shortcut="avg_pool", attn_layer="eca"),
    "ecaresnet50t": _imagenet(*_DEPTHS[50], stem="deep_tiered", shortcut="avg_pool", attn_layer="eca"),
    "ecaresnet101d": _imagenet(*_DEPTHS[101], stem="deep", shortcut="avg_pool", attn_layer="eca"),
}

_FIELDS = {f.name for f in dataclasses.fields(ResNet)} - {"parent", "name"}


def list_models() -> list[str]:
    """Names accepted by ``create_model``, sorted."""
    return sorted(MODEL_CONFIGS)


def model_config(name: str) -> dict[str, Any]:
    """The knob settings behind a named model (a copy: change it and pass it to ``ResNet(**config)``)."""
    if name not in MODEL_CONFIGS:
        close = difflib.get_close_matches(name, MODEL_CONFIGS, n=3, cutoff=0.5)
        suggestion = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{suggestion} resnet_jax.list_models() lists all "
                         f"{len(MODEL_CONFIGS)} names.")
    return dict(MODEL_CONFIGS[name])


# timm's create_model keywords that mean something here under another name, or are not options here
_TIMM_KEYWORDS = {
    "in_chans": "in_channels",
    "zero_init_last": "zero_init_residual",
    "stem_type": "stem ('imagenet', 'cifar', 'deep', 'deep_tiered')",
    "avg_down": "shortcut='avg_pool'",
    "cardinality": "groups",
    "base_width": "width_per_group",
    "global_pool": "nothing: the pooling is always the global average (num_classes=0 returns it)",
    "out_indices": "nothing: features_only=True returns the four stages (strides 4 to 32) and has no index choice",
    "drop_rate": "nothing: there is no dropout before the head (drop_path_rate is stochastic depth)",
    "pretrained": "pretrained(name) or load_timm / load_torchvision, which build the model and load its weights",
}


def _option_hint(option: str) -> str:
    if option in _TIMM_KEYWORDS:
        return f"{option!r} (timm's) is {_TIMM_KEYWORDS[option]}"
    close = difflib.get_close_matches(option, sorted(_FIELDS), n=2)
    return f"{option!r}: did you mean {' or '.join(map(repr, close))}?" if close else f"{option!r} is not an option"


def create_model(model_name: str, /, **overrides: Any) -> ResNet:
    """Build a named model, e.g. ``create_model("resnet50", num_classes=10, dtype=jnp.bfloat16)``.

    Any ``ResNet`` attribute can be overridden; an unknown name or attribute raises ``ValueError``. ``name`` is
    Flax's, as for any module: ``create_model("resnet50", name="backbone")`` inside a user's ``nn.compact``
    module puts its parameters under ``backbone`` (the model's name is positional, so the two never collide).
    """
    config = model_config(model_name)
    flax_name = overrides.pop("name", None)
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        hints = "; ".join(_option_hint(option) for option in unknown)
        raise ValueError(f"unknown option(s) {unknown} for create_model({model_name!r}): {hints}. Valid options "
                         f"are {sorted(_FIELDS)}")
    config.update(overrides)
    return ResNet(**config, name=flax_name)
