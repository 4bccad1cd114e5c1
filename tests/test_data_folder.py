"""Class folders (``folder:PATH``) against torchvision's ``ImageFolder`` on the same files: class indices, file
order and pixels, then the slices, the refusals and a training run that reads them."""

import numpy as np
import pytest
from PIL import Image

from resnet_jax import data
from resnet_jax.data.folder import FolderSource
from training_helpers import tiny_config

MODES = ("RGB", "L", "RGBA", "P", "CMYK", "I;16")  # what a user's photo folder holds besides plain RGB


def write_image(path, mode: str, seed: int, size=(13, 11)):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (size[1], size[0]), np.uint16))
    elif mode == "RGBA":
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), np.uint8), "RGBA")
    else:
        img = rgb.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def photos(tmp_path):
    """root/train/<class>/... with every mode, nested folders, an upper-case extension, a non-image file, hidden
    entries; root/val with the same classes."""
    root = tmp_path / "photos"
    for i, mode in enumerate(MODES):
        suffix = ".jpg" if mode in ("RGB", "L", "CMYK") else ".png"
        write_image(root / "train" / ("zebra" if i % 2 else "ant") / f"{i}_{mode.replace(';', '')}{suffix}", mode, i)
    write_image(root / "train" / "ant" / "sub" / "deep.JPEG", "RGB", 10)
    write_image(root / "train" / "bee" / "b.bmp", "RGB", 11)
    (root / "train" / "bee" / "notes.txt").write_text("not an image")
    for split_class in ("ant", "bee", "zebra"):
        write_image(root / "val" / split_class / "v.png", "RGB", 20 + len(split_class))
    return root


def test_classes_files_and_pixels_equal_torchvision_imagefolder(photos):
    datasets = pytest.importorskip("torchvision.datasets")
    reference = datasets.ImageFolder(photos / "train")
    src = data.get_source(f"folder:{photos}", "train")
    assert src.class_names == reference.classes == ["ant", "bee", "zebra"] and src.num_classes == 3
    assert len(src) == len(reference) == 8
    for i, (path, label) in enumerate(reference.samples):
        record, (image, ref_label) = src[i], reference[i]
        assert record["label"] == label == ref_label, path
        assert record["image"].dtype == np.uint8 and record["image"].shape == (11, 13, 3)
        if path.endswith("I16.png"):  # the one departure in pixels: 16-bit greyscale as torchvision decodes it
            image = sixteen_bit_as_torchvision_decodes(path)
        np.testing.assert_array_equal(record["image"], np.asarray(image), err_msg=path)
    assert src.image_shape == (None, None, 3)


def sixteen_bit_as_torchvision_decodes(path):
    """``decode_image`` + ``to_dtype(uint8, scale=True)``: the top 8 bits, where ``ImageFolder``'s Pillow
    ``convert("RGB")`` clips every value above 255 to white."""
    import torch
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import to_dtype

    decoded = to_dtype(decode_image(str(path), mode=ImageReadMode.RGB), torch.uint8, scale=True)
    with Image.open(path) as img:
        assert (np.asarray(img.convert("RGB")) == 255).mean() > 0.9  # what ImageFolder would train on
    return decoded.permute(1, 2, 0).numpy()


