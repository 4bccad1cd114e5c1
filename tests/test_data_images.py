"""prepare_batch: every input form predict accepts (one image, a batch, a greyscale batch, a list of arrays or
paths) becomes the same uint8 batch, and every other shape gets one sentence saying what to pass."""

import re

import numpy as np
import pytest
from PIL import Image

from resnet_jax import data
from resnet_jax.data.images import prepare_batch, split_images, top_classes


def digits(n=3):
    src = data.get_source("digits", "validation", image_size=8)
    return np.stack([src[i]["image"][:, :, 0] for i in range(n)])  # (n, 8, 8) uint8, greyscale


def prepare(images, channels=1, size=8):
    return prepare_batch(images, size=size, crop_fraction=1.0, channels=channels)


def test_greyscale_forms_give_the_same_batch(tmp_path):
    images = digits()
    want = images[:, :, :, None]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    for form in (images, want, list(images), tuple(want), [str(p) for p in paths], paths):
        np.testing.assert_array_equal(prepare(form), want)
    for one in (images[0], want[0], str(paths[0]), paths[0]):  # a single image, however given
        np.testing.assert_array_equal(prepare(one), want[:1])


def test_channels_are_converted_and_alpha_dropped():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((8, 8, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(prepare(rgba, channels=3), rgb[None])
    np.testing.assert_array_equal(prepare(rgba, channels=1), prepare(rgb, channels=1))
    assert prepare(rgb, channels=1).shape == (1, 8, 8, 1)
    grey = digits(2)
    np.testing.assert_array_equal(prepare(grey[:, :, :, None], channels=3), np.repeat(grey[:, :, :, None], 3, -1))
    assert prepare(np.stack([rgb, rgb]), channels=3, size=4).shape == (2, 4, 4, 3)  # resized as evaluation does


def test_a_greyscale_batch_is_only_read_as_one_for_one_channel_models():
    images = digits(2)  # (2, 8, 8): the shape that once crashed inside PIL
    assert prepare(images, channels=1).shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match=r"takes 3 channels, so add a channel axis with images\[\.\.\., None\]"):
        prepare(images, channels=3)


BAD = [
    (np.zeros((2, 3, 8, 8), np.uint8), 3, "looks channels-first"),
    (np.zeros((3, 64, 48), np.uint8), 3, r"one channels-first image: transpose with image\.transpose\(1, 2, 0\)"),
    (np.zeros((1, 2, 8, 8, 3), np.uint8), 3, r"shape \(1, 2, 8, 8, 3\)"),
    (np.zeros((2, 8, 8, 2), np.uint8), 1, r"shape \(2, 8, 8, 2\)"),
    (np.zeros((8,), np.uint8), 1, r"shape \(8,\)"),
    (np.zeros((8, 8), np.float32), 1, "uint8"),
    (np.zeros((8, 8), np.uint16), 3, r"uint16 in the image; for 16-bit images keep the top 8 bits with \(x >> 8\)"),
    (np.zeros((40, 60, 2), np.uint8), 3, r"greyscale image with alpha: keep the grey band with image\[\.\.\., 0\]"),
    ([np.zeros((2, 8, 8, 1), np.uint8)], 1, "item 0 of the list has shape"),
    ([np.zeros((8, 8, 2), np.uint8)], 1, "item 0 of the list has shape"),
    (np.zeros((0, 8), np.uint8), 1, "holds no pixels"),
    ([], 1, "empty list"),
    (np.zeros((0, 8, 8), np.uint8), 1, r"a batch of no images \(shape \(0, 8, 8\)\)"),  # numpy's stack error before
    (np.zeros((0, 8, 8, 3), np.uint8), 3, r"a batch of no images \(shape \(0, 8, 8, 3\)\)"),
]


@pytest.mark.parametrize("images,channels,message", BAD, ids=[b[2][:24] for b in BAD])
def test_other_shapes_get_one_sentence(images, channels, message):
    with pytest.raises(ValueError, match=message) as err:
        prepare(images, channels=channels)
    text = str(err.value)
    assert "\n" not in text and text.count(". ") == 0, text  # one sentence
    if "shape" in message:
        assert "(N, H, W, C)" in text or "(H, W, C)" in text  # and what to pass instead


def test_a_model_with_other_channel_counts_gets_a_sentence():
    with pytest.raises(ValueError, match="model takes 2"):
        prepare(np.zeros((8, 8, 3), np.uint8), channels=2)
    assert split_images(np.zeros((2, 8, 8, 5), np.uint8), 5)[0].shape == (8, 8, 5)  # a model's own count passes


def test_top_classes_rank_as_torch_topk_where_probabilities_underflow():
    """Ranked by float32 probabilities, classes more than ~100 logits below the top all had probability 0 and
    came out in index order."""
    import torch

    logits = np.array([[0.0, -200.0, -150.0, -300.0, -120.0, -150.0]], np.float32)
    names = list("abcdef")
    want = [names[i] for i in torch.topk(torch.from_numpy(logits), 6).indices[0].tolist()]
    assert [name for name, _ in top_classes(logits, names, 6)[0]] == want == ["a", "e", "c", "f", "b", "d"]


def test_top_classes_orders_by_probability():
    top = top_classes(np.array([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]]), ["a", "b", "c"], 2)
    assert [[n for n, _ in row] for row in top] == [["b", "c"], ["a", "b"]]
    assert top[0][0][1] == pytest.approx(np.exp(2) / (1 + np.exp(1) + np.exp(2)))
    assert len(top_classes(np.zeros((1, 3)), ["a", "b", "c"], 5)[0]) == 3


