"""What a user hands to ``predict``, turned into the uint8 batch a model was evaluated on.

``Classifier.predict``, ``python -m train.predict`` and exported artifacts (``resnet_jax.export.load_exported``)
all call ``prepare_batch``, so the shapes they accept and the errors they give are the same everywhere:

- one image: ``(H, W)``, or ``(H, W, C)`` with C in 1/3/4 (a trailing axis of 1, 3 or 4 is read as channels);
- a batch: ``(N, H, W, C)``;
- a batch of greyscale images ``(N, H, W)``, when the model takes one channel;
- one PIL image, image file path, encoded image (``bytes``) or open file (``io.BytesIO``);
- a list (or tuple) of single images: arrays as above, or any of those (a PIL image is read as its file would
  be: ``pil_to_array``).

Every image is then resized and centre-cropped as evaluation did and converted to the model's channels (RGBA
loses its alpha, RGB <-> greyscale by luma or repetition). Anything else is refused with one sentence saying
what was given and what to pass instead. ``top_classes`` turns the logits back into the top-k class names with
probabilities, also for all three.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

import numpy as np

from resnet_jax.data.augment import resize_center_crop, to_channels

CHANNELS = (1, 3, 4)  # what a trailing axis may hold: greyscale, RGB, RGBA (or whatever the model takes)


def prepare_batch(images: Any, *, size: int, crop_fraction: float, channels: int, first: int = 0) -> np.ndarray:
    """A uint8 ``(N, size, size, channels)`` batch from any accepted form of ``images`` (see the module doc);
    ``first``: the index of its first image in what the user passed (``in_chunks``), for messages."""
    out = [_fit(image, size, crop_fraction, channels) for image in split_images(images, channels, first)]
    return np.stack(out)


PREDICT_CHUNK = 32  # images per piece of a large predict


def in_chunks(images: Any, size: int = PREDICT_CHUNK) -> list[tuple[int, Any]]:
    """``(index of its first image, piece)`` for ``images`` in pieces of at most ``size`` images: a list (or
    tuple) or a batch ``(N, H, W, C)`` is cut, anything else is one piece. Why: predict then reads files, and holds
    full-resolution photos, a piece at a time; all at once it took ~6 MB a photo (20 GB for 2000 ResNet-50
    photos)."""
    if isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and images.ndim == 4):
        if len(images) > size:
            return [(i, images[i:i + size]) for i in range(0, len(images), size)]
    return [(0, images)]


def split_images(images: Any, channels: int, first: int = 0) -> list[np.ndarray]:
    """The individual images in ``images``, each a uint8 ``(H, W, C)`` array (files are read here); messages
    number them from ``first``."""
    allowed = {*CHANNELS, channels}
    if isinstance(images, (str, Path, bytes, bytearray)) or _is_pil(images) or _is_file(images):
        what = str(images) if isinstance(images, (str, Path)) else "the image"
        return [_one_image(decoded(images), what, allowed)]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("predict got an empty list; pass at least one image (an array or a file path)")
        return [_one_image(decoded(x), f"item {i} of the list", allowed) for i, x in enumerate(images, first)]
    array = np.asarray(images)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in allowed):
        return [_one_image(array, "the image", allowed)]
    # a trailing axis of 2 is a greyscale image's alpha (np.asarray of an "LA" PNG), not a batch of 2-wide images
    greyscale_batch = array.ndim == 3 and channels == 1 and array.shape[-1] != 2
    if greyscale_batch or (array.ndim == 4 and array.shape[-1] in allowed):
        if len(array) == 0:  # numpy's "need at least one array to stack" came out of the batching
            raise ValueError(f"predict got a batch of no images (shape {array.shape}); pass at least one, (N, H, W, C) "
                             "with N >= 1")
        return [_one_image(image, f"image {i} of the batch", allowed) for i, image in enumerate(array, first)]
    raise ValueError(_shape_error(array.shape, channels))


def top_classes(logits: Any, class_names: list[str], k: int) -> list[list[tuple[str, float]]]:
    """The ``k`` most probable ``(class name, probability)`` per row of ``logits``: what every predict returns.
    Ranked by the logits, as ``torch.topk`` ranks numbers (ties by the lower index; NaN, whose probabilities are
    NaN anyway, last): classes whose probabilities underflow to 0 (logits over ~100 below the top) had come out in
    index order."""
    check_top_k(k)
    logits = np.asarray(logits, np.float32)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :min(k, probs.shape[-1])]
    return [[(class_names[i], float(p[i])) for i in row] for p, row in zip(probs, order)]


def check_top_k(k: Any) -> None:
    """Every predict's ``top_k``, checked before any image is read: a negative k would slice ``[:k]`` into "all
    but the last -k"."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"top_k must be a positive integer (1 or more; above the number of classes gives them "
                         f"all), got {k!r}")


def read_image(path: str | Path) -> np.ndarray:
    """An image file as a uint8 array: greyscale ``(H, W)`` or RGB ``(H, W, 3)`` (other modes become RGB). A file
    that cannot be read is named, so that one bad photo among many can be found."""
    if isinstance(path, str) and "://" in path and path.split("://", 1)[0].lower() in ("http", "https", "ftp", "s3",
                                                                                       "gs"):
        raise ValueError(f"{path} is a URL; predict reads local files and image data: download it first (e.g. "
                         f"urllib.request.urlretrieve), or pass its bytes")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass its image files (e.g. {path / '*.jpg'} in the shell)")
    return _read(path, str(path))


