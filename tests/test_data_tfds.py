"""TFDS for real, offline: mocked cifar10/imagenet2012 records through the pipeline, a small dataset prepared
as ArrayRecord on disk and read back without TensorFlow, and each failure as one sentence, before any download."""

import importlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from conftest import run_python  # noqa: E402
from test_data_folder import MODES, write_image  # noqa: E402
from resnet_jax import data  # noqa: E402
from resnet_jax.data import prepare as prep  # noqa: E402


class TinyShapes(tfds.core.GeneratorBasedBuilder):
    """Two classes of 20x24 images (dark squares / light squares), JPEG-encoded like ImageNet's."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(20, 24, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=["dark", "light"]),
            }),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(range(0, 30)), "test": self._generate_examples(range(30, 41))}

    def _generate_examples(self, ids):
        for i in ids:
            image = np.full((20, 24, 3), 40 + 170 * (i % 2), np.uint8)
            image[5:15, 6:18] = i  # a per-example mark
            yield i, {"image": image, "label": i % 2}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Prepared once per module; the network probe points at a local listener, as nothing is downloaded."""
    data_dir = tmp_path_factory.mktemp("tfds")
    with socket.create_server(("127.0.0.1", 0)) as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv(prep.PROBE_ENV, f"127.0.0.1:{server.getsockname()[1]}")
        prep.prepare("tiny_shapes", data_dir=data_dir)
    return data_dir


@pytest.mark.slow
def test_prepared_array_record_dataset_reads_back(tiny_dir):
    assert list((tiny_dir / "tiny_shapes" / "1.0.0").glob("*.array_record*"))
    src = data.get_source("tiny_shapes", "train[:50%]", data_dir=tiny_dir, download=False)
    assert len(src) == 15 and src.num_classes == 2 and src.class_names == ["dark", "light"]
    assert src.image_shape == (20, 24, 3)
    record = src[3]
    assert record["image"].shape == (20, 24, 3) and record["image"].dtype == np.uint8 and record["label"] == 1
    test = data.get_source("tfds:tiny_shapes", "test", data_dir=tiny_dir)
    marks = sorted(int(test[i]["image"][10, 12, 0]) for i in range(len(test)))  # JPEG: within a few levels
    assert len(test) == 11 and np.abs(np.array(marks) - np.arange(30, 41)).max() <= 4
    ev = data.eval_loader(test, batch_size=4, image_size=16, mean=(0.5,), std=(0.25,))
    labels = [int(x) for b in ev for x in b["label"][b["mask"]]]
    assert sorted(labels) == sorted(i % 2 for i in range(30, 41))


