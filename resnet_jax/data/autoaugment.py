"""The image operations of AutoAugment-style policies (TrivialAugmentWide, RandAugment) on uint8 HWC images, each
equal per pixel to torchvision's ``transforms.autoaugment._apply_op`` on the same PIL image, and the two policies
with torchvision's operation sets and magnitude bins.

Why Pillow: torchvision applies these operations to PIL images with Pillow's own functions (``ImageEnhance``,
``ImageOps``, ``Image.transform``), so calling the same functions with the same arguments reproduces its pixels
exactly, and the host-side Grain pipeline stays free of torch. The geometric operations go through one affine map
(``_inverse_affine``), written out below from its definition.

    image = apply_op(image, "Rotate", -30.0)                     # uint8 HWC in, uint8 HWC out
    image = trivial_augment_wide(image, rng)                     # rng: a numpy Generator
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

RESAMPLING = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _inverse_affine(center, angle, translate, shear) -> tuple[float, ...]:
    """Pillow's ``Image.transform(AFFINE)`` data (output pixel -> input pixel) for the map that shears and
    rotates by ``angle`` degrees about ``center``, then translates by ``translate``: torchvision's convention,
    at unit scale.

    The linear part ``[[a, b], [c, d]]`` is a rotation composed with the shear (``a..d`` below); it has unit
    determinant, so its inverse is ``[[d, -b], [-c, a]]``, and the offsets follow from
    ``x = M^-1 (y - center - translate) + center``."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    (cx, cy), (tx, ty) = center, translate
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return tuple(m)


def _affine(pil, *, shear=(0.0, 0.0), translate=(0, 0), center=None, resample, fill):
    center = center if center is not None else (pil.width * 0.5, pil.height * 0.5)
    return pil.transform(pil.size, Image.AFFINE, _inverse_affine(center, 0.0, translate, shear), resample,
                         fillcolor=fill)


def _shear_degrees(magnitude: float) -> float:
    """The operations' magnitude is the shear factor; torchvision passes ``degrees(atan(factor))``."""
    return math.degrees(math.atan(magnitude))


# name -> (PIL image, magnitude, resample, fill) -> PIL image; torchvision's meaning of each magnitude
OPS: dict[str, Callable] = {
    "Identity": lambda im, m, r, f: im,
    "ShearX": lambda im, m, r, f: _affine(im, shear=(_shear_degrees(m), 0.0), center=(0, 0), resample=r, fill=f),
    "ShearY": lambda im, m, r, f: _affine(im, shear=(0.0, _shear_degrees(m)), center=(0, 0), resample=r, fill=f),
    "TranslateX": lambda im, m, r, f: _affine(im, translate=(int(m), 0), resample=r, fill=f),
    "TranslateY": lambda im, m, r, f: _affine(im, translate=(0, int(m)), resample=r, fill=f),
    "Rotate": lambda im, m, r, f: im.rotate(m, r, False, None, fillcolor=f),
    "Brightness": lambda im, m, r, f: ImageEnhance.Brightness(im).enhance(1.0 + m),
    "Color": lambda im, m, r, f: ImageEnhance.Color(im).enhance(1.0 + m),
    "Contrast": lambda im, m, r, f: ImageEnhance.Contrast(im).enhance(1.0 + m),
    "Sharpness": lambda im, m, r, f: ImageEnhance.Sharpness(im).enhance(1.0 + m),
    "Posterize": lambda im, m, r, f: ImageOps.posterize(im, int(m)),
    "Solarize": lambda im, m, r, f: ImageOps.solarize(im, m),
    "AutoContrast": lambda im, m, r, f: ImageOps.autocontrast(im),
    "Equalize": lambda im, m, r, f: ImageOps.equalize(im),
    "Invert": lambda im, m, r, f: ImageOps.invert(im),
}


