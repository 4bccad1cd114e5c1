"""Random erasing (Zhong et al. 2020), as torchvision's ``RandomErasing``: with probability ``p`` one rectangle of
the (normalised) image is replaced by a value, 0 by default, which after normalisation is the dataset's mean
colour. torchvision's recipes apply it last, after ``Normalize``, and so does this pipeline.

The rectangle is drawn as torchvision draws it: an area fraction uniform in ``scale``, a log-uniform aspect ratio
in ``ratio``, side lengths rounded, up to ten tries for one that fits strictly inside, then a uniform position;
no rectangle if none fits.
"""

from __future__ import annotations

import math

import numpy as np


def erasing_box(height: int, width: int, rng: np.random.Generator, scale=(0.02, 0.33), ratio=(0.3, 3.3)
                ) -> tuple[int, int, int, int] | None:
    """``(top, left, box_height, box_width)``, or None when ten tries found no rectangle that fits."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if h < height and w < width:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


def draw_erasing(height: int, width: int, rng: np.random.Generator, p: float, scale=(0.02, 0.33),
                 ratio=(0.3, 3.3)) -> tuple[int, int, int, int] | None:
    """The random draws of ``random_erasing`` alone: whether to erase (probability ``p``), then the rectangle;
    the training pipeline draws per example and erases after it normalises the whole batch."""
    if rng.uniform() >= p:
        return None
    return erasing_box(height, width, rng, scale, ratio)


def random_erasing(image: np.ndarray, rng: np.random.Generator, p: float = 0.5, scale=(0.02, 0.33),
                   ratio=(0.3, 3.3), value: float | str = 0.0) -> np.ndarray:
    """``image`` (float HWC, normalised) with one rectangle erased with probability ``p``: set to ``value``, or
    to standard normal noise per pixel and channel with ``value="random"``. Returns a new array."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"the erasing probability p must be in [0, 1], got {p}")
    if not (0 <= scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):  # torchvision's bounds for scale
        raise ValueError(f"scale (a share of the image's area) must be (low, high) with 0 <= low <= high <= 1, and "
                         f"ratio (low, high) with 0 < low <= high; got {scale} and {ratio}")
    if isinstance(value, str) and value != "random":
        raise ValueError(f"value must be a number or 'random', got {value!r}")
    image = np.array(image, copy=True)
    box = draw_erasing(image.shape[0], image.shape[1], rng, p, scale, ratio)
    if box is None:
        return image
    top, left, h, w = box
    patch = rng.standard_normal((h, w, image.shape[2])) if value == "random" else value
    image[top:top + h, left:left + w] = patch
    return image
