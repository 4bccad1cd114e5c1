"""Seeded random images for benchmarks and tests: no files, any shape, reproducible per index.

Each record is generated from (seed, index) alone, so two processes or workers agree without sharing state.
"""

from __future__ import annotations

import numpy as np

from resnet_jax.data.source import Source


class SyntheticSource(Source):
    """`num_examples` random uint8 images of `image_shape` with labels uniform over `num_classes`."""

    def __init__(self, split: str = "train", *, num_examples: int = 1024, num_classes: int = 10,
                 image_shape: tuple[int, int, int] = (32, 32, 3), seed: int = 0):
        if num_examples < 1 or num_classes < 1:
            raise ValueError(f"synthetic data needs num_examples >= 1 and num_classes >= 1, "
                             f"not {num_examples} and {num_classes}.")
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (height, width, channels), not {image_shape!r}.")
        self.name, self.split = "synthetic", split
        self.num_examples, self.num_classes = int(num_examples), int(num_classes)
        self.class_names = [f"class_{i}" for i in range(self.num_classes)]
        self.image_shape = tuple(int(d) for d in image_shape)
        # Different splits of the same seed must not be the same images.
        self._seed = (int(seed), sum(map(ord, split)))

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} synthetic examples")
        rng = np.random.default_rng((*self._seed, int(index)))
        label = int(rng.integers(self.num_classes))
        return {"image": rng.integers(0, 256, self.image_shape, dtype=np.uint8), "label": label}

    def __repr__(self) -> str:
        return (f"SyntheticSource(split={self.split!r}, num_examples={self.num_examples}, "
                f"num_classes={self.num_classes}, image_shape={self.image_shape}, seed={self._seed[0]})")