def apply_op(image: np.ndarray, name: str, magnitude: float, *, interpolation: str = "nearest",
             fill: int | tuple[int, ...] | None = None) -> np.ndarray:
    """One operation on a uint8 ``(H, W, C)`` image, C 1 or 3; ``name`` and the signed ``magnitude`` mean what
    they mean in torchvision's ``_apply_op`` (shear factor, pixels of translation, degrees, enhancement offset
    from 1, bits kept, solarize threshold). ``fill``: the value of pixels moved in from outside (default 0)."""
    if name not in OPS:
        raise ValueError(f"unknown augmentation operation {name!r}; choose one of {sorted(OPS)}")
    if interpolation not in RESAMPLING:
        raise ValueError(f"interpolation {interpolation!r} is not one of {sorted(RESAMPLING)}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"apply_op takes a uint8 (H, W, C) image with C 1 or 3, got {image.dtype} {image.shape}")
    channels = image.shape[-1]
    pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
    fill = 0 if fill is None else fill
    fill = tuple([fill] * channels) if isinstance(fill, (int, float)) and channels > 1 else fill
    fill = tuple(int(v) for v in fill) if isinstance(fill, (tuple, list)) else int(fill)
    out = np.asarray(OPS[name](pil, magnitude, RESAMPLING[interpolation], fill))
    return out[:, :, None] if out.ndim == 2 else out


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32 to the bit, as torchvision's policies build their bins.
    Why not ``np.linspace``: torchvision truncates translations with ``int()``, and torch's bin 15 of 0..32 is
    15.999999 (its second half counts back from ``end`` in one fused multiply-add), not 16.0: a one-pixel
    different shift. The float64 expression below rounds once to float32, as the fused operation does."""
    start, end = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start])
    step = np.float64(np.float32((end - start) / np.float32(steps - 1)))
    index = np.arange(steps)
    forward = np.float64(start) + step * index
    backward = np.float64(end) - step * (steps - 1 - index)
    return np.where(index < steps // 2, forward, backward).astype(np.float32)


def wide_space(num_bins: int = 31) -> dict[str, tuple[np.ndarray, bool]]:
    """TrivialAugmentWide's operations: name -> (magnitude bins, signed), torchvision's ranges."""
    return {"Identity": (np.zeros(1), False),
            "ShearX": (torch_linspace(0.0, 0.99, num_bins), True),
            "ShearY": (torch_linspace(0.0, 0.99, num_bins), True),
            "TranslateX": (torch_linspace(0.0, 32.0, num_bins), True),
            "TranslateY": (torch_linspace(0.0, 32.0, num_bins), True),
            "Rotate": (torch_linspace(0.0, 135.0, num_bins), True),
            **{op: (torch_linspace(0.0, 0.99, num_bins), True) for op in ("Brightness", "Color", "Contrast",
                                                                         "Sharpness")},
            "Posterize": (8 - np.round(np.arange(num_bins) / ((num_bins - 1) / 6)).astype(int), False),
            "Solarize": (torch_linspace(255.0, 0.0, num_bins), False),
            "AutoContrast": (np.zeros(1), False), "Equalize": (np.zeros(1), False)}


def rand_augment_space(num_bins: int, height: int, width: int) -> dict[str, tuple[np.ndarray, bool]]:
    """RandAugment's operations (torchvision's): translations scale with the image, rotations to 30 degrees."""
    return {"Identity": (np.zeros(1), False),
            "ShearX": (torch_linspace(0.0, 0.3, num_bins), True),
            "ShearY": (torch_linspace(0.0, 0.3, num_bins), True),
            "TranslateX": (torch_linspace(0.0, 150.0 / 331.0 * width, num_bins), True),
            "TranslateY": (torch_linspace(0.0, 150.0 / 331.0 * height, num_bins), True),
            "Rotate": (torch_linspace(0.0, 30.0, num_bins), True),
            **{op: (torch_linspace(0.0, 0.9, num_bins), True) for op in ("Brightness", "Color", "Contrast",
                                                                        "Sharpness")},
            "Posterize": (8 - np.round(np.arange(num_bins) / ((num_bins - 1) / 4)).astype(int), False),
            "Solarize": (torch_linspace(255.0, 0.0, num_bins), False),
            "AutoContrast": (np.zeros(1), False), "Equalize": (np.zeros(1), False)}


def _draw(space, rng: np.random.Generator, magnitude_bin: int | None):
    """One operation uniformly, its magnitude at ``magnitude_bin`` (uniform over the bins if None), negated
    with probability 1/2 when signed."""
    name = list(space)[rng.integers(len(space))]
    bins, signed = space[name]
    level = rng.integers(len(bins)) if magnitude_bin is None else min(magnitude_bin, len(bins) - 1)
    magnitude = float(bins[level] if len(bins) > 1 else 0.0)
    return name, -magnitude if signed and rng.integers(2) else magnitude


@functools.lru_cache(maxsize=8)
def _wide_space_once(num_bins: int) -> dict[str, tuple[np.ndarray, bool]]:
    """``wide_space`` built once per ``num_bins``: rebuilding its eleven ``linspace`` tables for every image cost
    ~5% of the V2 training transform's host time (benchmarks/input_pipeline.py). Read-only by its one caller."""
    return wide_space(num_bins)


