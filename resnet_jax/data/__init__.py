"""Input pipeline: random-access sources (TFDS, class folders, bundled digits, synthetic) -> Grain -> sharded
float32 batches.

    src = data.get_source("cifar10", "train[:90%]")
    loader = data.train_loader(src, batch_size=256, image_size=32, augment="cifar", seed=0)
    batches = iter(loader)            # batches.get_state() / set_state() for exact resume
"""

from resnet_jax.data.augment import (normalize, random_crop_flip, random_resized_crop_flip, resize_center_crop,
                                     to_channels)
from resnet_jax.data.pipeline import (AUGMENTS, EvalLoader, check_compatible, check_every_class,
                                      check_same_classes, default_crop_fraction, eval_loader, steps_per_epoch,
                                      train_loader)
from resnet_jax.data.source import Source
from resnet_jax.data.sources import get_source
from resnet_jax.data.stats import DATASET_STATS, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "AUGMENTS", "DATASET_STATS", "EvalLoader", "IMAGENET_MEAN", "IMAGENET_STD", "Source", "check_compatible",
    "check_every_class", "check_same_classes", "default_crop_fraction", "eval_loader", "get_source", "normalize",
    "random_crop_flip", "random_resized_crop_flip", "resize_center_crop", "steps_per_epoch", "to_channels",
    "train_loader",
]
