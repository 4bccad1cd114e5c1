"""`get_source`: one name -> one random-access source, so configs name data the same way for every backend."""

from __future__ import annotations

from resnet_jax.data.digits import DigitsSource
from resnet_jax.data.folder import PREFIX as FOLDER_PREFIX
from resnet_jax.data.folder import FolderSource
from resnet_jax.data.source import Source
from resnet_jax.data.synthetic import SyntheticSource


def get_source(name: str, split: str, *, data_dir=None, image_size: int | None = None, seed: int = 0,
               **kwargs) -> Source:
    """The `split` of dataset `name`: "digits", "synthetic", "folder:PATH" (class folders, as torchvision's
    ImageFolder), or a TFDS dataset ("cifar10" or "tfds:cifar10").

    digits: splits "train" / "validation" ("test" = validation), upsampled to `image_size` (default 32).
    folder:PATH: the split is a subfolder of PATH ("train", "val"), optionally sliced per class ("train[:90%]").
    synthetic: kwargs num_examples, num_classes, image_shape (default (image_size or 32, same, 3)).
    TFDS: any split string TFDS accepts ("train[:90%]"), `data_dir`, and kwargs `download` (default True:
    prepare the dataset if it is not on disk; needs TensorFlow) and `manual_dir` (e.g. ImageNet's tar files).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Dataset name must be a non-empty string such as 'digits' or 'cifar10', not {name!r}.")
    if name == "digits":
        _no_extra_kwargs(name, kwargs)
        return DigitsSource(split, image_size=image_size)
    if name == "synthetic":
        size = 32 if image_size is None else int(image_size)
        if size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, not {image_size!r}.")
        kwargs.setdefault("image_shape", (size, size, 3))
        allowed = {"num_examples", "num_classes", "image_shape"}
        _no_extra_kwargs(name, {k: v for k, v in kwargs.items() if k not in allowed})
        return SyntheticSource(split, seed=seed, **kwargs)
    if name.startswith(FOLDER_PREFIX):
        _no_extra_kwargs(name, kwargs)
        return FolderSource(name.removeprefix(FOLDER_PREFIX), split)
    from resnet_jax.data.tfds_source import TfdsSource  # imports tensorflow_datasets only when asked for

    return TfdsSource(name.removeprefix("tfds:"), split, data_dir=data_dir, **kwargs)


def _no_extra_kwargs(name: str, kwargs: dict) -> None:
    if kwargs:
        raise ValueError(f"The {name} dataset does not take {sorted(kwargs)}; remove them from the call.")
