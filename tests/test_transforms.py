"""``Weights.transforms()`` equals, per pixel, the preprocessing the publisher measured its accuracy with:
torchvision's ``weights.transforms()`` and timm's ``create_transform(**resolve_data_config(...))``, on
photographs of several shapes; and every tag's numbers are the publisher's own."""

import io

import numpy as np
import pytest
import timm.data
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_image

from conftest import run_python
from resnet_jax.data.transforms import EvalTransform
from resnet_jax.pretrained import WEIGHTS

TORCHVISION_TAGS = sorted({(m, w.tag) for m, tags in WEIGHTS.items() for w in tags.values() if w.naming != "timm"})
TIMM_TAGS = sorted({(m, w.tag) for m, tags in WEIGHTS.items() for w in tags.values() if w.naming == "timm"})


def photographs():
    """Real photographs (scikit-learn's samples) cut to shapes that exercise each rounding: landscape and
    portrait (the long side's truncation), odd sizes (the crop offset's half-to-even rounding), smaller than the
    crop (upscaling), and a greyscale one."""
    china, flower = load_sample_image("china.jpg"), load_sample_image("flower.jpg")
    return {"landscape_427x640": china, "portrait_640x427": np.ascontiguousarray(flower.transpose(1, 0, 2)),
            "odd_333x501": china[47:380, 100:601], "small_151x203": flower[100:251, 200:403],
            "grey_300x211": np.asarray(Image.fromarray(china[:300, :211]).convert("L"))}


PHOTOS = photographs()


def torch_hwc(tensor):
    return tensor.permute(1, 2, 0).numpy()


def torchvision_weights(model, tag):
    enum = torchvision.models.get_model_weights(model)
    return enum[tag]


@pytest.mark.parametrize("model,tag", TORCHVISION_TAGS, ids=[f"{m}.{t}" for m, t in TORCHVISION_TAGS])
def test_torchvision_tags_carry_torchvisions_own_preprocessing(model, tag):
    ours = WEIGHTS[model][tag].transforms()
    theirs = torchvision_weights(model, tag).transforms()
    assert ([ours.resize_size], [ours.crop_size], list(ours.mean), list(ours.std), ours.interpolation) == (
        theirs.resize_size, theirs.crop_size, theirs.mean, theirs.std, theirs.interpolation.value)


# One tag per distinct preprocessing (V1: resize 256, V2: 232) is enough for the pixels; the test above pins
# every tag's numbers to torchvision's.
@pytest.mark.parametrize("model,tag", [("resnet50", "IMAGENET1K_V1"), ("resnet50", "IMAGENET1K_V2")])
@pytest.mark.parametrize("photo", PHOTOS)
def test_equals_torchvision_per_pixel(model, tag, photo):
    image = PHOTOS[photo]
    pil = Image.fromarray(image).convert("RGB")
    expected = torch_hwc(torchvision_weights(model, tag).transforms()(pil))
    transform = WEIGHTS[model][tag].transforms()
    np.testing.assert_array_equal(transform(pil), expected)
    np.testing.assert_array_equal(transform(image), expected)  # a uint8 array is read as that PIL image


def timm_config(model, tag):
    cfg = timm.models.get_pretrained_cfg(f"{model}.{tag}").to_dict()
    return timm.data.resolve_data_config(pretrained_cfg=cfg, use_test_size=True), cfg


