"""``Classifier.from_pretrained``: published weights plus the preprocessing they were measured with.

The reference is torchvision itself: its ResNet-18 with its own ``weights.transforms()``, fed the same weights
(a local file, as ``file=`` takes it: torchvision's ``resnet18()`` with a fixed seed and random BatchNorm
statistics, so no download), must give the same top-5 ImageNet names with probabilities within 1e-3 on
scikit-learn's sample photographs. The fine-tuned, exported and reloaded forms keep that preprocessing."""

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_image

from conftest import random_batch_stats
from resnet_jax.training.classifier import Classifier

TAG = "resnet18.IMAGENET1K_V1"


def photos():
    """Two photographs of different shapes (landscape, and a portrait cut with odd sizes)."""
    china, flower = load_sample_image("china.jpg"), load_sample_image("flower.jpg")
    return [china, np.ascontiguousarray(flower[40:401, 100:333])]


@pytest.fixture(scope="module")
def torch_resnet18(tmp_path_factory):
    """``(model, file)``: torchvision's ResNet-18 with seeded random weights and BatchNorm statistics, and the
    file it was saved to with ``torch.save`` (its top-5 probabilities on the photos are 0.5 to 0.02, well apart)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.load_state_dict(random_batch_stats(model.state_dict(), 0))
    path = tmp_path_factory.mktemp("weights") / "resnet18-local.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), path


@pytest.fixture(scope="module")
def clf(torch_resnet18):
    return Classifier.from_pretrained(TAG, file=torch_resnet18[1])


def torchvision_top5(model, image):
    transform = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    names = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    with torch.no_grad():
        probs = torch.softmax(model(transform(Image.fromarray(image))[None]), -1)[0].numpy()
    order = np.argsort(-probs)[:5]
    return [names[i] for i in order], probs[order]


def test_predict_equals_torchvision_with_its_own_transforms(clf, torch_resnet18):
    ours = clf.predict(photos())
    for image, top in zip(photos(), ours):
        names, probs = torchvision_top5(torch_resnet18[0], image)
        assert np.min(-np.diff(probs)) > 2e-3, "the reference's top-5 must be well separated to compare"
        assert [name for name, _ in top] == names
        np.testing.assert_allclose([p for _, p in top], probs, atol=1e-3)


def test_it_carries_the_tags_preprocessing_and_imagenets_names(clf):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert clf.class_names == weights.meta["categories"]
    t = weights.transforms()
    assert (clf.config.eval_resize, clf.config.eval_crop, clf.config.eval_interpolation) == (
        t.resize_size[0], t.crop_size[0], t.interpolation.value)
    assert (list(clf.config.mean), list(clf.config.std)) == (t.mean, t.std)
    np.testing.assert_array_equal(clf.preprocess([photos()[1]])[0],
                                  t(Image.fromarray(photos()[1])).permute(1, 2, 0).numpy())


def test_a_photo_file_is_read_and_predicted(clf, tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(photos()[0]).save(path, quality=95)
    on_file = clf.predict(str(path))[0]
    on_pixels = clf.predict(np.asarray(Image.open(path)))[0]
    assert on_file == on_pixels and len(on_file) == 5


def test_export_carries_the_preprocessing_and_the_artifact_predicts_the_same(clf, tmp_path):
    from resnet_jax.export import load_exported

    path = clf.export(tmp_path / "resnet18.onnx")
    manifest = json.loads(path.with_name(path.name + ".json").read_text())
    prep = manifest["preprocessing"]
    assert manifest["format_version"] == 2
    assert (prep["resize_size"], prep["image_size"], prep["interpolation"], prep["crop_mode"]) == (
        256, 224, "bilinear", "center")
    exported = load_exported(path)
    resize_crop = torchvision.transforms.Compose([torchvision.transforms.Resize(256),
                                                  torchvision.transforms.CenterCrop(224)])
    np.testing.assert_array_equal(exported.prepare(photos()),
                                  [np.asarray(resize_crop(Image.fromarray(p))) for p in photos()])
    got, want = exported.predict(photos()), clf.predict(photos())
    assert [[n for n, _ in row] for row in got] == [[n for n, _ in row] for row in want]
    np.testing.assert_allclose([[p for _, p in row] for row in got], [[p for _, p in row] for row in want],
                               atol=1e-4)
