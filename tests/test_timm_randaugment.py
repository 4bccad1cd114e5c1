"""timm's RandAugment (``rand-m7-mstd0.5-inc1``, the ResNet Strikes Back form) against timm itself: each operation
at several levels and both signs equal per pixel to timm's operation given the arguments timm's level functions
compute, on a photograph; the config string read as timm reads it; the draws' frequencies as timm's."""

import random

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data.auto_augment import LEVEL_TO_ARG, NAME_TO_OP, rand_augment_transform

from resnet_jax.data.autoaugment import policy
from resnet_jax.data.timm_randaugment import INCREASING, TimmRandAugment, apply_timm_op

PHOTO = np.ascontiguousarray(load_sample_image("china.jpg")[100:180:2, 150:270:2])  # 40x60, non-square
FILL = (124, 116, 104)  # timm's img_mean for ImageNet's mean
HPARAMS = {"translate_const": 250, "img_mean": FILL}


SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing", "ContrastIncreasing",
          "BrightnessIncreasing", "SharpnessIncreasing"}


def timm_arguments(name, level, sign):
    """timm's own level function, with its random negation made to come out as ``sign`` by seeding ``random``."""
    fn = LEVEL_TO_ARG[name]
    if fn is None:
        return ()
    centre = 1.0 if name.endswith("Increasing") and name in SIGNED else 0.0  # enhancement factors centre on 1
    for seed in range(50):
        random.seed(seed)
        args = fn(level, HPARAMS)
        if name not in SIGNED or level == 0 or (args[0] - centre) * sign > 0:
            return args
    raise AssertionError(f"no seed gave sign {sign} for {name}")


@pytest.mark.parametrize("name", INCREASING)
def test_each_operation_equals_timms(name):
    pil = Image.fromarray(PHOTO)
    for level in (0.0, 3.3, 7.0, 10.0):
        for sign in (1, -1):
            for interpolation, resample in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
                args = timm_arguments(name, level, sign)
                ours = apply_timm_op(PHOTO, name, level, sign, interpolation, FILL)
                if name == "PosterizeIncreasing" and args == (0,):  # this Pillow refuses 0 bits, timm passes it on
                    np.testing.assert_array_equal(ours, 0)  # what Pillow up to 10 made of it: nothing kept
                    continue
                expected = np.asarray(NAME_TO_OP[name](pil, *args, fillcolor=FILL, resample=resample))
                np.testing.assert_array_equal(ours, expected, err_msg=f"{name} level {level} sign {sign}")


def test_the_rsb_string_is_read_as_timm_reads_it():
    theirs = rand_augment_transform("rand-m7-mstd0.5-inc1", dict(HPARAMS))
    ours = policy("rand-m7-mstd0.5-inc1")
    assert ours == TimmRandAugment(magnitude=7, num_layers=2, prob=0.5, magnitude_std=0.5, fill=FILL)
    assert tuple(op.name for op in theirs.ops) == ours.ops and theirs.num_layers == ours.num_layers
    assert {(op.prob, op.magnitude, op.magnitude_std) for op in theirs.ops} == {(0.5, 7, 0.5)}
    with pytest.raises(ValueError, match="only timm's increasing operation set"):
        policy("rand-m9-mstd0.5")
    with pytest.raises(ValueError, match="not timm's RandAugment form"):
        policy("rand-m9-x3-inc1")