def test_hidden_entries_are_skipped(photos):
    """Where this departs from torchvision on purpose: a notebook's checkpoint folder is not a class, and a macOS
    resource fork named like a photo is not an image."""
    write_image(photos / "train" / ".ipynb_checkpoints" / "x.png", "RGB", 30)
    (photos / "train" / "ant" / "._0_RGB.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_image(photos / "train" / "bee" / ".cache" / "y.png", "RGB", 31)
    src = data.get_source(f"folder:{photos}", "train")
    assert src.class_names == ["ant", "bee", "zebra"] and len(src) == 8
    assert all(src[i]["image"].shape == (11, 13, 3) for i in range(len(src)))


def test_percentage_slices_split_every_class_without_overlap(tmp_path):
    root = tmp_path / "one_folder"
    for c, n in (("a", 10), ("b", 4)):
        for k in range(n):
            write_image(root / "all" / c / f"{k:02d}.png", "L", 100 * len(c) + k)
    whole = data.get_source(f"folder:{root}", "all")
    head, tail = (data.get_source(f"folder:{root}", s) for s in ("all[:75%]", "all[75%:]"))
    labels = [[src[i]["label"] for i in range(len(src))] for src in (head, tail)]
    assert labels == [[0] * 8 + [1] * 3, [0] * 2 + [1]]  # 75% of 10 (7.5) and of 4, per class, as TFDS rounds
    pixels = [src[i]["image"].tobytes() for src in (head, tail) for i in range(len(src))]
    assert sorted(pixels) == sorted(whole[i]["image"].tobytes() for i in range(len(whole)))
    assert len(data.get_source(f"folder:{root}", "all[10%:20%]")) == 2  # a: [1:2], b: [0:1] (0.4 and 0.8)


def test_slices_round_each_class_to_the_nearest_image_as_tfds_does(tmp_path):
    """Rounded down, ``train[:90%]`` took no image of a one-image class and exactly one validation image of every
    class under ten. TFDS's default ("closest") rounds ``percent * count / 100`` with Python's ``round``: for
    1, 5, 9 and 20 images at 90% that is 1, 4 (4.5 to even), 8 and 18."""
    root = tmp_path / "rare"
    for c, n in (("a_one", 1), ("b_five", 5), ("c_nine", 9), ("d_twenty", 20)):
        for k in range(n):
            write_image(root / "train" / c / f"{k:02d}.png", "L", k)
    head, tail = (data.get_source(f"folder:{root}", s) for s in ("train[:90%]", "train[90%:]"))
    assert list(head.class_counts) == [1, 4, 8, 18] and list(tail.class_counts) == [0, 1, 1, 2]
    data.check_every_class(head)
    with pytest.raises(ValueError, match=r"has no image of the class\(es\) a_one \(1 of 4\), which the model "
                                         r"could then never learn"):
        data.check_every_class(data.get_source(f"folder:{root}", "train[:50%]"))  # 0.5 rounds to 0


def refusal(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


def test_bad_folders_are_refused_with_what_to_do(photos, tmp_path):
    assert "does not exist" in refusal(lambda: FolderSource(tmp_path / "nowhere", "train"))
    assert "no split folder 'validation' (its folders: train, val)" in refusal(
        lambda: data.get_source(f"folder:{photos}", "validation"))
    (photos / "train" / "empty_class").mkdir()  # kept as a class (a validation split may lack one) ...
    with_empty = data.get_source(f"folder:{photos}", "train")
    assert with_empty.class_names[2] == "empty_class" and with_empty.class_counts[2] == 0
    assert "empty_class (1 of 4)" in refusal(lambda: data.check_every_class(with_empty))  # ... but not trained on
    assert "other formats" not in refusal(lambda: data.check_every_class(with_empty))
    # a class whose files are all of formats not read (as ImageFolder, which says "Found no valid file for the
    # classes ... Supported extensions are"): used to be told to add images that are there
    (photos / "train" / "empty_class" / "clip.gif").write_bytes(b"GIF89a")
    (photos / "train" / "empty_class" / "IMG_1.HEIC").write_bytes(b"")
    message = refusal(lambda: data.check_every_class(data.get_source(f"folder:{photos}", "train")))
    assert ("The folder(s) of empty_class hold only files of other formats (empty_class: IMG_1.HEIC, clip.gif), "
            "which are skipped, as torchvision's ImageFolder skips them: convert them to one of .jpg .jpeg .png") \
        in message, message
    (tmp_path / "flat" / "train").mkdir(parents=True)
    assert "holds no class folders" in refusal(lambda: data.get_source(f"folder:{tmp_path / 'flat'}", "train"))
    for split in ("train[:90]", "train[50%:10%]", "train[:101%]", ""):
        assert "percentage slice" in refusal(lambda: data.get_source(f"folder:{photos}", split)), split
    assert "extra kwargs" not in refusal(lambda: data.get_source(f"folder:{photos}", "val", num_examples=3))


def test_a_corrupt_image_names_its_file_and_advice_that_lets_the_run_resume(photos):
    """The advice was "replace or remove the file", and a removed file changes the folder's fingerprint, which a
    resume refuses: replacing it under the same name keeps the run's record, as the message now says."""
    bad = photos / "val" / "bee" / "v.png"
    good = bad.read_bytes()
    before = data.get_source(f"folder:{photos}", "val").fingerprint()
    bad.write_bytes(good[:40])
    src = data.get_source(f"folder:{photos}", "val")
    message = refusal(lambda: src[1])
    assert str(bad) in message and "replace it with a readable image of the same name" in message
    bad.write_bytes(good)
    assert data.get_source(f"folder:{photos}", "val").fingerprint() == before
    bad.unlink()
    assert data.get_source(f"folder:{photos}", "val").fingerprint() != before


def test_a_directory_named_without_the_prefix_gets_the_hint(photos):
    pytest.importorskip("tensorflow_datasets")
    assert f"'folder:{photos}'" in refusal(lambda: data.get_source(str(photos), "train"))


def folder_config(photos, augment="imagenet"):
    config = tiny_config(dataset=f"folder:{photos}", val_split="val", batch_size=4, eval_batch_size=4,
                         num_epochs=1, augment=augment)
    config.model_overrides.in_channels = 3  # photos are read as RGB, as torchvision's loader reads them
    return config


def test_splits_with_other_classes_are_refused_before_training(photos):
    from resnet_jax.training import setup

    (photos / "val" / "bee" / "v.png").unlink()
    (photos / "val" / "bee").rmdir()
    message = refusal(lambda: setup(folder_config(photos)))
    assert "missing: bee" in message and "same class folders" in message


def test_class_names_given_for_folders_must_be_the_folders(photos):
    """A folder's label is the position of its class in the sorted folder names: names given in another order
    would label every prediction with another class's name, so they are refused; the same names are taken."""
    from resnet_jax.training import setup

    config = folder_config(photos)
    config.class_names = ("bee", "ant", "zebra")
    message = refusal(lambda: setup(config))
    assert "config.class_names are bee, ant, zebra but" in message and "in label order, are ant, bee, zebra" in message
    config.class_names = ("ant", "bee", "zebra")
    assert setup(config).train_source.class_names == ["ant", "bee", "zebra"]


def test_evaluation_crops_as_the_augmentation_trained(photos):
    """The default evaluation crop (saved with the run, used by predict) shows what training saw: the whole central
    square after "cifar"/"crop" (a folder of 32 x 32 PNGs was evaluated on its central 28 columns, enlarged),
    the 87.5% centre after random-resized crops, as torchvision evaluates ImageNet."""
    from resnet_jax.training import setup

    source = data.get_source(f"folder:{photos}", "train")
    fractions = [data.default_crop_fraction(source, augment) for augment in ("cifar", "crop", "imagenet", "none")]
    assert fractions == [1.0, 1.0, 0.875, 0.875]
    assert setup(folder_config(photos, augment="crop")).config.eval_crop_fraction == 1.0
    assert setup(folder_config(photos)).config.eval_crop_fraction == 0.875


@pytest.mark.slow
def test_training_reads_the_folders(photos, tmp_path):
    from resnet_jax.training import train

    result = train(folder_config(photos), tmp_path / "run", log=lambda _: None)
    assert result.class_names == ["ant", "bee", "zebra"] and int(result.state.step) == 2
    val = [r for r in result.history if r["split"] == "val"]
    assert val and np.isfinite(val[-1]["loss"])


@pytest.mark.slow
def test_a_run_resumes_from_its_moved_folder_and_refuses_changed_images(photos, tmp_path):
    """The same files at another path (node-local scratch, a new mount) are the same run: it resumes exactly
    where it stopped (torchvision's and timm's scripts take the data path afresh at every launch; here the path
    is recorded, so a moved folder was refused as another run). Any added, removed or renamed image is refused:
    the rest of the epoch would mix two shuffles (it resumed silently)."""
    from resnet_jax.checkpoint import ConfigMismatch
    from resnet_jax.training import train

    workdir = tmp_path / "run"
    first = train(folder_config(photos), workdir, log=lambda _: None)
    assert int(first.state.step) == 2
    moved = photos.rename(tmp_path / "scratch_job2")
    config = folder_config(moved)
    config.num_epochs = 2
    said = []
    second = train(config, workdir, log=said.append)
    assert second.resumed_from == 2 and int(second.state.step) == 4
    assert any(f"dataset: \"folder:{photos}\" -> \"folder:{moved}\"" in line for line in said), said
    write_image(moved / "train" / "ant" / "new.png", "RGB", 40)
    config.num_epochs = 3
    with pytest.raises(ConfigMismatch, match=r"training images of the run in .* changed since it started \(8 files "
                                             r"then, 9 now, or other names\)"):
        train(config, workdir, log=lambda _: None)


def test_a_model_is_not_evaluated_on_folders_of_other_classes(photos):
    """Folder labels are positions in the folder's own class list: evaluating a model on folders of other
    classes would score a dog as whatever class 0 was; refused, as training refuses such splits."""
    import jax
    import jax.numpy as jnp

    from resnet_jax.training import Classifier

    clf = Classifier("resnet20", num_classes=3, image_size=16, class_names=["ant", "bee", "zebra"],
                     model_overrides={"stage_sizes": (1, 1, 1)})
    clf.variables = jax.jit(lambda: clf.model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False))()
    assert clf.evaluate(f"folder:{photos}", "val", batch_size=4)["accuracy"] >= 0  # the same classes: evaluated
    (photos / "val" / "zebra" / "v.png").rename(photos / "val" / "bee" / "w.png")
    (photos / "val" / "zebra").rmdir()
    write_image(photos / "val" / "yak" / "y.png", "RGB", 40)
    message = refusal(lambda: clf.evaluate(f"folder:{photos}", "val", batch_size=4))
    assert "has the classes ant, bee, yak but this model was trained on ant, bee, zebra" in message


def test_folder_paths_are_recorded_absolute_and_read_as_torchvision_reads_them(photos, monkeypatch):
    """The config is the run's record: a relative folder (or ~) would name another folder when the run is resumed
    or evaluated from elsewhere. An existing split folder is taken by its name even with brackets in it."""
    from resnet_jax.training import validate

    monkeypatch.chdir(photos.parent)
    monkeypatch.setenv("HOME", str(photos.parent))
    assert validate(tiny_config(dataset="folder:photos")).dataset == f"folder:{photos}"
    assert validate(tiny_config(dataset="folder:~/photos")).dataset == f"folder:{photos}"
    assert validate(tiny_config(dataset="digits")).dataset == "digits"
    assert len(data.get_source("folder:~/photos", "val")) == 3  # torchvision's VisionDataset expands ~ too
    (photos / "val").rename(photos / "val [2024]")
    assert data.get_source(f"folder:{photos}", "val [2024]").class_names == ["ant", "bee", "zebra"]
