"""timm's RandAugment, the form the ResNet Strikes Back recipes name (``rand-m7-mstd0.5-inc1``), on uint8 HWC
images. It differs from torchvision's (``autoaugment.rand_augment``) in ways that change the images:

- the magnitude is drawn per operation from a normal distribution around ``m`` (``mstd``), clipped to [0, 10];
- ``inc1`` selects operations whose strength grows with the magnitude (posterize keeps fewer bits, solarize has a
  lower threshold, enhancements move further from 1 in either direction), plus ``SolarizeAdd``;
- each of the ``n`` operations (with replacement) runs only with probability ``p`` (0.5);
- translations are a fraction of the image (up to 0.45), pixels moved in are the dataset's mean colour, and each
  geometric operation resamples with bilinear or bicubic interpolation, chosen at random.

Each operation calls Pillow with the arguments timm computes, so the pixels are timm's (checked per operation in
tests/test_timm_randaugment.py); the random draws come from the numpy Generator the pipeline gives each example.

    augment = TimmRandAugment.parse("rand-m7-mstd0.5-inc1", fill=(124, 116, 104))
    image = augment(image, rng)
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _affine(pil, data, resample, fill):
    return pil.transform(pil.size, Image.AFFINE, data, resample, fillcolor=fill)


def _posterize(pil, bits: int):
    """Keep ``bits`` high bits; 0 (timm's argument at level 10) keeps none, as Pillow did before it refused 0."""
    if bits >= 8:
        return pil
    return ImageOps.posterize(pil, bits) if bits > 0 else Image.new(pil.mode, pil.size)


def _solarize_add(pil, add: int):
    table = [min(255, i + add) if i < 128 else i for i in range(256)] * len(pil.getbands())
    return pil.point(table)


# name -> (argument from (level, sign, image), operation(PIL image, argument, resample, fill)); the levels are
# timm's ``_LEVEL_DENOM`` scale, 0..10. ``sign`` is -1 or 1 (used by the operations timm negates at random).
OPS = {
    "AutoContrast": (None, lambda im, a, r, f: ImageOps.autocontrast(im)),
    "Equalize": (None, lambda im, a, r, f: ImageOps.equalize(im)),
    "Invert": (None, lambda im, a, r, f: ImageOps.invert(im)),
    "Rotate": (lambda lv, s, im: s * lv / 10 * 30.0, lambda im, a, r, f: im.rotate(a, resample=r, fillcolor=f)),
    "PosterizeIncreasing": (lambda lv, s, im: 4 - int(lv / 10 * 4), lambda im, a, r, f: _posterize(im, a)),
    "SolarizeIncreasing": (lambda lv, s, im: 256 - min(256, int(lv / 10 * 256)),
                           lambda im, a, r, f: ImageOps.solarize(im, a)),
    "SolarizeAdd": (lambda lv, s, im: min(128, int(lv / 10 * 110)), lambda im, a, r, f: _solarize_add(im, a)),
    **{f"{name}Increasing": (lambda lv, s, im: max(0.1, 1.0 + s * lv / 10 * 0.9),
                             lambda im, a, r, f, enhance=enhance: enhance(im).enhance(a))
       for name, enhance in (("Color", ImageEnhance.Color), ("Contrast", ImageEnhance.Contrast),
                             ("Brightness", ImageEnhance.Brightness), ("Sharpness", ImageEnhance.Sharpness))},
    "ShearX": (lambda lv, s, im: s * lv / 10 * 0.3, lambda im, a, r, f: _affine(im, (1, a, 0, 0, 1, 0), r, f)),
    "ShearY": (lambda lv, s, im: s * lv / 10 * 0.3, lambda im, a, r, f: _affine(im, (1, 0, 0, a, 1, 0), r, f)),
    "TranslateXRel": (lambda lv, s, im: s * lv / 10 * 0.45 * im.size[0],
                      lambda im, a, r, f: _affine(im, (1, 0, a, 0, 1, 0), r, f)),
    "TranslateYRel": (lambda lv, s, im: s * lv / 10 * 0.45 * im.size[1],
                      lambda im, a, r, f: _affine(im, (1, 0, 0, 0, 1, a), r, f)),
}
INCREASING = tuple(OPS)  # timm's _RAND_INCREASING_TRANSFORMS, in its order


def apply_timm_op(image: np.ndarray, name: str, level: float, sign: int = 1, interpolation: str = "bicubic",
                  fill: tuple[int, ...] = (128, 128, 128)) -> np.ndarray:
    """One of timm's RandAugment operations at ``level`` (0..10) and ``sign`` on a uint8 HWC image (C 1 or 3)."""
    if name not in OPS:
        raise ValueError(f"unknown timm RandAugment operation {name!r}; choose one of {sorted(OPS)}")
    pil = Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image)
    fill = int(round(float(np.mean(fill)))) if image.shape[-1] == 1 else tuple(int(v) for v in fill)
    argument, operation = OPS[name]
    out = np.asarray(operation(pil, None if argument is None else argument(level, sign, pil),
                               INTERPOLATIONS[interpolation], fill))
    return out[:, :, None] if out.ndim == 2 else out