def trivial_augment_wide(image: np.ndarray, rng: np.random.Generator, num_bins: int = 31, **op_kwargs):
    """TrivialAugmentWide (Mueller & Hutter 2021, torchvision's): one operation, one uniform magnitude bin."""
    op_kwargs = _per_image(op_kwargs, rng)
    name, magnitude = _draw(_wide_space_once(int(num_bins)), rng, None)
    return apply_op(image, name, magnitude, **op_kwargs)


def rand_augment(image: np.ndarray, rng: np.random.Generator, num_ops: int = 2, magnitude: int = 9,
                 num_bins: int = 31, **op_kwargs):
    """RandAugment (Cubuk et al. 2020, torchvision's): ``num_ops`` operations at the fixed ``magnitude`` bin."""
    if not 0 <= magnitude < num_bins:  # it was clamped to the last bin; torchvision's RandAugment fails on it
        raise ValueError(f"magnitude is one of the {num_bins} bins, 0 to {num_bins - 1}; got {magnitude}")
    op_kwargs = _per_image(op_kwargs, rng)
    space = rand_augment_space(num_bins, *np.shape(image)[:2])
    for _ in range(num_ops):
        image = apply_op(image, *_draw(space, rng, magnitude), **op_kwargs)
    return image


def _per_image(op_kwargs: dict, rng: np.random.Generator) -> dict:
    """``interpolation="random"`` (timm's per-image pick, ``config.train_interpolation``) as bilinear or bicubic
    for this image; torchvision's policies take one interpolation, which has no random choice of its own."""
    if op_kwargs.get("interpolation") != "random":
        return op_kwargs
    return {**op_kwargs, "interpolation": ("bilinear", "bicubic")[rng.integers(2)]}


# torchvision's references/classification (presets.py) builds both policies with the interpolation of its training
# crops (its --interpolation, bilinear by default), and fills moved-in pixels with 0.
POLICIES = ("ta_wide", "ra", "rand-m<M>-mstd<S>-inc1")


def policy(name: str, mean=(0.485, 0.456, 0.406), interpolation: str = "random"
           ) -> Callable[[np.ndarray, np.random.Generator], np.ndarray] | None:
    """The augmentation policy a config names (``config.auto_augment``): torchvision's ``--auto-augment`` names
    "ta_wide" and "ra", or timm's ``rand-...`` strings (``timm_randaugment``, which fills with the dataset's
    ``mean`` colour), each with the training crop's ``interpolation`` as torchvision's presets.py and timm's
    create_transform pass it; ``image, rng -> image`` on uint8 HWC, or None for ``""``."""
    if name == "":
        return None
    if name == "ta_wide":  # partials, not lambdas: Grain's worker processes receive them pickled
        return functools.partial(trivial_augment_wide, interpolation=interpolation)
    if name == "ra":
        return functools.partial(rand_augment, interpolation=interpolation)
    if name.startswith("rand-"):
        from resnet_jax.data.timm_randaugment import TimmRandAugment

        mean = np.broadcast_to(np.ravel(mean), (3,))
        return TimmRandAugment.parse(name, fill=tuple(min(255, round(255 * float(m))) for m in mean),
                                     interpolation=interpolation)
    raise ValueError(f"auto_augment {name!r} is not one of {['', *POLICIES]}")
