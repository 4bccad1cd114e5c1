"""Random erasing against torchvision's ``RandomErasing``: the same erased pixels for the same rectangle, and the
same distribution of rectangles (area, aspect, position, and how often none fits)."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F

from resnet_jax.data.erasing import erasing_box, random_erasing


def torchvision_boxes(height, width, n, scale=(0.02, 0.33), ratio=(0.3, 3.3)):
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    boxes = [T.RandomErasing.get_params(image, scale, ratio, value=[0.0])[:4] for _ in range(n)]
    return [None if box == (0, 0, height, width) else box for box in boxes]


def summary(boxes, height, width):
    """Share of draws without a rectangle; mean area fraction, mean log aspect, mean relative centre."""
    found = [b for b in boxes if b is not None]
    top, left, h, w = (np.array(v, float) for v in zip(*found))
    return (1 - len(found) / len(boxes), np.mean(h * w) / (height * width), np.mean(np.log(h / w)),
            np.mean((top + h / 2) / height), np.mean((left + w / 2) / width))


@pytest.mark.parametrize("height,width,scale", [(32, 32, (0.02, 0.33)), (20, 64, (0.1, 0.9))])
def test_rectangles_are_drawn_as_torchvision_draws_them(height, width, scale):
    n = 4000
    ours = [erasing_box(height, width, np.random.default_rng(i), scale) for i in range(n)]
    theirs = torchvision_boxes(height, width, n, scale)
    # the standard error of each mean is under 0.01 at 4000 draws; 0.03 is three of them
    np.testing.assert_allclose(summary(ours, height, width), summary(theirs, height, width), atol=0.03)
    for boxes in (ours, theirs):  # every position is reachable: rectangles touch each edge
        found = [b for b in boxes if b is not None]
        assert {0} <= {t for t, _, _, _ in found} and {0} <= {left for _, left, _, _ in found}
        assert any(t + h == height for t, _, h, _ in found) and any(left + w == width for _, left, _, w in found)


def test_erased_pixels_equal_torchvisions_erase():
    image = np.random.default_rng(0).standard_normal((24, 40, 3)).astype(np.float32)
    rng = np.random.default_rng(5)
    out = random_erasing(image, rng, p=1.0, value=0.0)
    top, left, h, w = _box_of(out, image)
    expected = F.erase(torch.from_numpy(image).permute(2, 0, 1), top, left, h, w, torch.tensor(0.0))
    np.testing.assert_array_equal(out, expected.permute(1, 2, 0).numpy())
    assert 0.02 * 24 * 40 <= h * w <= 0.33 * 24 * 40 + 24 + 40  # rounding the sides can add a row and a column


def _box_of(out, image):
    rows, cols = np.nonzero((out != image).any(-1))
    return rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_probability_and_random_values():
    image = np.ones((16, 16, 3), np.float32)
    rng = np.random.default_rng(0)
    erased = sum(not np.array_equal(random_erasing(image, rng, p=0.5), image) for _ in range(2000))
    assert abs(erased / 2000 - 0.5) < 0.04
    noisy = random_erasing(image, rng, p=1.0, value="random")
    changed = noisy[(noisy != 1.0).any(-1)]
    assert changed.size and abs(float(changed.std()) - 1.0) < 0.3  # standard normal noise, as value="random"
    assert np.array_equal(random_erasing(image, rng, p=0.0), image)


@pytest.mark.parametrize("kwargs,message", [({"p": 1.5}, "probability"), ({"scale": (0.5, 0.1)}, "scale"),
                                            ({"scale": (0.5, 2.0)}, r"0 <= low <= high <= 1"),  # torchvision's bound
                                            ({"value": "mean"}, "'random'")])
def test_bad_settings_are_one_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message):
        random_erasing(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0), **kwargs)