@dataclasses.dataclass(frozen=True)
class TimmRandAugment:
    """timm's ``rand-...`` RandAugment: ``num_layers`` operations drawn with replacement, each applied with
    probability ``prob`` at a magnitude drawn from N(``magnitude``, ``magnitude_std``) clipped to [0, 10]."""

    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    ops: tuple[str, ...] = INCREASING
    fill: tuple[int, ...] = (128, 128, 128)
    # the geometric operations' filter: timm's create_transform passes the training crop's interpolation on, and
    # only its "random" leaves each operation a random pick of bilinear and bicubic
    interpolation: str = "random"

    def __post_init__(self):
        if self.interpolation not in ("random", *INTERPOLATIONS):
            raise ValueError(f"interpolation must be 'random' or one of {sorted(INTERPOLATIONS)}, not "
                             f"{self.interpolation!r}")

    @classmethod
    def parse(cls, spec: str, fill: tuple[int, ...] = (128, 128, 128), interpolation: str = "random"
              ) -> TimmRandAugment:
        """timm's config string: ``rand`` then dash-separated ``m<int>``, ``n<int>``, ``p<float>``,
        ``mstd<float>`` (above 100: uniform in [0, m]) and ``inc<0|1>``; ``inc1`` is the set this module has."""
        parts = spec.split("-")
        settings = {}
        for part in parts[1:]:
            match = re.fullmatch(r"(mstd|inc|m|n|p)(\d.*)", part)
            if parts[0] != "rand" or not match:
                raise ValueError(f"{spec!r} is not timm's RandAugment form 'rand-m<M>[-n<N>][-p<P>][-mstd<S>]-inc1'")
            settings[match[1]] = float(match[2])
        if settings.get("inc") != 1.0:
            raise ValueError(f"{spec!r}: only timm's increasing operation set (inc1) is implemented; add -inc1")
        return cls(magnitude=settings.get("m", 10.0), num_layers=int(settings.get("n", 2)),
                   prob=settings.get("p", 0.5), magnitude_std=settings.get("mstd", 0.0), fill=tuple(fill),
                   interpolation=interpolation)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for _ in range(self.num_layers):
            name = self.ops[rng.integers(len(self.ops))]
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            level = self.magnitude
            if self.magnitude_std > 100:
                level = rng.uniform(0, level)
            elif self.magnitude_std > 0:
                level = rng.normal(level, self.magnitude_std)
            level = max(0.0, min(level, 10.0))
            sign = -1 if rng.random() > 0.5 else 1
            interpolation = self.interpolation
            if interpolation == "random":
                interpolation = ("bilinear", "bicubic")[rng.integers(2)]
            image = apply_timm_op(image, name, level, sign, interpolation, self.fill)
        return image
