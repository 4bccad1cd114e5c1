"""Any prepared TFDS image-classification dataset as a random-access source, read without TensorFlow.

`tfds.data_source` reads ArrayRecord files directly and decodes images with numpy/Pillow, so training
processes never import TensorFlow; only preparing a dataset (see `prepare.py`) needs it. Every failure that
TFDS would report late, verbosely or after minutes of download retries is turned here into one sentence.
"""

from __future__ import annotations

import io

import numpy as np

from resnet_jax.data.source import Source
from resnet_jax.data.tfds_builder import open_builder, prepare_builder


_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # declared channels -> the Pillow mode an image is converted to


def _decode(encoded: bytes, mode: str) -> np.ndarray:
    """An encoded image as uint8 (H, W, C) in ``mode``, from any other mode (P, CMYK, I;16, LA, ...) as a file is
    read (``pil_pixels``)."""
    from PIL import Image

    from resnet_jax.data.images import pil_pixels

    with Image.open(io.BytesIO(encoded)) as img:
        array = np.asarray(pil_pixels(img, mode))
    return array[:, :, None] if array.ndim == 2 else array


def _classification_keys(info, name: str) -> tuple[str, str]:
    """(image key, label key): the supervised keys when TFDS declares them, else the first Image and ClassLabel."""
    import tensorflow_datasets as tfds

    features = info.features
    keys = info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        image_key, label_key = keys
    else:
        image_key = next((k for k, f in features.items() if isinstance(f, tfds.features.Image)), None)
        label_key = next((k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)), None)
    if (image_key is None or label_key is None or not isinstance(features[image_key], tfds.features.Image)
            or not isinstance(features[label_key], tfds.features.ClassLabel)):
        raise ValueError(f"{name!r} is not an image-classification dataset (it needs an Image and a ClassLabel "
                         f"feature); pick another dataset.")
    return image_key, label_key


class TfdsSource(Source):
    """`split` of a TFDS dataset: any split string TFDS accepts ("train", "train[:90%]", "validation").

    8-bit images are decoded here rather than by TFDS, whose numpy decoding keeps a file's own bands: a palette
    PNG would come out as palette indices, a CMYK JPEG or an RGBA PNG with four channels, 16-bit greyscale
    wrapped around. Each image is converted by Pillow to the channels the dataset declares, as torchvision's
    loader converts every file to RGB.
    """

    def __init__(self, name: str, split: str, *, data_dir=None, download: bool = True, manual_dir=None):
        builder = open_builder(name, data_dir)
        info = builder.info
        self.image_key, self.label_key = _classification_keys(info, name)
        image = info.features[self.image_key]
        self._mode = _PIL_MODES.get(image.shape[-1]) if image.np_dtype == np.uint8 else None
        try:
            self._ds = self._data_source(builder, split)
        except Exception as err:  # TFDS raises KeyError, AssertionError or ValueError here
            self._ds = self._retry_after_prepare(builder, name, split, download, manual_dir, err)
        label = info.features[self.label_key]
        self.name, self.split = name, split
        self.num_classes, self.class_names = int(label.num_classes), list(label.names)
        self.image_shape = tuple(image.shape)

    def _data_source(self, builder, split):
        import tensorflow_datasets as tfds

        decoders = {self.image_key: tfds.decode.SkipDecoding()} if self._mode else None
        return builder.as_data_source(split=split, decoders=decoders)

    def _retry_after_prepare(self, builder, name, split, download, manual_dir, err):
        if builder.is_prepared():
            splits = ", ".join(sorted(builder.info.splits)) or "none"
            raise ValueError(f"Cannot read split {split!r} of {name!r} ({err}); its splits are: {splits}. If it "
                             f"was prepared without that split's files, add them, delete {builder.data_dir} and "
                             f"prepare it again.") from None
        if not download:
            root = builder._data_dir_root
            raise ValueError(f"{name!r} is not prepared in {root}; run `python -m resnet_jax.data.prepare {name} "
                             f"--data_dir {root}` (or pass download=True).") from None
        prepare_builder(builder, manual_dir=manual_dir)
        return self._data_source(builder, split)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict:
        record = self._ds[index]
        image = record[self.image_key]
        if self._mode:
            from PIL import Image

            try:
                image = _decode(image, self._mode)
            except (OSError, ValueError, Image.DecompressionBombError) as err:  # TFDS stores a file's bytes unread
                raise ValueError(f"cannot read the image of record {index} of {self.name!r} split {self.split!r} "
                                 f"({err}); TFDS stored the file's bytes as they were: replace the damaged source "
                                 f"file, delete the prepared dataset and prepare it again") from None
        return {"image": image, "label": int(record[self.label_key])}

    def __repr__(self) -> str:
        # No data_dir: moving the data must not invalidate a saved iterator state.
        return f"TfdsSource(name={self.name!r}, split={self.split!r}, len={len(self)})"
