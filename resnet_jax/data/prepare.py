"""Prepare a TFDS dataset as ArrayRecord files, failing within seconds when that cannot work.

    python -m resnet_jax.data.prepare cifar10 [--data_dir DIR]
    python -m resnet_jax.data.prepare imagenet2012 --data_dir DIR --manual_dir DIR_WITH_THE_TAR_FILES

Preparing needs TensorFlow (TFDS serialises examples with it); reading the result does not. Before handing over
to TFDS we check the three things that otherwise fail slowly or obscurely: TensorFlow is installed, a
manual-download dataset has its files, and the network answers (TFDS retries downloads for minutes offline).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import threading
from urllib.parse import urlparse

from resnet_jax.data.tfds_source import INSTALL_HINT, open_builder

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


def prepare_builder(builder, *, manual_dir=None) -> None:
    """download_and_prepare `builder` as ArrayRecord after the fast checks; raises ValueError if one fails."""
    name = builder.name
    if not tensorflow_installed():
        raise ValueError(f"Preparing {name!r} needs TensorFlow, which is not installed: {INSTALL_HINT} "
                         f"(reading prepared data does not need it).")
    manual_dir = os.fspath(manual_dir) if manual_dir else os.path.join(builder._data_dir_root, "downloads", "manual")
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
            raise ValueError(f"{name!r} must be downloaded by hand: put its files in {manual_dir} (or pass "
                             f"manual_dir=), see https://www.tensorflow.org/datasets/catalog/{name}.")
    elif not network_reachable():
        raise ValueError(f"{name!r} is not prepared in {builder._data_dir_root} and must be downloaded, but there "
                         f"is no network; prepare it on a connected machine and copy the data_dir here.")
    import tensorflow_datasets as tfds

    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def prepare(name: str, *, data_dir=None, manual_dir=None) -> str:
    """Prepare TFDS dataset `name` in `data_dir` (TFDS's default if None); returns the prepared directory."""
    builder = open_builder(name, data_dir)
    if not builder.is_prepared():
        prepare_builder(builder, manual_dir=manual_dir)
    return builder.data_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Prepare a TFDS dataset as ArrayRecord for resnet_jax.data.")
    parser.add_argument("name", help='TFDS name, e.g. "cifar10", "imagenette/320px-v2", "imagenet2012"')
    parser.add_argument("--data_dir", default=None, help="TFDS data directory (default: ~/tensorflow_datasets)")
    parser.add_argument("--manual_dir", default=None, help="where manually downloaded files are (ImageNet)")
    args = parser.parse_args(argv)
    try:
        print(prepare(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir))
    except ValueError as err:
        parser.exit(1, f"error: {err}\n")


if __name__ == "__main__":
    main()