@pytest.mark.parametrize("k", [0, -1, -5, 2.0, True, "3", None])
def test_top_k_must_be_a_positive_integer(k):
    """-1 once sliced [:-1], 999 of 1000 classes; torch's topk(-1) raises, and so does every predict here."""
    with pytest.raises(ValueError, match=rf"top_k must be a positive integer.*got {re.escape(repr(k))}"):
        top_classes(np.zeros((1, 3)), ["a", "b", "c"], k)
    assert len(top_classes(np.zeros((1, 3)), ["a", "b", "c"], np.int64(2))[0]) == 2  # numpy ints are ints


MODES = {"P": "png", "CMYK": "tiff", "LA": "png", "RGBA": "png", "I;16": "png"}


def pil_image(mode):
    """A 300x260 photograph-like image in ``mode``: values vary per pixel, so a misread (palette indices as grey,
    CMYK as RGBA, 16-bit values refused) changes the pixels."""
    if mode == "I;16":
        return Image.fromarray((np.arange(300 * 260, dtype=np.uint16) % 400).reshape(260, 300))  # some above 255
    y, x = np.mgrid[:260, :300]
    rgb = np.stack([x * 255 // 299, y * 255 // 259, (x + y) % 256], -1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


@pytest.mark.parametrize("mode", MODES)
def test_pil_images_read_as_their_files(mode, tmp_path):
    """A PIL image in a list (or alone) gives the pixels its saved file gives, in prepare_batch (Classifier and
    exported predict) and EvalTransform.prepare (published weights), equal to torchvision on the RGB image
    torchvision reads from the file: Pillow's ``.convert("RGB")``, or for 16-bit greyscale ``decode_image`` and
    ``to_dtype(uint8, scale=True)`` (its top 8 bits; Pillow's conversion clips it to white)."""
    torchvision = pytest.importorskip("torchvision")
    from resnet_jax.data.augment import normalize
    from resnet_jax.pretrained import WEIGHTS

    img = pil_image(mode)
    path = tmp_path / f"image.{MODES[mode]}"
    img.save(path)
    with Image.open(path) as saved:
        assert saved.mode == mode  # the file really holds this mode
    rgb = img.convert("RGB")
    if mode == "I;16":
        import torch
        from torchvision.io import ImageReadMode, decode_image
        from torchvision.transforms.v2.functional import to_dtype

        decoded = to_dtype(decode_image(str(path), mode=ImageReadMode.RGB), torch.uint8, scale=True)
        rgb = Image.fromarray(decoded.permute(1, 2, 0).numpy())
        assert np.asarray(rgb).max() < 255 < int(np.asarray(img).max())  # 400 -> 1, where Pillow's gives 255
    for channels in (1, 3):
        want = prepare([path], channels=channels, size=64)
        np.testing.assert_array_equal(prepare([img], channels=channels, size=64), want)
        np.testing.assert_array_equal(prepare(img, channels=channels, size=64), want)
        np.testing.assert_array_equal(prepare([rgb], channels=channels, size=64), want)
    transform = WEIGHTS["resnet18"]["IMAGENET1K_V1"].transforms()
    want = transform.prepare([path])
    np.testing.assert_array_equal(transform.prepare([img]), want)
    np.testing.assert_array_equal(transform.prepare(img), want)
    theirs = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()(rgb).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(normalize(want[0], transform.mean, transform.std), theirs)
    # the transform called on one image reads it alike (it took Pillow's clipping conversion for 16 bits)
    np.testing.assert_array_equal(transform(img), theirs)
    np.testing.assert_array_equal(transform(path), theirs)


def test_a_16_bit_pgm_keeps_its_top_8_bits_and_a_file_named_like_a_scheme_is_a_file(tmp_path, monkeypatch):
    """Pillow opens 16-bit PGM files (and, before 10.3, PNG files) as mode "I", which its conversion clipped to
    white too; and a file named "gs" or "http" was refused as a URL."""
    from resnet_jax.data.images import read_image

    values = (np.arange(12 * 10, dtype=np.uint16) * 541).reshape(12, 10)
    header = b"P5 10 12 65535\n"
    (tmp_path / "scan.pgm").write_bytes(header + values.astype(">u2").tobytes())
    with Image.open(tmp_path / "scan.pgm") as img:
        assert img.mode == "I"
    np.testing.assert_array_equal(read_image(tmp_path / "scan.pgm"), np.repeat((values >> 8).astype(np.uint8)[..., None],
                                                                               3, axis=-1))
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(tmp_path / "gs", format="PNG")
    monkeypatch.chdir(tmp_path)
    assert read_image("gs").max() == 7
