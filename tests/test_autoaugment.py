"""Each AutoAugment-style operation equals torchvision's ``_apply_op`` per pixel on photographs, for every
magnitude bin of TrivialAugmentWide's space; both policies draw from torchvision's own operation spaces."""

import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image
from sklearn.datasets import load_sample_image
from torchvision.transforms.autoaugment import _apply_op

from resnet_jax.data.autoaugment import (OPS, _draw, apply_op, policy, rand_augment, rand_augment_space,
                                         trivial_augment_wide, wide_space)

# Odd, non-square photographs: the centre of rotation and shear falls between pixels.
PHOTO = load_sample_image("china.jpg")[101:222, 200:361]
GREY = np.asarray(Image.fromarray(load_sample_image("flower.jpg")[50:147, 60:189]).convert("L"))[:, :, None]
MODES = {"nearest": T.InterpolationMode.NEAREST, "bilinear": T.InterpolationMode.BILINEAR,
         "bicubic": T.InterpolationMode.BICUBIC}


def torchvision_op(image, name, magnitude, interpolation="nearest", fill=None):
    pil = Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image)
    out = np.asarray(_apply_op(pil, name, magnitude, interpolation=MODES[interpolation], fill=fill))
    return out[:, :, None] if out.ndim == 2 else out


def magnitudes(name):
    """Every magnitude TrivialAugmentWide can draw for the operation (a few bins), both signs where signed,
    and Invert's (which only AutoAugment uses)."""
    bins, signed = wide_space().get(name, (np.zeros(1), False))
    chosen = np.unique(bins[[0, 7, 15, len(bins) - 1]] if len(bins) > 1 else bins)
    return [float(m) for m in chosen] + ([-float(m) for m in chosen if m] if signed else [])


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_operation_equals_torchvision(name):
    for magnitude in magnitudes(name):
        for image in (PHOTO, GREY):
            np.testing.assert_array_equal(apply_op(image, name, magnitude), torchvision_op(image, name, magnitude),
                                          err_msg=f"{name} {magnitude} {image.shape}")


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("name", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"])
def test_geometric_operations_with_an_interpolation_and_a_fill(name, interpolation):
    magnitude = {"ShearX": 0.41, "ShearY": -0.33, "TranslateX": -13.0, "TranslateY": 21.0, "Rotate": 37.5}[name]
    for fill in ([128, 64, 32], 200):
        ours = apply_op(PHOTO, name, magnitude, interpolation=interpolation, fill=fill)
        theirs = torchvision_op(PHOTO, name, magnitude, interpolation, fill if isinstance(fill, list) else [fill])
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} fill={fill}")


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "random"])
@pytest.mark.parametrize("name", ["ta_wide", "ra"])
def test_the_policies_take_the_training_crops_interpolation(name, interpolation):
    """Used to be: both torchvision policies always bilinear, though torchvision's presets.py builds them with
    the run's --interpolation (a 30-degree bicubic rotation differs from the bilinear one by up to 68 grey levels).
    Each image's operations are redrawn from a copy of the generator and applied by torchvision's ``_apply_op``;
    "random" picks bilinear or bicubic per image, as the crop does."""
    augment = policy(name, interpolation=interpolation)
    space = wide_space() if name == "ta_wide" else rand_augment_space(31, *PHOTO.shape[:2])
    used = set()
    for seed in range(12):
        rng, replay = np.random.default_rng(seed), np.random.default_rng(seed)
        mode = ("bilinear", "bicubic")[replay.integers(2)] if interpolation == "random" else interpolation
        used.add(mode)
        expected = PHOTO
        for _ in range(1 if name == "ta_wide" else 2):
            expected = torchvision_op(expected, *_draw(space, replay, None if name == "ta_wide" else 9), mode)
        np.testing.assert_array_equal(augment(PHOTO, rng), expected, err_msg=f"seed {seed}")
    assert used == ({"bilinear", "bicubic"} if interpolation == "random" else {interpolation})


