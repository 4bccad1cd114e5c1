"""Per-example augmentations on uint8 HWC numpy images, each seeded by the `np.random.Generator` it is given.

Grain hands every record its own generator derived from (seed, position in the stream), so an augmentation
depends only on the seed and the record's place in the run: the same batches come back after a resume, in
any worker. Resizing uses Pillow (bilinear, antialiased on downscale), which reads crop box and resize in one
pass, the cheap way to do random-resized crops.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from resnet_jax.data.autoaugment import apply_op  # noqa: F401  (here too: the name the augmentations go by)

# ITU-R BT.601 luma, what Pillow's "L" conversion and torchvision's Grayscale use.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# The same weights in 16-bit fixed point, as Pillow's "L" conversion computes them: on uint8 images the float
# product rounded differs from Pillow's by 1 on about 1 pixel in 2,500, so it is done in integers instead.
_LUMA_FIXED = np.array([19595, 38470, 7471], np.uint32)


INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def resize(image: np.ndarray, height: int, width: int, box: tuple[float, float, float, float] | None = None,
           interpolation: str = "bilinear"):
    """Resize `image` (or its `box` = (left, top, right, bottom) region) to (height, width), antialiased, by
    Pillow's "bilinear" or "bicubic" filter (torchvision's resize of a PIL image)."""
    if box is None and image.shape[:2] == (height, width):
        return image
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    out = np.asarray(pil.resize((width, height), INTERPOLATIONS[interpolation], box=box))
    return out[:, :, None] if out.ndim == 2 else out


def random_crop_flip(image: np.ndarray, rng: np.random.Generator, size: int, padding: int = 4,
                     flip: bool = True) -> np.ndarray:
    """CIFAR recipe: zero-pad by `padding`, take a random size x size crop, flip left-right half the time.

    An image of another size is first brought to size x size as evaluation's ``resize_center_crop(image, size,
    1.0)`` frames it (shorter side to ``size``, the central square), never squashed: a photo then keeps its
    proportions, and training and evaluation see the same view (``pipeline.default_crop_fraction``).

    ``flip=False`` keeps only the shift, for images whose mirror is another class or no class (digits, text).
    The same random numbers are drawn either way, so the crops do not depend on ``flip``.

    Copies the in-bounds part of the shifted window into zeros rather than padding first: same pixels, one
    allocation (this runs once per example per epoch).
    """
    image = resize_center_crop(image, size, 1.0)
    dy, dx, mirror = rng.integers(0, (2 * padding + 1, 2 * padding + 1, 2)) - (padding, padding, 0)
    out = np.zeros_like(image)
    h, w = size - abs(dy), size - abs(dx)
    out[max(-dy, 0):max(-dy, 0) + h, max(-dx, 0):max(-dx, 0) + w] = image[max(dy, 0):max(dy, 0) + h,
                                                                          max(dx, 0):max(dx, 0) + w]
    return out[:, ::-1] if flip and mirror else out


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Inception-style crop box (left, top, right, bottom): area fraction in `scale`, aspect ratio in `ratio`.

    Ten tries at a box that fits, then the whole image clamped to the ratio range, as torchvision does.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def random_resized_crop_flip(image: np.ndarray, rng: np.random.Generator, size: int,
                             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation: str = "bilinear") -> np.ndarray:
    """ImageNet recipe: a random-resized crop to size x size, flipped left-right half the time.

    ``interpolation``: "bilinear" (torchvision's RandomResizedCrop), "bicubic", or "random", each crop by one
    of the two drawn at even odds (timm's RandomResizedCropAndInterpolation, the default of timm's train.py).
    Cut out, then resized, as torchvision's ``resized_crop`` does: resizing the box within the whole image
    (Pillow's ``box=``) let the filter reach pixels outside it, which changed ~2% of the pixels, on the border."""
    left, top, right, bottom = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    if interpolation == "random":
        interpolation = ("bilinear", "bicubic")[int(rng.integers(2))]
    crop = resize(np.ascontiguousarray(image[top:bottom, left:right]), size, size, interpolation=interpolation)
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def resize_center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """Evaluation: resize the shorter side to size / crop_fraction, then take the central size x size."""
    height, width = image.shape[:2]
    crop = min(height, width) * crop_fraction
    if crop == height == width == size:
        return image
    # Crop in source coordinates and resize once: the same view as resize-then-crop, with less work.
    top, left = (height - crop) / 2, (width - crop) / 2
    return resize(image, size, size, box=(left, top, left + crop, top + crop))


def to_channels(image: np.ndarray, channels: int | None) -> np.ndarray:
    """Greyscale -> RGB by repetition, RGB -> greyscale by luma, on the last axis (one image or a batch)."""
    have = image.shape[-1]
    if channels is None or channels == have:
        return image
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if have == 3 and channels == 1:
        if image.dtype == np.uint8:
            return ((image.astype(np.uint32) @ _LUMA_FIXED + 0x8000) >> 16)[..., None].astype(np.uint8)
        grey = image.astype(np.float32) @ _LUMA
        return (np.round(grey) if np.issubdtype(image.dtype, np.integer) else grey)[..., None].astype(image.dtype)
    raise ValueError(f"Cannot convert {have}-channel images to {channels} channels; only 1 <-> 3 is supported.")


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """uint8 -> float32 (x / 255 - mean) / std per channel (last axis); one-value mean/std apply to all.

    A uint8 has 256 values, so each channel is a 256-entry table lookup: exact, and a third faster than
    converting and doing arithmetic on the float32 batch (this is the largest array the pipeline touches).
    """
    mean = np.asarray(mean, np.float32).reshape(-1)
    std = np.asarray(std, np.float32).reshape(-1)
    channels = image.shape[-1]
    if mean.size not in (1, channels) or std.size not in (1, channels):
        raise ValueError(f"mean/std have {mean.size}/{std.size} values but the images have {channels} channels; "
                         f"give one value per channel (or one for all).")
    if image.dtype != np.uint8:
        return (image.astype(np.float32) / 255 - mean) / std
    table = np.broadcast_to((np.arange(256, dtype=np.float32)[:, None] / 255 - mean) / std, (256, channels))
    out = np.empty(image.shape, np.float32)
    for c in range(channels):
        np.take(table[:, c], image[..., c], out=out[..., c], mode="clip")
    return out