READ_WITHOUT_TF = """
import json, sys


class HideTensorFlow:  # wraps every import finder so that TensorFlow looks not installed
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [HideTensorFlow(f) for f in sys.meta_path]
from resnet_jax import data
src = data.get_source("tiny_shapes", "train", data_dir=sys.argv[1])
batch = next(iter(data.train_loader(src, batch_size=6, image_size=16, augment="imagenet", mean=(0.5,), std=(0.25,))))
try:
    data.get_source("mnist", "train", data_dir=sys.argv[2])
    error = None
except ValueError as err:
    error = str(err)
print(json.dumps({"shape": list(batch["image"].shape), "error": error, "tf": "tensorflow" in sys.modules}))
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_reading_needs_no_tensorflow_and_preparing_says_so(tiny_dir, tmp_path):
    out = run_python(READ_WITHOUT_TF, args=[tiny_dir, tmp_path], timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [6, 16, 16, 3] and not result["tf"]
    assert "needs TensorFlow" in result["error"] and 'pip install -e ".[data]"' in result["error"]


def test_mocked_cifar10_through_the_cifar_recipe():
    with tfds.testing.mock_data(num_examples=24):
        src = data.get_source("cifar10", "train[:90%]")
        assert src.num_classes == 10 and len(src.class_names) == 10 and src.image_shape == (32, 32, 3)
        loader = data.train_loader(src, batch_size=8, image_size=32, augment="cifar", seed=0,
                                   mean=data.DATASET_STATS["cifar10"][0], std=data.DATASET_STATS["cifar10"][1])
        batches = [b for _, b in zip(range(3), loader)]
        assert batches[0]["image"].shape == (8, 32, 32, 3) and batches[0]["image"].dtype == np.float32
        assert all(((b["label"] >= 0) & (b["label"] < 10)).all() for b in batches)


def test_mocked_imagenet2012_through_the_imagenet_recipe():
    with tfds.testing.mock_data(num_examples=10):
        train = data.get_source("imagenet2012", "train", data_dir=None)
        assert train.num_classes == 1000 and train.image_shape == (None, None, 3)
        batch = next(iter(data.train_loader(train, batch_size=4, image_size=64, augment="imagenet", seed=0,
                                            mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD)))
        assert batch["image"].shape == (4, 64, 64, 3)
        ev = data.eval_loader(data.get_source("imagenet2012", "validation"), batch_size=4, image_size=56,
                              mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD)
        batches = list(ev)
        assert len(batches) == 3 and sum(int(b["mask"].sum()) for b in batches) == 10


def refusal(call):
    """Run `call`, expecting one ValueError sentence, and return its message. That it comes before any download or
    retry is shown by the message itself (each names the check that refused), not by a clock."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.endswith(".")
    return message


def test_unknown_name_suggests_close_matches():
    assert "did you mean 'cifar10'" in refusal(lambda: data.get_source("cifar1O", "train"))


WITHOUT_TFDS_CHILD = """
import sys
sys.modules["tensorflow_datasets"] = None  # the base install: TFDS is the data extra's
from resnet_jax import data
for name in sys.argv[1:]:
    try:
        data.get_source(name, "train")
    except ValueError as err:
        print(name, "->", err)
"""


def test_without_tfds_a_misspelt_name_or_a_folder_is_said_as_such_not_sent_to_install_it(tmp_path):
    """A base install knows no TFDS names, but "digitz" is a typo of a built-in name and a directory is meant
    as class folders: both were told to install TensorFlow. A real TFDS name still gets the install line."""
    out = run_python(WITHOUT_TFDS_CHILD, args=["digitz", str(tmp_path), "cifar10"]).stdout
    typo, folder, tfds_name = out.strip().splitlines()
    assert "did you mean 'digits'" in typo and "tensorflow-datasets" not in typo
    assert f"name it 'folder:{tmp_path}'" in folder
    assert "needs tensorflow-datasets" in tfds_name


def test_missing_data_dir(tmp_path):
    assert "does not exist" in refusal(lambda: data.get_source("cifar10", "train", data_dir=tmp_path / "nope"))


def test_unprepared_without_download_names_the_command(tmp_path):
    message = refusal(lambda: data.get_source("cifar10", "train", data_dir=tmp_path, download=False))
    assert "python -m resnet_jax.data.prepare cifar10" in message