def assert_same_space(ours, theirs):
    """Bin for bin to the bit: torchvision truncates translations and posterize bits with ``int()``, so a bin
    one float32 step off moves whole pixels (a tolerance hid a 16-pixel shift where torchvision's is 15)."""
    assert list(ours) == list(theirs)
    for name, (bins, signed) in theirs.items():
        np.testing.assert_array_equal(ours[name][0], np.atleast_1d(bins.numpy()), err_msg=name)
        assert ours[name][1] == signed, name


@pytest.mark.parametrize("num_bins", [2, 5, 10, 31, 33, 64])
def test_spaces_are_torchvisions(num_bins):
    assert_same_space(wide_space(num_bins), T.TrivialAugmentWide()._augmentation_space(num_bins))
    for size in [(121, 161), (224, 224), (32, 32), (299, 187)]:
        assert_same_space(rand_augment_space(num_bins, *size), T.RandAugment()._augmentation_space(num_bins, size))


def test_the_sixteenth_translation_bin_shifts_as_torchvisions():
    """Used to be: bin 15 of TrivialAugmentWide's translations was 16.0 (numpy's linspace), torchvision's
    15.999999, which its ``int()`` makes a 15-pixel shift: 1000 of 1600 pixels differed."""
    theirs = float(T.TrivialAugmentWide()._augmentation_space(31)["TranslateX"][0][15])
    ours = float(wide_space()["TranslateX"][0][15])
    np.testing.assert_array_equal(apply_op(PHOTO, "TranslateX", ours), torchvision_op(PHOTO, "TranslateX", theirs))


def test_trivial_augment_draws_as_torchvision_does():
    """torchvision's TrivialAugmentWide: an operation uniformly, a bin uniformly, the sign by a coin. Over 7,000
    draws every operation's share is within 4 standard deviations of 1/14, every bin of a signed operation
    appears with both signs, and nothing outside the space is drawn."""
    space, rng, draws = wide_space(), np.random.default_rng(0), 7000
    drawn = [_draw(space, rng, None) for _ in range(draws)]
    counts = {name: sum(n == name for n, _ in drawn) for name in space}
    p = 1 / len(space)
    assert all(abs(c - draws * p) < 4 * np.sqrt(draws * p * (1 - p)) for c in counts.values()), counts
    for name, magnitude in drawn:
        bins, signed = space[name]
        assert np.isclose(bins, abs(magnitude) if signed else magnitude).any(), (name, magnitude)
    rotations = {m for n, m in drawn if n == "Rotate"}
    assert {np.sign(m) for m in rotations} >= {-1.0, 1.0} and len({abs(m) for m in rotations}) > 25


def test_rand_augment_applies_num_ops_at_the_fixed_bin():
    space = rand_augment_space(31, *PHOTO.shape[:2])
    rng = np.random.default_rng(1)
    for name, magnitude in (_draw(space, rng, 9) for _ in range(200)):
        bins, signed = space[name]
        assert abs(magnitude) == (bins[9] if len(bins) > 1 else 0.0), name
    out = rand_augment(PHOTO, np.random.default_rng(2), num_ops=2, magnitude=9)
    assert out.shape == PHOTO.shape and out.dtype == np.uint8
    assert trivial_augment_wide(GREY, np.random.default_rng(3)).shape == GREY.shape


@pytest.mark.parametrize("args,message", [
    ((PHOTO, "Zoom", 1.0), "unknown augmentation operation 'Zoom'"),
    ((PHOTO.astype(np.float32), "Rotate", 1.0), "uint8"),
    ((PHOTO[None], "Rotate", 1.0), r"\(H, W, C\)"),
])
def test_bad_arguments_are_one_sentence(args, message):
    with pytest.raises(ValueError, match=message):
        apply_op(*args)


def test_a_rand_augment_magnitude_outside_its_bins_is_refused():
    """31 ran at bin 30 (the last); torchvision's RandAugment(magnitude=31) fails on it too."""
    with pytest.raises(ValueError, match="magnitude is one of the 31 bins, 0 to 30; got 31"):
        rand_augment(PHOTO, np.random.default_rng(0), magnitude=31)
