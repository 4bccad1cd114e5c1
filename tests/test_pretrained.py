"""Published weights: the table matches torchvision's, and the download path against a real local HTTP server."""

import hashlib
import http.server
import threading

import numpy as np
import pytest
import torch
import torchvision

from resnet_jax.pretrained import WEIGHTS, DownloadError, Weights, download, pretrained, weights_info
from resnet_jax.torchvision import to_torchvision


def test_table_matches_torchvision():
    """Every torchvision weight enum of the family, with its URL, preprocessing, accuracy and class names."""
    for name, tags in WEIGHTS.items():
        enum = torchvision.models.get_model_weights(name)
        assert {e.name for e in enum} | {"DEFAULT"} == set(tags), name
        for tag, ours in tags.items():
            ref = enum.DEFAULT if tag == "DEFAULT" else enum[tag]
            transforms = ref.transforms()
            assert ours.url == ref.url
            assert ours.url.endswith(f"-{ours.sha256[:8]}.pth")  # torchvision's names carry the digest's prefix
            assert [ours.resize_size] == transforms.resize_size and [ours.crop_size] == transforms.crop_size
            assert ours.mean == tuple(transforms.mean) and ours.std == tuple(transforms.std)
            assert ours.acc1 == ref.meta["_metrics"]["ImageNet-1K"]["acc@1"]
            assert ours.categories == ref.meta["categories"]
    from resnet_jax import list_models

    assert set(WEIGHTS) == {n for n in list_models() if hasattr(torchvision.models, n)}


def test_weights_info_errors_are_clear():
    with pytest.raises(ValueError, match="no published torchvision weights for 'resnet5'.*'resnet50'"):
        weights_info("resnet5")
    with pytest.raises(ValueError, match=r"resnet18 has no weights 'IMAGENET1K_V2'; choose one of"):
        weights_info("resnet18", "IMAGENET1K_V2")
    assert weights_info("resnet50", "ResNet50_Weights.IMAGENET1K_V1").resize_size == 256
    assert weights_info("resnet50").tag == "IMAGENET1K_V2"


class Server:
    """A real HTTP server on 127.0.0.1 serving ``files``; paths under /cut/ send half the body, then hang up."""

    def __init__(self, files):
        files = dict(files)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                cut = self.path.startswith("/cut/")
                body = files.get(self.path.removeprefix("/cut") if cut else self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if cut else body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def payload():
    return np.random.default_rng(0).bytes(300_000)


@pytest.fixture
def server(payload):
    s = Server({"/w/file.bin": payload})
    yield s
    s.stop()


def sha(data):
    return hashlib.sha256(data).hexdigest()


def test_download_verifies_and_caches(tmp_path, server, payload):
    path = download(f"{server.url}/w/file.bin", sha(payload), cache_dir=tmp_path)
    assert path == tmp_path / "file.bin" and path.read_bytes() == payload
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary file left behind
    assert download(f"{server.url}/w/file.bin", sha(payload)[:8], cache_dir=tmp_path) == path  # prefix is enough


def test_cache_hit_needs_no_network(tmp_path, server, payload):
    url = f"{server.url}/w/file.bin"
    download(url, sha(payload), cache_dir=tmp_path)
    server.stop()
    assert download(url, sha(payload), cache_dir=tmp_path).read_bytes() == payload


def test_wrong_hash_discards_the_file(tmp_path, server, payload):
    wrong = sha(b"something else")
    with pytest.raises(ValueError, match=f"has sha256 {sha(payload)}, expected {wrong}; it was discarded"):
        download(f"{server.url}/w/file.bin", wrong, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_damaged_cached_file_is_fetched_again(tmp_path, server, payload):
    (tmp_path / "file.bin").write_bytes(payload[:1000])
    assert download(f"{server.url}/w/file.bin", sha(payload), cache_dir=tmp_path).read_bytes() == payload


def test_interrupted_transfer_leaves_nothing(tmp_path, server, payload):
    with pytest.raises(DownloadError, match="interrupted.*nothing was kept"):
        download(f"{server.url}/cut/w/file.bin", sha(payload), cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_offline_error_says_what_to_fetch_and_where(tmp_path, server, payload):
    url = f"{server.url}/w/file.bin"
    server.stop()
    with pytest.raises(DownloadError) as info:
        download(url, sha(payload), cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert f"could not download {url}" in msg
    assert f"put it at {tmp_path / 'cache' / 'file.bin'}" in msg
    assert "RESNET_JAX_WEIGHTS_MIRROR" in msg
    assert not (tmp_path / "cache" / "file.bin").exists()


def test_missing_file_on_server_is_a_clear_error(tmp_path, server):
    with pytest.raises(DownloadError, match="could not download .*/w/nope.bin.*Not Found"):
        download(f"{server.url}/w/nope.bin", "0" * 64, cache_dir=tmp_path)


def test_short_digest_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 8 hex digits"):
        download("http://127.0.0.1:9/x.pth", "abc", cache_dir=tmp_path)


def test_pretrained_end_to_end_from_a_mirror(tmp_path, monkeypatch):
    """pretrained() downloads a real .pth from a mirror, verifies it, caches it, and converts it; then works
    from the cache with the mirror gone. The entry is a test row in the real table (no published file is
    reachable from a test)."""
    tm = torchvision.models.resnet18().eval()
    torch.save(tm.state_dict(), tmp_path / "src.pth")
    data = (tmp_path / "src.pth").read_bytes()
    filename = f"resnet18-{sha(data)[:8]}.pth"
    monkeypatch.setitem(WEIGHTS["resnet18"], "TEST", Weights("resnet18", "TEST", filename, sha(data), 0.0))
    mirror = Server({f"/mirror/{filename}": data})
    monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RESNET_JAX_WEIGHTS_MIRROR", f"{mirror.url}/mirror/")
    try:
        model, variables = pretrained("resnet18", "TEST", progress=False)
    finally:
        mirror.stop()
    assert (tmp_path / "cache" / filename).read_bytes() == data
    expected = {k: v.numpy() for k, v in tm.state_dict().items()}
    for k, v in to_torchvision(variables).items():
        np.testing.assert_array_equal(v, expected[k], err_msg=k)
    _, again = pretrained("resnet18", "TEST", cache_dir=tmp_path / "cache", mirror="http://127.0.0.1:9")
    assert to_torchvision(again).keys() == expected.keys()


def test_pretrained_offline_names_the_official_file(tmp_path, monkeypatch):
    monkeypatch.delenv("RESNET_JAX_WEIGHTS_MIRROR", raising=False)
    dead = Server({})
    dead.stop()  # a port that was just closed: connection refused, as with no network
    with pytest.raises(DownloadError) as info:
        pretrained("resnet50", cache_dir=tmp_path, mirror=dead.url, progress=False)
    assert f"{dead.url}/resnet50-11ad3fa6.pth" in str(info.value)
    assert str(tmp_path / "resnet50-11ad3fa6.pth") in str(info.value)

