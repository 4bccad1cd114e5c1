"""Opening a TFDS builder and preparing it as ArrayRecord: what reading (``tfds_source.py``) and the preparing
command (``prepare.py``) share, with every slow or obscure TFDS failure turned into one sentence first.

Before handing over to TFDS, preparing checks the three things that otherwise fail slowly: TensorFlow is
installed, a manual-download dataset has its files, and the network answers (TFDS retries downloads for
minutes offline).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import socket
import threading
from urllib.parse import urlparse

from resnet_jax.atomic import one_at_a_time

INSTALL_HINT = 'pip install -e ".[data]" in the clone of resnet-jax'


def import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ValueError(f"Reading TFDS datasets needs tensorflow-datasets and array_record: {INSTALL_HINT}.") from err
    return tfds


BUILTIN = ("digits", "synthetic")  # the names get_source reads itself, without TFDS


def _close_names(name: str, tfds) -> list[str]:
    """The dataset names close to ``name``: the built-in ones, and TFDS's where it is installed (``tfds``)."""
    known = list(dict.fromkeys([*BUILTIN, *(tfds.list_builders() if tfds else ())]))
    return difflib.get_close_matches(_base_name(name), known, n=3)


def _unknown_name(name: str, tfds) -> ValueError:
    """The sentence for a name that is no dataset: a directory is meant as class folders, else the close names
    (the built-in ones only where TFDS is not installed, ``tfds`` None)."""
    if os.path.isdir(name):
        return ValueError(f"Unknown dataset {name!r}: it is a directory; for class folders (torchvision's "
                          f"ImageFolder layout) name it 'folder:{name}'.")
    close = _close_names(name, tfds)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return ValueError(f"Unknown dataset {name!r}: {hint}Use 'digits', 'synthetic', 'folder:PATH' (class folders) "
                      f"or a TFDS dataset name (tfds.list_builders()).")


def _base_name(name: str) -> str:
    """The dataset of a TFDS name: "imagenette" of "imagenette/320px-v2:1.0.0"."""
    return name.split("/")[0].split(":")[0]


def open_builder(name: str, data_dir=None):
    """The TFDS builder for `name` (e.g. "cifar10", "imagenette/320px-v2"): the prepared one if on disk, else
    one that will prepare ArrayRecord files, the format random access needs."""
    try:
        tfds = import_tfds()
    except ValueError:
        # without TFDS a misspelt built-in name or a folder would be sent to install TensorFlow: say what it is
        if os.path.isdir(name) or _close_names(name, None):
            raise _unknown_name(name, None) from None
        raise
    if data_dir is not None and not os.path.isdir(os.fspath(data_dir)):
        raise ValueError(f"data_dir {os.fspath(data_dir)!r} does not exist; create it or point data_dir at your "
                         f"TFDS data directory.")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise _unknown_name(name, tfds) from None
    except ValueError as err:  # a known dataset with an unknown config or version, or not a name at all
        if _base_name(name) not in tfds.list_builders():
            raise _unknown_name(name, tfds) from None
        text = " ".join(str(err).split()).split(" Here are ")[0].rstrip(":. ")  # TFDS's, without its list
        configs = [c.name for c in getattr(tfds.builder_cls(_base_name(name)), "BUILDER_CONFIGS", [])]
        close = difflib.get_close_matches(name.split("/", 1)[-1].split(":")[0], configs, n=3) or configs[:5]
        hint = f"; {_base_name(name)}'s configs include {', '.join(close)}" if close else ""
        raise ValueError(f"cannot open {name!r}: {text}{hint}.") from None
    if not builder.is_prepared():
        return tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if builder.info.file_format is not None and builder.info.file_format.value != "array_record":
        raise ValueError(f"{name!r} in {builder.data_dir} was prepared as {builder.info.file_format.value}, but "
                         f"random access needs ArrayRecord: delete that folder and prepare it again.")
    return builder



# Where TFDS downloads most data from; override to probe another host (or, in tests, a closed port).
PROBE_ENV = "RESNET_JAX_NETWORK_PROBE"
DEFAULT_PROBE = "storage.googleapis.com:443"
PROBE_TIMEOUT_S = 5.0


