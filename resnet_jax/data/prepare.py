"""Prepare a TFDS dataset as ArrayRecord files, failing within seconds when that cannot work.

    python -m resnet_jax.data.prepare cifar10 [--data_dir DIR]
    python -m resnet_jax.data.prepare imagenet2012 --data_dir DIR --manual_dir DIR_WITH_THE_TAR_FILES

ImageNet prepares the splits whose tar files are there: ``ILSVRC2012_img_val.tar`` alone is enough to evaluate
published weights. The command prints the prepared directory and its splits. Preparing needs TensorFlow (TFDS
serialises examples with it); reading the result does not. The checks that make it fail fast live in
``tfds_builder.py``.
"""

from __future__ import annotations

import argparse

from resnet_jax.data.tfds_builder import PROBE_ENV, open_builder, prepare_builder

__all__ = ["PROBE_ENV", "prepare", "main"]


def prepare(name: str, *, data_dir=None, manual_dir=None) -> str:
    """Prepare TFDS dataset `name` in `data_dir` (TFDS's default if None); returns the prepared directory."""
    return _prepared_builder(name, data_dir, manual_dir).data_dir


def _prepared_builder(name: str, data_dir, manual_dir):
    builder = open_builder(name, data_dir)
    if not builder.is_prepared():
        prepare_builder(builder, manual_dir=manual_dir)
    return builder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Prepare a TFDS dataset as ArrayRecord for resnet_jax.data.")
    parser.add_argument("name", help='TFDS name, e.g. "cifar10", "imagenette/320px-v2", "imagenet2012"')
    parser.add_argument("--data_dir", default=None, help="TFDS data directory (default: ~/tensorflow_datasets)")
    parser.add_argument("--manual_dir", default=None, help="where manually downloaded files are (ImageNet)")
    args = parser.parse_args(argv)
    try:
        builder = _prepared_builder(args.name, args.data_dir, args.manual_dir)
    except ValueError as err:
        parser.exit(1, f"error: {err}\n")
    print(builder.data_dir)
    print("splits: " + ", ".join(f"{name} ({split.num_examples} examples)" for name, split in
                                 sorted(builder.info.splits.items())))


if __name__ == "__main__":
    main()