def _read(source: Any, what: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(source) as img:
            return pil_to_array(img)
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # not an image, truncated, corrupt
        raise ValueError(f"cannot read image {what} ({err}); replace or remove it") from None


def pil_to_array(img: Any) -> np.ndarray:
    """A PIL image as ``read_image`` reads a file: ``L`` and ``RGB`` as they are, every other mode converted to
    RGB (``pil_pixels``). Why: ``np.asarray`` of the raw bands would be palette indices (``P``), ink (``CMYK``, 4
    bands that look like RGBA) or 16-bit values (``I;16``), not pixels; files and PIL objects must read alike."""
    return np.asarray(img if img.mode in ("L", "RGB") else pil_pixels(img, "RGB"))


def pil_pixels(img: Any, mode: str) -> Any:
    """``img`` as 8-bit ``mode`` ("L", "RGB", "RGBA"): what every reader here (predict, ``folder:``, TFDS) decodes
    with. 16-bit greyscale (Pillow's ``I;16``, and the ``I`` it gives 16-bit PGM files and, before Pillow 10.3,
    PNG files) keeps its top 8 bits, as torchvision's ``decode_image`` + ``to_dtype(uint8, scale=True)`` does;
    Pillow's own ``convert`` (torchvision's ``ImageFolder`` loader) clips it at 255 instead, which turns a 16-bit
    scan almost entirely white. Every other mode is Pillow's conversion."""
    from PIL import Image

    if img.mode.startswith("I;16") or (img.mode == "I" and img.format in ("PNG", "PPM")):  # PNG/PGM: 16 bits
        img = Image.fromarray((np.asarray(img).clip(0, 65535).astype(np.uint16) >> 8).astype(np.uint8), "L")
    return img if img.mode == mode else img.convert(mode)


def _is_pil(image: Any) -> bool:
    from PIL import Image

    return isinstance(image, Image.Image)


def _is_file(image: Any) -> bool:
    """An open binary file or ``io.BytesIO`` (what ``Image.open`` also takes), not an array-like."""
    return hasattr(image, "read") and hasattr(image, "seek")


def decoded(image: Any) -> Any:
    """A file path, encoded bytes, an open file or a PIL image as a uint8 array (the one way all are read);
    anything else as it is."""
    import io

    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, (bytes, bytearray)):
        return _read(io.BytesIO(image), "from the bytes given")
    if _is_file(image):
        return _read(image, f"from {getattr(image, 'name', 'the file object')}")
    return pil_to_array(image) if _is_pil(image) else image


def _one_image(image: Any, what: str, allowed: set[int]) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in allowed:
        raise ValueError(f"{what} has shape {image.shape}; a single image must be (H, W) or (H, W, C) with C in "
                         "1/3/4 (channels last)")
    if 0 in image.shape:
        raise ValueError(f"{what} has shape {image.shape}, which holds no pixels; pass a non-empty image")
    if image.dtype == np.uint16:
        raise ValueError(f"predict expects uint8 images (0..255), got uint16 in {what}; for 16-bit images keep "
                         "the top 8 bits with (x >> 8).astype(np.uint8), as files of 16-bit images are read")
    if image.dtype != np.uint8 and np.issubdtype(image.dtype, np.integer):
        raise ValueError(f"predict expects uint8 images (0..255), got {image.dtype} in {what}; if its values are "
                         f"0..255, convert with x.astype(np.uint8)")
    if image.dtype != np.uint8:
        raise ValueError(f"predict expects uint8 images (0..255), got {image.dtype}; convert with "
                         "np.clip(x * 255, 0, 255).astype(np.uint8) if they are floats in [0, 1]")
    return image


def _fit(image: np.ndarray, size: int, crop_fraction: float, channels: int) -> np.ndarray:
    """Resize + centre-crop to ``size`` and convert to ``channels`` (alpha is dropped unless the model takes 4)."""
    if image.shape[-1] == 4 and channels != 4:
        image = image[:, :, :3]
    if image.shape[-1] != channels and (image.shape[-1], channels) not in ((1, 3), (3, 1)):
        raise ValueError(f"an image has {image.shape[-1]} channels but the model takes {channels}; only "
                         "greyscale <-> RGB (and dropping alpha) are converted, so convert the images first")
    image = resize_center_crop(np.ascontiguousarray(image), size, crop_fraction)
    return to_channels(image, channels)


def _shape_error(shape: tuple[int, ...], channels: int) -> str:
    accepted = ("pass one image as (H, W) or (H, W, C), a batch as (N, H, W, C) with C in 1/3/4, "
                + ("a greyscale batch as (N, H, W), " if channels == 1 else "")
                + "or a list of images or file paths")
    hint = ""
    if len(shape) == 4 and shape[1] in CHANNELS:
        hint = " (it looks channels-first: transpose with images.transpose(0, 2, 3, 1))"
    elif len(shape) == 3 and shape[0] in CHANNELS:  # not a greyscale batch: adding an axis would split the colours
        hint = (" (it looks like one channels-first image: transpose with image.transpose(1, 2, 0); only if it is "
                f"{shape[0]} greyscale images, add a channel axis with images[..., None])")
    elif len(shape) == 3 and shape[-1] == 2:  # np.asarray of an "LA" PNG: an axis added would split its rows
        hint = " (it looks like one greyscale image with alpha: keep the grey band with image[..., 0])"
    elif len(shape) == 3:
        hint = (f" (a greyscale batch (N, H, W) needs a one-channel model; this one takes {channels} channels, "
                "so add a channel axis with images[..., None])")
    return f"cannot read images of shape {shape} as one image or a batch{hint}; {accepted}"