def network_reachable(probe: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `probe` ("host:port"), or to the HTTPS proxy if one is set, opens in time.

    Runs in a thread because name resolution has no timeout of its own.
    """
    probe = probe or os.environ.get(PROBE_ENV) or DEFAULT_PROBE
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy and not os.environ.get(PROBE_ENV):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        probe = f"{parsed.hostname}:{parsed.port or 80}"
    host, _, port = probe.rpartition(":")
    result = []

    def connect():
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def tensorflow_installed() -> bool:
    """Found without importing it (which takes seconds); a finder that refuses it counts as not installed."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


# The files a manual-download builder reads, where TFDS documents them; any one makes a split (ImageNet can be
# prepared with only its validation tar, to evaluate published weights).
MANUAL_FILES = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}


def prepare_builder(builder, *, manual_dir=None) -> None:
    """download_and_prepare `builder` as ArrayRecord after the fast checks; raises ValueError if one fails.

    One process at a time per dataset and data_dir (a file lock beside it): every process of a run that found the
    dataset unprepared prepared it at once, and all but the first failed at TFDS's final rename ("Destination
    ... already exists"). A process that waited finds it prepared and reads its info instead."""
    root = os.fspath(builder._data_dir_root)
    local = "://" not in root  # a bucket (gs://) takes no file lock: its processes prepare as TFDS lets them
    with one_at_a_time(os.path.join(root, f".{builder.name}.prepare.lock")) if local else contextlib.nullcontext():
        if builder.is_prepared():
            builder.info.read_from_directory(builder.data_dir)
            return
        _prepare(builder, manual_dir)


def _prepare(builder, manual_dir) -> None:
    name = builder.name
    if not tensorflow_installed():
        raise ValueError(f"Preparing {name!r} needs TensorFlow, which is not installed: {INSTALL_HINT} "
                         f"(reading prepared data does not need it).")
    if os.path.isdir(builder.data_dir) and os.listdir(builder.data_dir):
        # TFDS writes into a temporary folder and renames it when done, so this is an interrupted copy or a
        # deleted dataset_info.json; TFDS would skip it as prepared, and reading it would fail later.
        raise ValueError(f"{builder.data_dir} holds an incomplete {name!r} (no dataset_info.json); delete that "
                         f"folder and prepare it again.")
    manual_dir = os.fspath(manual_dir) if manual_dir else os.path.join(builder._data_dir_root, "downloads", "manual")
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        _check_manual_dir(name, manual_dir)
    elif type(builder).__module__.startswith("tensorflow_datasets.") and not network_reachable():
        # only TFDS's own builders download; a user's builder reading local files needs no network
        raise ValueError(f"{name!r} is not prepared in {builder._data_dir_root} and must be downloaded, but there "
                         f"is no network; prepare it on a connected machine and copy the data_dir here.")
    import tensorflow_datasets as tfds

    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except AssertionError as err:  # how TFDS's builders report missing manual files (imagenet2012_subset: both)
        text = " ".join(str(err).split()).rstrip(".")
        raise ValueError(f"preparing {name!r} failed: {text}.") from None
    if not builder.is_prepared():
        raise ValueError(f"preparing {name!r} left no complete dataset in {builder.data_dir}; delete that folder "
                         f"and prepare it again.")


def _check_manual_dir(name: str, manual_dir: str) -> None:
    """The manual files are there (at least one of those TFDS documents); extracted folders get the hint that
    they are an image folder already."""
    present = os.listdir(manual_dir) if os.path.isdir(manual_dir) else []
    expected = MANUAL_FILES.get(name)
    if present and (not expected or set(expected) & set(present)):
        return
    wanted = f"{' and '.join(expected)} (either alone prepares its split)" if expected else "its files"
    hint = ""
    if any(os.path.isdir(os.path.join(manual_dir, d)) for d in ("train", "val", "validation")):
        hint = (f" {manual_dir} holds extracted folders: to read class folders as they are, use the dataset "
                f"'folder:{manual_dir}' instead.")
    raise ValueError(f"{name!r} must be downloaded by hand: put {wanted} in {manual_dir} (or pass manual_dir=), "
                     f"see https://www.tensorflow.org/datasets/catalog/{name}.{hint}")
