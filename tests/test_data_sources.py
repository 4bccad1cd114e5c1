"""Bundled digits and synthetic sources: shapes, fixed split, determinism, and one-sentence errors."""

import numpy as np
import pytest

from resnet_jax import data


def test_digits_split_is_fixed_disjoint_and_complete():
    train, val = data.get_source("digits", "train"), data.get_source("digits", "validation")
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert train.num_classes == 10 and train.class_names == [str(d) for d in range(10)]
    # The split ignores the run's seed: validation can never leak into training.
    other = data.get_source("digits", "validation", seed=123)
    assert all(np.array_equal(val[i]["image"], other[i]["image"]) for i in range(0, len(val), 37))
    train_set = {train[i]["image"].tobytes() for i in range(len(train))}
    assert not any(val[i]["image"].tobytes() in train_set for i in range(len(val)))
    assert len(data.get_source("digits", "test")) == len(val)


@pytest.mark.parametrize("size", [8, 32, 64])
def test_digits_upsampled_to_requested_size(size):
    src = data.get_source("digits", "train", image_size=size)
    record = src[5]
    assert src.image_shape == (size, size, 1)
    assert record["image"].shape == (size, size, 1) and record["image"].dtype == np.uint8
    assert isinstance(record["label"], int) and 0 <= record["label"] < 10
    assert record["image"].max() > 128  # real strokes, scaled to the uint8 range


def test_synthetic_is_seeded_and_shaped():
    a = data.get_source("synthetic", "train", seed=3, num_examples=20, num_classes=7, image_shape=(12, 10, 3))
    b = data.get_source("synthetic", "train", seed=3, num_examples=20, num_classes=7, image_shape=(12, 10, 3))
    c = data.get_source("synthetic", "train", seed=4, num_examples=20, num_classes=7, image_shape=(12, 10, 3))
    assert len(a) == 20 and a.num_classes == 7 and a.image_shape == (12, 10, 3)
    assert a[4]["image"].shape == (12, 10, 3) and a[4]["image"].dtype == np.uint8
    assert np.array_equal(a[4]["image"], b[4]["image"]) and a[4]["label"] == b[4]["label"]
    assert not np.array_equal(a[4]["image"], c[4]["image"])
    assert data.get_source("synthetic", "train", image_size=48).image_shape == (48, 48, 3)


@pytest.mark.parametrize("call,match", [
    (lambda: data.get_source("digits", "train[:50%]"), "splits 'train' and 'validation'"),
    (lambda: data.get_source("digits", "train", num_examples=3), "does not take"),
    (lambda: data.get_source("synthetic", "train", num_examples=0), "num_examples >= 1"),
    (lambda: data.get_source("", "train"), "non-empty string"),
])
def test_bad_arguments_fail_with_one_sentence(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_stats_cover_named_datasets():
    assert data.DATASET_STATS["imagenet2012"] == (data.IMAGENET_MEAN, data.IMAGENET_STD)
    for name in ("cifar10", "cifar100", "digits", "mnist", "synthetic"):
        mean, std = data.DATASET_STATS[name]
        assert len(mean) == len(std) and all(0 < s < 1 for s in std)


@pytest.mark.parametrize("spelling,base", [("tfds:cifar10", "cifar10"), ("cifar10:3.0.2", "cifar10"),
                                           ("tfds:cifar100:3.*.*", "cifar100"), ("mnist:3.0.1", "mnist"),
                                           ("imagenette/320px:1.0.0", "imagenette")])
def test_a_pinned_version_or_config_normalises_with_its_dataset_s_statistics(spelling, base):
    """A training run with ``dataset="cifar10:3.0.2"`` normalised with ImageNet's mean/std (the lookup used the
    whole name) while the loaders' own default took CIFAR-10's: both take the base name's statistics."""
    from resnet_jax.training import base_config
    from resnet_jax.training.config import normalization_stats

    config = base_config()
    config.dataset = spelling
    assert normalization_stats(config) == data.DATASET_STATS[base]
