"""The evaluation pipeline with published weights' preprocessing (``eval_loader(transform=...)``, the config's
``eval_resize``/``eval_crop``): its batches equal, per pixel, torchvision's ``ImageClassification`` (the
transform behind every ``weights.transforms()``) on photographs of different shapes."""

import ml_collections
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image
from torchvision.transforms._presets import ImageClassification

from resnet_jax import data
from resnet_jax.pretrained import weights_info
from resnet_jax.training.config import base_config, eval_transform, validate


class PhotoSource(data.Source):
    """scikit-learn's photographs cut to three shapes: landscape, portrait with odd sizes, smaller than the crop."""

    name, split, num_classes = "photos", "validation", 3

    def __init__(self):
        china, flower = load_sample_image("china.jpg"), load_sample_image("flower.jpg")
        self.images = [china, np.ascontiguousarray(flower[40:401, 100:333]), china[100:251, 200:403]]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": i}


def config(**keys):
    return validate(ml_collections.ConfigDict({**base_config().to_dict(), **keys}))


def test_batches_equal_torchvisions_image_classification_per_pixel():
    src = PhotoSource()
    cfg = config(image_size=176, eval_resize=232, eval_crop=224, normalize="imagenet")  # 176: training's own size
    transform = eval_transform(cfg)
    loader = data.eval_loader(src, batch_size=2, image_size=cfg.image_size, mean=transform.mean, std=transform.std,
                              channels=3, transform=transform)
    batches = list(loader)
    images = np.concatenate([b["image"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert images.shape == (4, 224, 224, 3) and mask.tolist() == [True, True, True, False]
    reference = ImageClassification(crop_size=224, resize_size=232)
    for i, photo in enumerate(src.images):
        expected = reference(Image.fromarray(photo)).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(images[i], expected)


def test_a_transform_normalises_with_its_own_mean_and_std():
    """Given only the transform (as ``weights_info(...).transforms()`` gives it), the loader normalised with the
    dataset's statistics (synthetic data's own), up to 0.9 off the transform's batch."""
    src = data.get_source("synthetic", "validation", image_size=40, num_examples=3)
    transform = weights_info("resnet18.IMAGENET1K_V1").transforms()
    images = np.concatenate([b["image"] for b in data.eval_loader(src, batch_size=3, image_size=224,
                                                                 transform=transform)])
    np.testing.assert_allclose(images, transform.batch([src[i]["image"] for i in range(3)]), atol=1e-6)


@pytest.mark.parametrize("variant", ["step", "cosine"])
def test_the_imagenet_recipe_evaluates_as_torchvision_s_reference(variant):
    """The seed recipe's evaluation is torchvision's reference's (resize 256, crop 224, what its ResNet-50 V1
    weights publish): it was the default box resize, which rounds otherwise. At another image size it keeps the
    ratio."""
    from train.configs import imagenet_resnet50

    recipe = validate(imagenet_resnet50.get_config(variant))
    assert eval_transform(recipe) == weights_info("resnet50.IMAGENET1K_V1").transforms()
    recipe.image_size = 112
    assert (validate(recipe).eval_resize, recipe.eval_crop) == (128, 112)


def test_published_weights_in_init_from_set_evaluations_preprocessing_at_the_runs_resolution():
    """At their own crop size exactly the weights' preprocessing; at another ``image_size`` (a fine-tune at 64 px)
    their resize : crop ratio, interpolation and crop mode around the run's crop (evaluating at their 224 a model
    trained at 64 scored chance); every key set by hand kept."""
    v2 = config(init_from="resnet50.IMAGENET1K_V2", image_size=224)
    assert eval_transform(v2) == weights_info("resnet50.IMAGENET1K_V2").transforms()
    timm = config(init_from="resnet50.a1_in1k", image_size=288)
    assert eval_transform(timm) == weights_info("resnet50.a1_in1k").transforms()  # bicubic, 288 evaluation
    small = config(init_from="resnet18.IMAGENET1K_V1", image_size=64)  # 256 : 224 around 64 -> 73
    assert (small.eval_resize, small.eval_crop, small.eval_interpolation) == (73, 64, "bilinear")
    src = PhotoSource()
    transform = eval_transform(small)
    reference = ImageClassification(crop_size=64, resize_size=73)
    for photo in src.images:
        np.testing.assert_array_equal(transform(photo), reference(Image.fromarray(photo)).permute(1, 2, 0).numpy())
    crop = config(init_from="resnet50.IMAGENET1K_V2", eval_crop=256, eval_interpolation="bicubic")
    assert (crop.eval_resize, crop.eval_crop, crop.eval_interpolation) == (265, 256, "bicubic")
    own = config(init_from="resnet50.IMAGENET1K_V2", eval_resize=160, eval_crop=128, eval_crop_mode="squash")
    assert (own.eval_resize, own.eval_crop, own.eval_interpolation, own.eval_crop_mode) == (
        160, 128, "bilinear", "squash")
    assert eval_transform(config()) is None  # no published weights: the run's own resize, as before


@pytest.mark.parametrize("keys,message", [({"eval_interpolation": "bilinar"}, "did you mean 'bilinear'"),
                                          ({"eval_crop_mode": "centre"}, "did you mean 'center'"),
                                          ({"eval_resize": -1}, "must be positive"),
                                          ({"mean": (0.5, 0.5), "std": (0.5, 0.5)},
                                           "one value per channel \\(3\\) or one for all, got 2"),
                                          ({"mean": (0.5,), "std": (0.5, 0.5)},
                                           "the same number of values, got 1 and 2")])
def test_bad_evaluation_settings_are_one_sentence(keys, message):
    with pytest.raises(ValueError, match=message):
        config(**keys)