def test_no_network_is_refused_by_the_probe_before_any_download(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")
    with socket.socket() as closed:  # bind a port, then leave it closed: connections are refused
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv(prep.PROBE_ENV, f"127.0.0.1:{closed.getsockname()[1]}")
    assert "no network" in refusal(lambda: data.get_source("mnist", "train", data_dir=tmp_path))


def test_manual_download_dataset_says_where_files_go(tmp_path):
    pytest.importorskip("tensorflow")
    message = refusal(lambda: data.get_source("imagenet2012", "train", data_dir=tmp_path))
    assert "downloaded by hand" in message and str(tmp_path / "downloads" / "manual") in message


@pytest.mark.slow
def test_unknown_split_lists_the_splits(tiny_dir):
    message = refusal(lambda: data.get_source("tiny_shapes", "trian", data_dir=tiny_dir))
    assert "its splits are: test, train" in message and "delete" in message and "prepare it again" in message


OWN_BUILDER = """
import os
import tensorflow_datasets as tfds

ROOT = {root!r}


class OwnPhotos(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({{"image": tfds.features.Image(), "file": tfds.features.Text(),
                                                "label": tfds.features.ClassLabel(names=["a", "b"])}})
        return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"), features=features)

    def _split_generators(self, dl_manager):
        return {{"train": self._generate_examples()}}

    def _generate_examples(self):
        for name in sorted(os.listdir(ROOT)):  # the files as they are: TFDS keeps an image file's own bytes
            yield name, {{"image": os.path.join(ROOT, name), "label": int(name[0]) % 2, "file": name}}
"""


@pytest.mark.slow
def test_a_users_builder_in_a_package_prepares_offline_and_reads_every_mode_as_torchvision(tmp_path, monkeypatch):
    """A builder in a package is the path TFDS's own datasets take (it needs importlib_resources, which TFDS does
    not declare); one that reads local files must not be refused for want of a network; and images in palette,
    CMYK, RGBA or 16-bit form must come out as torchvision reads them, not as TFDS's raw bands."""
    pytest.importorskip("tensorflow")
    from PIL import Image

    photos = tmp_path / "photos"
    for i, mode in enumerate(MODES):
        write_image(photos / f"{i}_{mode.replace(';', '')}.{'jpg' if mode in ('RGB', 'L', 'CMYK') else 'png'}",
                    mode, i)
    damaged = photos / "9_truncated.jpg"  # sorted last: TFDS stores its bytes unread
    write_image(damaged, "RGB", 9)
    damaged.write_bytes(damaged.read_bytes()[:300])
    package = tmp_path / "ownpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "own_photos.py").write_text(OWN_BUILDER.format(root=str(photos)))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("ownpkg.own_photos")
    with socket.socket() as closed:  # no network: the probe's port refuses connections
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv(prep.PROBE_ENV, f"127.0.0.1:{closed.getsockname()[1]}")
    (tmp_path / "tfds").mkdir()
    prep.prepare("own_photos", data_dir=tmp_path / "tfds")
    src = data.get_source("own_photos", "train", data_dir=tmp_path / "tfds")
    assert len(src) == len(MODES) + 1 and src.image_shape == (None, None, 3)
    # used to be Pillow's own "Truncated File Read", from a reader thread mid-epoch, naming nothing
    with pytest.raises(ValueError, match=f"cannot read the image of record {len(MODES)} of 'own_photos' split "
                                         "'train' .*prepare it again"):
        src[len(MODES)]
    for i in range(len(MODES)):
        name = src._ds[i]["file"]
        # torchvision's loader (datasets.folder.pil_loader) is Image.open(file).convert("RGB"); torch itself is
        # not imported here, as it crashes a process that has TensorFlow loaded
        with Image.open(photos / (name.decode() if isinstance(name, bytes) else name)) as image:
            expected = np.asarray(image.convert("RGB"))
            if image.mode == "I;16":  # torchvision's decode_image keeps the top 8 bits (test_data_folder.py)
                expected = np.repeat((np.asarray(image) >> 8).astype(np.uint8)[:, :, None], 3, axis=-1)
        np.testing.assert_array_equal(src[i]["image"], expected, err_msg=str(name))


RACING_BUILDER = """
import time
import numpy as np
import tensorflow_datasets as tfds


class RacingShapes(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(8, 8, 3)),
                                               "label": tfds.features.ClassLabel(names=["a", "b"])})
        return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"), features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(40)}

    def _generate_examples(self, n):
        for i in range(n):
            time.sleep(0.05)  # long enough for the other process to find it unprepared too
            yield i, {"image": np.full((8, 8, 3), i, np.uint8), "label": i % 2}
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_processes_that_find_a_dataset_unprepared_prepare_it_once(tmp_path):
    """Every process of a run (one per GPU on one host) found the dataset unprepared and prepared it at once; all
    but the first failed at TFDS's rename ("Destination ... 1.0.0 already exists"). One prepares, the others wait
    and read it."""
    pytest.importorskip("tensorflow")
    (tmp_path / "racepkg").mkdir()
    (tmp_path / "racepkg" / "__init__.py").write_text("")
    (tmp_path / "racepkg" / "racing_shapes.py").write_text(RACING_BUILDER)
    (tmp_path / "tfds").mkdir()
    reader = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import racepkg.racing_shapes
        from resnet_jax import data
        print("examples", len(data.get_source("racing_shapes", "train", data_dir={str(tmp_path / 'tfds')!r})))
    """)
    with socket.socket() as closed:  # no network needed: a user's builder reading nothing
        closed.bind(("127.0.0.1", 0))
        env = {**os.environ, prep.PROBE_ENV: f"127.0.0.1:{closed.getsockname()[1]}"}
    procs = [subprocess.Popen([sys.executable, "-c", reader], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "examples 40" in out, err[-3000:]


def test_an_incomplete_dataset_folder_is_refused_not_taken_as_prepared(tmp_path):
    pytest.importorskip("tensorflow")
    version = tmp_path / "tiny_shapes" / "1.0.0"
    version.mkdir(parents=True)
    (version / "tiny_shapes-train.array_record-00000-of-00001").write_bytes(b"")  # an interrupted copy
    expected = f"{version} holds an incomplete 'tiny_shapes' (no dataset_info.json); delete that folder"
    assert expected in refusal(lambda: prep.prepare("tiny_shapes", data_dir=tmp_path))
    assert expected in refusal(lambda: data.get_source("tiny_shapes", "train", data_dir=tmp_path))


def test_imagenet_manual_dir_names_its_tar_files_and_spots_extracted_folders(tmp_path):
    pytest.importorskip("tensorflow")
    manual = tmp_path / "manual"
    (manual / "train" / "n01440764").mkdir(parents=True)
    message = refusal(lambda: prep.prepare("imagenet2012", data_dir=tmp_path, manual_dir=manual))
    assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in message and f"'folder:{manual}'" in message


class NeedsManualFiles(tfds.core.GeneratorBasedBuilder):
    """Fails as TFDS's own builders report missing manual files (imagenet2012_subset without its train tar)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"image": tfds.features.Image(shape=(4, 4, 3)), "label": tfds.features.ClassLabel(names=["a"])}))

    def _split_generators(self, dl_manager):
        raise AssertionError("ImageNet requires manual download of the data.\nPlease download the train and val set")

    def _generate_examples(self):
        yield from ()


def test_a_builders_assertion_is_one_sentence_and_a_config_typo_keeps_tfdss_hint(tmp_path):
    pytest.importorskip("tensorflow")
    message = refusal(lambda: prep.prepare("needs_manual_files", data_dir=tmp_path))
    assert message.startswith("preparing 'needs_manual_files' failed: ImageNet requires manual download")
    typo = refusal(lambda: data.get_source("tiny_shapes/nope", "train", data_dir=tmp_path))
    assert "did you mean" not in typo and "BuilderConfig nope not found" in typo  # TFDS's, not "unknown dataset"


def test_on_a_fresh_machine_the_default_data_dir_is_made_not_a_lock_files_error(tmp_path):
    """Used to be: with TFDS's default data_dir (~/tensorflow_datasets) not there yet, every dataset failed on
    the preparation lock's FileNotFoundError, before TFDS could create the folder, download or say why not. Here
    a fresh HOME and no network: the library's own "no network" sentence, and the folder made."""
    pytest.importorskip("tensorflow")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "TFDS_DATA_DIR"}
    proc = run_python("""
        from resnet_jax import data
        try:
            data.get_source("mnist", "train")
        except ValueError as err:
            print("refused:", err)
    """, env={**env, "HOME": str(tmp_path), prep.PROBE_ENV: f"127.0.0.1:{port}"})
    assert "refused:" in proc.stdout and "no network" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert (tmp_path / "tensorflow_datasets").is_dir()