def test_how_often_images_change_matches_timms_draws():
    """Two operations each run with probability 1/2, so a quarter of images come out untouched (a few more:
    some operations at some levels change nothing); timm's transform and ours agree on that share."""
    pil, n = Image.fromarray(PHOTO[:16, :16]), 400
    theirs_transform = rand_augment_transform("rand-m7-mstd0.5-inc1", dict(HPARAMS))
    random.seed(0)
    np.random.seed(0)
    theirs = np.mean([np.array_equal(np.asarray(theirs_transform(pil)), PHOTO[:16, :16]) for _ in range(n)])
    ours_transform, rng = policy("rand-m7-mstd0.5-inc1"), np.random.default_rng(0)
    ours = np.mean([np.array_equal(ours_transform(PHOTO[:16, :16], rng), PHOTO[:16, :16]) for _ in range(n)])
    assert 0.2 < theirs < 0.4 and abs(ours - theirs) < 0.08


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "random"])
def test_the_training_crop_s_interpolation_reaches_the_operations_as_timm_passes_it(interpolation):
    """timm's create_transform gives RandAugment the training interpolation unless it is "random"; ours drew
    bilinear or bicubic per operation whatever the run's ``train_interpolation``."""
    from resnet_jax.data.pipeline import _Crop, _TrainCrop

    hparams = dict(HPARAMS)
    if interpolation != "random":  # create_transform's own condition
        hparams["interpolation"] = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    theirs = {op.kwargs["resample"] for op in rand_augment_transform("rand-m9-mstd0.5-inc1", hparams).ops}
    crop = _Crop("imagenet", 32, 0.875, interpolation)
    ours = _TrainCrop(crop, "rand-m9-mstd0.5-inc1", mean=(0.485, 0.456, 0.406)).policy
    assert ours.interpolation == interpolation
    resampled = {"bilinear": {Image.BILINEAR}, "bicubic": {Image.BICUBIC}, "random": {(Image.BILINEAR, Image.BICUBIC)}}
    assert {r if not isinstance(r, list) else tuple(r) for r in theirs} == resampled[interpolation]
    # and it is the filter the operation runs with: a rotation at full level, applied every time
    rotate = TimmRandAugment(magnitude=10, num_layers=1, prob=1.0, ops=("Rotate",), fill=FILL,
                             interpolation=interpolation)
    outputs = {(f, s): apply_timm_op(PHOTO, "Rotate", 10, s, f, FILL) for f in ("bilinear", "bicubic") for s in (1, -1)}
    rng = np.random.default_rng(0)
    results = [rotate(PHOTO, rng) for _ in range(12)]
    used = {f for out in results for (f, _), ref in outputs.items() if np.array_equal(out, ref)}
    assert used == ({"bilinear", "bicubic"} if interpolation == "random" else {interpolation})


@pytest.mark.parametrize("spec", ["rand-m7-mstd0.5-inc1", "rand-m9-mstd101-inc1"])
def test_operations_magnitudes_and_signs_are_drawn_as_timm_draws_them(spec, monkeypatch):
    """The draws themselves against timm's transform, instrumented (each operation's function records its
    arguments and returns the image): which operations run, and a rotation's signed angle, whose magnitude timm
    draws from N(m, mstd) clipped to [0, 10] (uniform in [0, m] above mstd 100) and whose sign is a coin. Fails
    for a fixed level, a lost sign or another operation choice."""
    from scipy.stats import chi2_contingency

    from conftest import assert_same_distribution
    from resnet_jax.data import timm_randaugment

    images, small = 6000, PHOTO[:8, :8]
    theirs_transform, theirs = rand_augment_transform(spec, dict(HPARAMS)), []
    for op in theirs_transform.ops:
        op.aug_fn = lambda img, *args, _name=op.name, **kwargs: theirs.append((_name, args)) or img
    random.seed(0)
    np.random.seed(0)
    pil = Image.fromarray(small)
    for _ in range(images):
        theirs_transform(pil)

    ours = []
    monkeypatch.setattr(timm_randaugment, "apply_timm_op", lambda image, name, level, sign, *rest: ours.append(
        (name, sign * (level / 10) * 30 if name == "Rotate" else None)) or image)  # timm's degrees per level
    ours_transform, rng = policy(spec), np.random.default_rng(0)
    for _ in range(images):
        ours_transform(small, rng)

    names = sorted({name for name, _ in theirs})
    assert names == sorted(ours_transform.ops)
    counts = np.array([[sum(n == name for n, _ in side) for name in names] for side in (ours, theirs)])
    assert chi2_contingency(counts).pvalue > 1e-3, counts  # the same operations, as often
    angles = [args[0] for name, args in theirs if name == "Rotate"], [a for name, a in ours if name == "Rotate"]
    assert_same_distribution(angles[1], angles[0], "signed rotation angle")
