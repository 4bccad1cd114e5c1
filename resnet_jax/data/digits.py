"""The bundled default dataset: scikit-learn's 1,797 real 8x8 handwritten digits, so training runs offline.

The train/validation split is fixed (stratified, seed SPLIT_SEED) and independent of the run's seed, so
validation images can never leak into training whatever seed a run uses. Images are upsampled on read
(bilinear) to the size asked for: the 8x8 originals stay small when pickled to Grain workers.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from resnet_jax.data.source import Source

SPLIT_SEED = 0
VALIDATION_FRACTION = 0.2
_SPLITS = {"train": "train", "validation": "validation", "val": "validation", "test": "validation"}


def _load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are 0..16: rescale to the full uint8 range every other source uses.
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_x, val_x, train_y, val_y = train_test_split(
        images, labels, test_size=VALIDATION_FRACTION, random_state=SPLIT_SEED, stratify=labels)
    return (train_x, train_y) if split == "train" else (val_x, val_y)


class DigitsSource(Source):
    """Greyscale digits (H, W, 1), labels 0..9; `image_size` sets H = W (default 32)."""

    def __init__(self, split: str = "train", image_size: int | None = None):
        if split not in _SPLITS:
            raise ValueError(f"The digits dataset has splits 'train' and 'validation' (or 'test'), not {split!r}.")
        self.name, self.split = "digits", _SPLITS[split]
        self.size = 32 if image_size is None else int(image_size)  # 0 was taken as "unset", 32
        if self.size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, not {image_size!r}.")
        self._images, self._labels = _load_split(self.split)
        self.num_classes, self.class_names = 10, [str(d) for d in range(10)]
        self.image_shape = (self.size, self.size, 1)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict:
        image = self._images[index]
        if self.size != image.shape[0]:
            image = np.asarray(Image.fromarray(image).resize((self.size, self.size), Image.BILINEAR))
        return {"image": image[:, :, None], "label": int(self._labels[index])}

    def __repr__(self) -> str:
        return f"DigitsSource(split={self.split!r}, image_size={self.size}, len={len(self)})"
