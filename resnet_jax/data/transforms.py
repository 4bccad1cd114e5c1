"""The evaluation preprocessing that published weights were measured with, as code equal per pixel to the
publisher's: torchvision's ``weights.transforms()`` and timm's ``create_transform(**resolve_data_config(...))``.

Why not a hand-written resize: the published accuracy holds only for the exact pixels the publisher fed. The
details that move pixels are easy to get wrong: torchvision truncates the resized long side
(``int(short_target * long / short)``, where rounding moved a third of a photograph's normalised values by more
than 0.02), rounds the crop offset half to even, and resizes PIL images with Pillow (always antialiased). This
module makes the same calls in the same order, so its output equals theirs to the bit.

    transform = weights_info("resnet50").transforms()   # an EvalTransform
    x = transform(Image.open("photo.jpg"))              # float32 (224, 224, 3), normalised, for NHWC models
    batch = transform.batch([image_a, image_b])         # (2, 224, 224, 3)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image

from resnet_jax.data.augment import normalize
from resnet_jax.data.images import decoded, pil_pixels

INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
# timm's crop modes: "center" resizes the short side and crops (torchvision's only mode), "squash" resizes both
# sides to the scale size (aspect ratio lost, nothing cut), "border" fits the long side and pads with the mean.
CROP_MODES = ("center", "squash", "border")


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Resize to ``resize_size``, centre-crop ``crop_size``, scale to [0, 1], subtract ``mean``, divide by ``std``.

    ``crop_mode`` says how ``resize_size`` is read (see ``CROP_MODES``); ``interpolation`` is Pillow's filter by
    torchvision's name. Calling it on one image (a PIL image, a uint8 ``(H, W)``/``(H, W, 3)``/``(H, W, 4)``
    array, or an image file's path) gives float32 ``(crop_size, crop_size, 3)``; ``batch`` stacks several;
    ``crop`` stops before the float conversion, for pipelines that normalise on the device."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_mode: str = "center"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode {self.crop_mode!r} is not one of {list(CROP_MODES)}")
        if self.resize_size < 1 or self.crop_size < 1:
            raise ValueError(f"resize_size and crop_size must be positive, got {self.resize_size}, {self.crop_size}")

    @classmethod
    def from_timm_config(cls, config: dict[str, Any]) -> EvalTransform:
        """From a timm pretrained config (``PretrainedCfg.to_dict()``, a hub ``config.json``'s
        ``pretrained_cfg``): the test size and test crop where given, as ``resolve_data_config(...,
        use_test_size=True)`` reads them, and timm's defaults for any key left out (``_TIMM_DEFAULTS``)."""
        config = {**_TIMM_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        size = config.get("test_input_size") or config["input_size"]
        crop_pct = config.get("test_crop_pct") or config["crop_pct"]
        height, width = size[-2:]
        if height != width:
            raise ValueError(f"timm's config asks for a {height}x{width} input; only square inputs are supported")
        return cls(math.floor(height / crop_pct), height, tuple(config["mean"]), tuple(config["std"]),
                   config["interpolation"], config["crop_mode"])

    def __call__(self, image: Any) -> np.ndarray:
        return normalize(self.crop(image), self.mean, self.std)  # float32 steps, as torch takes them

    def batch(self, images) -> np.ndarray:
        """float32 ``(N, crop_size, crop_size, 3)`` from a list of images, or a uint8 ``(N, H, W, C)`` array."""
        if len(images) == 0:  # numpy's "need at least one array to stack"
            raise ValueError("batch() got no images; pass at least one")
        return np.stack([self(image) for image in images])

    def prepare(self, images: Any, channels: int = 3, first: int = 0) -> np.ndarray:
        """uint8 ``(N, crop_size, crop_size, channels)`` from anything ``Classifier.predict`` accepts (one image,
        a batch, a list of arrays or file paths: ``resnet_jax.data.images.split_images``), resized and cropped
        here and converted to the model's channels (RGB <-> greyscale); normalising is left to the caller.
        ``first``: the index of the first image in what the user passed, for messages."""
        from resnet_jax.data.augment import to_channels
        from resnet_jax.data.images import split_images

        return np.stack([to_channels(self.crop(image), channels)
                         for image in split_images(images, channels, first)])

    def crop(self, image: Any) -> np.ndarray:
        """The resized and cropped uint8 ``(crop_size, crop_size, 3)`` image, before scaling and normalising."""
        pil = _as_rgb_pil(image)
        filt = INTERPOLATIONS[self.interpolation]
        width, height = pil.size
        if self.crop_mode == "squash":
            pil = pil.resize((self.resize_size, self.resize_size), filt)
        elif self.crop_mode == "border":  # timm's ResizeKeepRatio(longest=1): the long side fits
            ratio = max(height / self.resize_size, width / self.resize_size)
            pil = pil.resize((round(width / ratio), round(height / ratio)), filt)
        else:  # torchvision's shortest-edge Resize: the long side is truncated, not rounded
            short, long = min(width, height), max(width, height)
            new_long = int(self.resize_size * long / short)
            new = (self.resize_size, new_long) if width <= height else (new_long, self.resize_size)
            if new != (width, height):
                pil = pil.resize(new, filt)
        fill = [round(255 * m) for m in self.mean] if self.crop_mode == "border" else [0, 0, 0]
        return _center_crop_or_pad(np.asarray(pil), self.crop_size, np.array(fill, np.uint8))


# timm's defaults for a config that leaves a key out (timm.data.constants and resolve_data_config).
_TIMM_DEFAULTS = {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic", "crop_mode": "center",
                  "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def _as_rgb_pil(image: Any) -> Image.Image:
    """A file (a path, encoded bytes, an open file), an array or a PIL image as RGB by ``images.pil_pixels``, as
    predict and the data readers decode: Pillow's conversion (torchvision's, to the bit) for every 8-bit mode, and
    the top 8 bits of 16-bit greyscale, which ``convert("RGB")`` clips to white (a 16-bit scan came out all
    saturated here while predict read it right)."""
    if isinstance(image, Image.Image):
        if 0 in image.size:
            raise ValueError(f"the image is {image.size[0]}x{image.size[1]}, which holds no pixels; pass a non-empty "
                             "image")
        return pil_pixels(image, "RGB")
    if isinstance(image, (list, tuple)):
        raise ValueError(f"the transform takes one image, got a {type(image).__name__} of {len(image)}; for several "
                         "images use .batch(images)")
    # a path, encoded bytes or an open file read as predict reads them (a missing, damaged or non-image file
    # named in one ValueError); arrays as they are
    array = np.asarray(decoded(image))
    if array.dtype != np.uint8:
        raise ValueError(f"the transform takes uint8 images (0-255) or PIL images, got an array of {array.dtype}; "
                         f"convert it first, e.g. (x * 255).round().astype(np.uint8) for values in [0, 1]")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"the transform takes one image, (H, W) or (H, W, C) with C in 1/3/4, got shape "
                         f"{array.shape}; for several images use .batch(images)")
    if 0 in array.shape:
        raise ValueError(f"the image has shape {array.shape}, which holds no pixels; pass a non-empty image")
    return Image.fromarray(array).convert("RGB")


def _center_crop_or_pad(image: np.ndarray, size: int, fill: np.ndarray) -> np.ndarray:
    """The central ``size`` x ``size`` window, padded with ``fill`` where the image is smaller: torchvision's
    ``center_crop`` offsets (the padding's odd pixel goes right/bottom, the crop offset rounds half to even)."""
    height, width = image.shape[:2]
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    if pad_h or pad_w:
        padded = np.empty((height + pad_h, width + pad_w, 3), np.uint8)
        padded[...] = fill
        padded[pad_h // 2:pad_h // 2 + height, pad_w // 2:pad_w // 2 + width] = image
        image, (height, width) = padded, padded.shape[:2]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return np.ascontiguousarray(image[top:top + size, left:left + size])