@pytest.mark.parametrize("model,tag", TIMM_TAGS, ids=[f"{m}.{t}" for m, t in TIMM_TAGS])
def test_timm_tags_equal_timms_create_transform(model, tag):
    config, pretrained_cfg = timm_config(model, tag)
    ours = WEIGHTS[model][tag].transforms()
    assert ours == EvalTransform.from_timm_config(pretrained_cfg)  # our table says what timm's config says
    reference = timm.data.create_transform(**config)
    for photo in ("landscape_427x640", "odd_333x501"):
        pil = Image.fromarray(PHOTOS[photo]).convert("RGB")
        np.testing.assert_array_equal(ours(pil), torch_hwc(reference(pil)), err_msg=photo)


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("photo", ["landscape_427x640", "portrait_640x427", "small_151x203"])
def test_every_timm_crop_mode_equals_timm(crop_mode, photo):
    config = {"input_size": (3, 160, 160), "crop_pct": 0.9, "interpolation": "bilinear", "crop_mode": crop_mode,
              "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    reference = timm.data.create_transform(**config)
    pil = Image.fromarray(PHOTOS[photo])
    np.testing.assert_array_equal(EvalTransform.from_timm_config(config)(pil), torch_hwc(reference(pil)))


def test_batch_crop_and_image_files(tmp_path):
    transform = WEIGHTS["resnet50"]["IMAGENET1K_V2"].transforms()
    photo = PHOTOS["odd_333x501"]
    Image.fromarray(photo).save(tmp_path / "photo.png")
    batch = transform.batch([photo, tmp_path / "photo.png", PHOTOS["grey_300x211"]])
    assert batch.shape == (3, 224, 224, 3) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], batch[1])
    crop = transform.crop(photo)
    assert crop.dtype == np.uint8 and crop.shape == (224, 224, 3)
    expected = torchvision.transforms.functional.normalize(torch.from_numpy(crop).permute(2, 0, 1) / 255.0,
                                                           transform.mean, transform.std)
    np.testing.assert_array_equal(batch[0], torch_hwc(expected))


@pytest.mark.parametrize("image,message", [
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((2, 8, 8, 3), np.uint8), r"\.batch"),
    (np.zeros((8, 8, 2), np.uint8), "C in 1/3/4"),
    (np.zeros((0, 5, 3), np.uint8), "holds no pixels"),  # these three were ZeroDivisionError, numpy's message and
    (Image.new("RGB", (0, 5)), "0x5, which holds no pixels"),  # advice to scale floats by 255
    (["photo.png"], r"got a list of 1; for several images use \.batch"),
])
def test_bad_images_are_refused_in_one_sentence(image, message):
    with pytest.raises(ValueError, match=message):
        WEIGHTS["resnet50"]["DEFAULT"].transforms()(image)
    with pytest.raises(ValueError, match="batch.. got no images"):
        WEIGHTS["resnet50"]["DEFAULT"].transforms().batch([])


def test_encoded_images_are_read_as_predict_reads_them():
    """Bytes, an open file and BytesIO, which predict takes, were refused with advice to scale floats by 255."""
    encoded = io.BytesIO()
    Image.fromarray(PHOTOS["odd_333x501"]).save(encoded, "PNG")
    transform = WEIGHTS["resnet50"]["DEFAULT"].transforms()
    want = transform(PHOTOS["odd_333x501"])
    for image in (encoded.getvalue(), io.BytesIO(encoded.getvalue())):
        np.testing.assert_array_equal(transform(image), want)


def test_bad_image_files_are_named(tmp_path):
    """Used to be: a truncated or non-image file given by path came out as Pillow's own "Truncated File Read" or
    UnidentifiedImageError, naming no file (in a batch of paths, no way to tell which one)."""
    encoded = io.BytesIO()
    Image.fromarray(PHOTOS["odd_333x501"]).save(encoded, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(encoded.getvalue()[:300])
    (tmp_path / "notes.jpg").write_text("not an image")
    transform = WEIGHTS["resnet50"]["DEFAULT"].transforms()
    for name in ("truncated.jpg", "notes.jpg"):
        with pytest.raises(ValueError, match=f"cannot read image .*{name}.*replace or remove it"):
            transform.batch([PHOTOS["odd_333x501"], tmp_path / name])
    with pytest.raises(FileNotFoundError, match="missing.jpg does not exist"):
        transform(str(tmp_path / "missing.jpg"))


@pytest.mark.parametrize("field,value", [("crop_mode", "zoom"), ("interpolation", "lanczos5"), ("crop_size", 0)])
def test_bad_settings_are_refused(field, value):
    settings = dict(resize_size=256, crop_size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match=field.split("_")[0]):
        EvalTransform(**{**settings, field: value})


def test_torch_is_the_reference_not_a_dependency():
    """The module itself runs without torch: preprocessing a photo must not pull it in."""
    run_python("""
        import sys
        import numpy as np
        from resnet_jax.pretrained import weights_info
        weights_info("resnet50").transforms()(np.zeros((300, 400, 3), np.uint8))
        assert "torch" not in sys.modules, "preprocessing imported torch"
    """)
