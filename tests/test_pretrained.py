"""Published weights: the table matches torchvision's, and the download path against a real local HTTP server."""

import hashlib
import http.server
import os
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torchvision

from conftest import run_python
from resnet_jax.pretrained import WEIGHTS, DownloadError, Weights, download, pretrained, weights_info
from resnet_jax.torchvision import to_torchvision

pretrained_module = sys.modules["resnet_jax.pretrained"]  # the package exports the function by that name


def torchvision_rows(tags):
    return {tag: w for tag, w in tags.items() if w.naming == "torchvision"}


def test_table_matches_torchvision():
    """Every torchvision weight enum of the family, with its URL, preprocessing, accuracy and class names."""
    for name, tags in WEIGHTS.items():
        if not torchvision_rows(tags):
            continue
        enum = torchvision.models.get_model_weights(name)
        assert {e.name for e in enum} | {"DEFAULT"} == set(torchvision_rows(tags)), name
        for tag, ours in torchvision_rows(tags).items():
            ref = enum.DEFAULT if tag == "DEFAULT" else enum[tag]
            transforms = ref.transforms()
            assert ours.url == ref.url
            assert ours.url.endswith(f"-{ours.sha256[:8]}.pth")  # torchvision's names carry the digest's prefix
            assert [ours.resize_size] == transforms.resize_size and [ours.crop_size] == transforms.crop_size
            assert ours.mean == tuple(transforms.mean) and ours.std == tuple(transforms.std)
            assert ours.acc1 == ref.meta["_metrics"]["ImageNet-1K"]["acc@1"]
            assert ours.categories == ref.meta["categories"]
    from resnet_jax import list_models

    assert {n for n, tags in WEIGHTS.items() if torchvision_rows(tags)} == {
        n for n in list_models() if hasattr(torchvision.models, n)}


def test_timm_rows_match_timm():
    """Each timm entry is a real pretrained tag of a shared architecture, with timm's own evaluation
    preprocessing (the size and crop its published top-1 was measured at), a full digest and a hub URL."""
    timm = pytest.importorskip("timm")
    from resnet_jax.torchvision import TIMM_MODELS

    rows = [w for tags in WEIGHTS.values() for tag, w in tags.items() if w.naming == "timm" and tag != "DEFAULT"]
    assert len(rows) >= 9
    for w in rows:
        cfg = timm.models.get_pretrained_cfg(f"{w.model}.{w.tag}").to_dict()
        assert w.model in TIMM_MODELS and cfg["hf_hub_id"] == f"timm/{w.model}.{w.tag}"
        size = cfg.get("test_input_size", cfg["input_size"])[-1]
        crop = cfg.get("test_crop_pct", cfg["crop_pct"])
        assert (w.crop_size, w.resize_size) == (size, int(size / crop)), w
        assert (w.interpolation, w.mean, w.std) == (cfg["interpolation"], cfg["mean"], cfg["std"]), w
        assert cfg["num_classes"] == len(w.categories) == 1000
        assert len(w.sha256) == 64 and int(w.sha256, 16) >= 0
        assert w.url.startswith(f"https://huggingface.co/timm/{w.model}.{w.tag}/resolve/")
        assert w.url.endswith(("/model.safetensors", "/pytorch_model.bin"))
    for name in ("resnet18d", "resnet50d", "resnet101d", "resnet152d"):  # no torchvision weights: timm's default
        assert weights_info(name).naming == "timm"
    assert weights_info("resnet50").tag == "IMAGENET1K_V2"  # torchvision's default stays
    assert weights_info("resnet50", "resnet50.a1_in1k").acc1 == 81.214  # timm's own spelling of a tag


def test_weights_info_errors_are_clear():
    with pytest.raises(ValueError, match="no published weights for 'resnet5'.*'resnet50'"):
        weights_info("resnet5")
    with pytest.raises(ValueError, match=r"resnet18 has no weights 'IMAGENET1K_V2'; choose one of"):
        weights_info("resnet18", "IMAGENET1K_V2")
    assert weights_info("resnet50", "ResNet50_Weights.IMAGENET1K_V1").resize_size == 256
    assert weights_info("resnet50").tag == "IMAGENET1K_V2"


class Server:
    """A real HTTP server on 127.0.0.1 serving ``files``; paths under /cut/ send half the body, then hang up; under
    /badlen/ the body with a Content-Length that is not a number; under /slow/ the right Content-Length, then a
    byte every 50 ms (for 20 s at most); /status/<code>/... answers that HTTP error, /loop/... redirects to itself."""

    def __init__(self, files):
        files = dict(files)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/status/"):
                    self.send_error(int(self.path.split("/")[2]))
                    return
                if self.path.startswith("/loop/"):
                    self.send_response(302)
                    self.send_header("Location", self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                mode, _, rest = self.path[1:].partition("/")
                special = mode in ("cut", "badlen", "slow")
                body = files.get(f"/{rest}" if special else self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", "abc" if mode == "badlen" else str(len(body)))
                self.end_headers()
                if mode == "slow":
                    try:
                        for i in range(400):  # until the client gives up
                            self.wfile.write(body[i:i + 1])
                            self.wfile.flush()
                            time.sleep(0.05)
                    except OSError:
                        pass
                    return
                self.wfile.write(body[: len(body) // 2] if mode == "cut" else body)
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


def test_a_downloaded_file_gets_an_ordinary_file_s_permissions(tmp_path, server, payload):
    """mkstemp makes its file 0600, which the rename kept: a cache shared by a team (or filled as root while
    building an image) held weights other users could not read. It gets what open() gives, as torch.save's."""
    path = download(f"{server.url}/w/file.bin", sha(payload), cache_dir=tmp_path)
    (tmp_path / "ordinary").write_bytes(b"")
    assert path.stat().st_mode & 0o777 == (tmp_path / "ordinary").stat().st_mode & 0o777 != 0o600


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
    with pytest.warns(UserWarning, match="moved to"):
        assert download(f"{server.url}/w/file.bin", sha(payload), cache_dir=tmp_path).read_bytes() == payload


def test_a_mismatching_file_in_the_cache_is_moved_aside_not_deleted(tmp_path, server, payload):
    """A file put in the cache by hand with another digest is kept as <name>.sha256-mismatch (replacing an older
    one), and the error (offline) or the warning (downloaded) names it with both digests."""
    url, mine = f"{server.url}/w/file.bin", b"my own fine-tuned weights"
    target, aside = tmp_path / "file.bin", tmp_path / "file.bin.sha256-mismatch"
    aside.write_bytes(b"an older mismatch")
    target.write_bytes(mine)
    dead = Server({})
    dead.stop()
    with pytest.raises(DownloadError) as info:
        download(f"{dead.url}/w/file.bin", sha(payload), cache_dir=tmp_path)
    msg = str(info.value)
    assert f"put it at {target}" in msg  # the offline advice stands
    assert f"The file that was already at {target} has sha256 {sha(mine)}, not the expected {sha(payload)}" in msg
    assert f"not deleted but moved to {aside}" in msg
    assert aside.read_bytes() == mine and not target.exists()

    target.write_bytes(mine + b"!")
    with pytest.warns(UserWarning, match=f"has sha256 {sha(mine + b'!')}, not the expected one starting with "
                                         f"{sha(payload)[:8]}: it was not deleted but moved to"):
        assert download(url, sha(payload)[:8], cache_dir=tmp_path).read_bytes() == payload
    assert aside.read_bytes() == mine + b"!"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin", "file.bin.sha256-mismatch"]

    target.write_bytes(mine)
    with pytest.raises(ValueError, match=f"it was discarded.*not deleted but moved to {aside}"):
        download(url, sha(b"something else"), cache_dir=tmp_path)  # the download fails its digest: discarded
    assert aside.read_bytes() == mine and not target.exists()


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
    host = server.url.removeprefix("http://")
    with pytest.raises(DownloadError, match=f"the server at {host} answered HTTP 404 .Not Found. for .*/w/nope.bin"):
        download(f"{server.url}/w/nope.bin", "0" * 64, cache_dir=tmp_path)


@pytest.mark.parametrize("path, code, what", [
    ("/status/403/file.bin", 403, "it refuses access"),
    ("/status/500/file.bin", 500, "it is failing or busy"),
    ("/status/429/file.bin", 429, "it is failing or busy"),
    ("/status/404/file.bin", 404, "it has no such file"),
    ("/loop/file.bin", 302, "it redirects in a loop"),
])
def test_http_errors_are_not_reported_as_no_network(tmp_path, server, monkeypatch, path, code, what):
    """A server that answers, with an error or a redirect loop, is named with its answer and what to check; the
    advice for a missing network is kept for connections that fail."""
    monkeypatch.setenv("RESNET_JAX_WEIGHTS_MIRROR", server.url)
    url, host = f"{server.url}{path}", server.url.removeprefix("http://")
    with pytest.raises(DownloadError) as info:
        download(url, "0" * 64, cache_dir=tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"the server at {host} answered HTTP {code} ") and f" for {url}: {what}" in msg
    assert f"$RESNET_JAX_WEIGHTS_MIRROR (now {server.url!r})" in msg and "the name file.bin" in msg
    assert f"put it at {tmp_path / 'file.bin'}" in msg
    assert "could not download" not in msg and "Without network" not in msg
    assert list(tmp_path.iterdir()) == []


def test_a_content_length_that_is_not_a_number_is_read_as_unknown(tmp_path, server, payload):
    path = download(f"{server.url}/badlen/w/file.bin", sha(payload), cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == payload


def test_a_trickling_server_is_abandoned_as_stalled(tmp_path, server, payload, monkeypatch):
    """The read timeout bounds each read only; a server sending a byte every 50 ms is dropped once a window passes
    with too few bytes (here 0.2 s and 10 kB, in place of 2 minutes and 64 KiB)."""
    monkeypatch.setattr(pretrained_module, "_STALL_WINDOW_S", 0.2)
    monkeypatch.setattr(pretrained_module, "_STALL_MIN_BYTES", 10_000)
    with pytest.raises(DownloadError, match=r"download of .*/slow/w/file.bin stalled: only \d+ bytes arrived in the "
                                            r"last \d+ s \(\d+ of 300000 in all\); nothing was kept"):
        download(f"{server.url}/slow/w/file.bin", sha(payload), cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_cache_dir_that_is_a_file_is_named(tmp_path, server, payload):
    blocker = tmp_path / "cache"
    blocker.write_text("not a directory")
    for cache, where in ((blocker, "is a file"), (blocker / "sub", f"cannot be a directory: {blocker} is a file")):
        with pytest.raises(NotADirectoryError, match=f"the weights cache {cache} {where}; give cache_dir= or "
                                                     r"\$RESNET_JAX_CACHE a directory, or move that file away"):
            download(f"{server.url}/w/file.bin", sha(payload), cache_dir=cache)
    assert blocker.read_text() == "not a directory"


def test_a_cache_that_cannot_be_written_is_named_with_what_to_do(tmp_path, server, payload):
    """Used to be: a full disk mid-download said the download "was interrupted ... Try again" (the network was
    blamed), and a read-only cache raised a bare OSError naming a .part file. A child whose file-size limit
    (EFBIG, a real failed write) stops the 300 kB download: one sentence naming the cache and what to do, and
    nothing left in it."""
    cache = tmp_path / "cache"
    proc = run_python(f"""
        import resource, signal
        from resnet_jax.pretrained import download
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            download({server.url + "/w/file.bin"!r}, {sha(payload)!r}, cache_dir={str(cache)!r}, progress=False)
        except OSError as err:
            print(type(err).__name__, err)
    """)
    assert proc.stdout.startswith(f"OSError cannot write into the weights cache {cache} (File too large); nothing "
                                  "was kept. Free space there, or give cache_dir= or $RESNET_JAX_CACHE a writable "
                                  f"directory, or put a copy of the file fetched by other means at {cache}/file.bin"), \
        proc.stdout + proc.stderr
    assert list(cache.iterdir()) == []


def test_stale_part_files_of_killed_downloads_are_removed(tmp_path, server, payload):
    """A download killed outright leaves its .<name>.XXXXXXXX.part behind; the next download of that file removes
    those a day old. Younger ones (possibly a live download's), other files' and other names are left alone."""
    day_old = time.time() - 25 * 3600
    names = [".file.bin.abcd_123.part", ".file.bin.zz99zz99.part", ".other.bin.abcd_123.part", "notes.part",
             ".file.bin.part"]
    for name in names:
        (tmp_path / name).write_bytes(b"partial")
        os.utime(tmp_path / name, (day_old, day_old))
    (tmp_path / ".file.bin.fresh123.part").write_bytes(b"being written")
    download(f"{server.url}/w/file.bin", sha(payload), cache_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".file.bin.fresh123.part", ".other.bin.abcd_123.part", "notes.part", ".file.bin.part", "file.bin"])


@pytest.mark.parametrize("digest", ["abc", "zzzzzzzzzz", " 1871b7a0", "1871b7a0" * 9])
def test_a_digest_that_is_not_one_is_refused_before_downloading(tmp_path, digest):
    """Used to be: only the length was checked, so a non-hex digest fetched the whole file first (port 9 here
    refuses connections: a download attempt fails otherwise)."""
    with pytest.raises(ValueError, match="at least 8 hex digits"):
        download("http://127.0.0.1:9/x.pth", digest, cache_dir=tmp_path)


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


def test_a_mirror_may_be_a_directory(tmp_path, monkeypatch):
    """A copy on a shared drive: ``mirror="/mnt/weights"`` failed with urllib's "unknown url type", without the
    advice the download errors give. A directory is read as a file:// URL, checked and cached the same."""
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "src.pth")
    data = (tmp_path / "src.pth").read_bytes()
    filename = f"resnet18-{sha(data)[:8]}.pth"
    monkeypatch.setitem(WEIGHTS["resnet18"], "TEST", Weights("resnet18", "TEST", filename, sha(data), 0.0))
    (tmp_path / "drive").mkdir()
    (tmp_path / "drive" / filename).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    pretrained("resnet18", "TEST", cache_dir=tmp_path / "cache", mirror="drive", progress=False)
    assert (tmp_path / "cache" / filename).read_bytes() == data
    with pytest.raises(DownloadError, match=r"file://.*/elsewhere/resnet18-"):
        pretrained("resnet18", "TEST", cache_dir=tmp_path / "other", mirror=str(tmp_path / "elsewhere"), progress=False)


def test_pretrained_offline_names_the_official_file(tmp_path, monkeypatch):
    monkeypatch.delenv("RESNET_JAX_WEIGHTS_MIRROR", raising=False)
    dead = Server({})
    dead.stop()  # a port that was just closed: connection refused, as with no network
    with pytest.raises(DownloadError) as info:
        pretrained("resnet50", cache_dir=tmp_path, mirror=dead.url, progress=False)
    assert f"{dead.url}/resnet50-11ad3fa6.pth" in str(info.value)
    assert str(tmp_path / "resnet50-11ad3fa6.pth") in str(info.value)



def test_pretrained_timm_entry_end_to_end(tmp_path, monkeypatch):
    """A timm entry downloads from a mirror, is checked, cached under its own name, and loads with timm's names
    (a ResNet-D file, whose names only load_timm maps). The entry is a test row: no hub file is reachable."""
    timm = pytest.importorskip("timm")
    import safetensors.torch

    tm = timm.create_model("resnet18d").eval()
    safetensors.torch.save_file(tm.state_dict(), tmp_path / "src.safetensors")
    data = (tmp_path / "src.safetensors").read_bytes()
    entry = Weights("resnet18d", "test_in1k", "resnet18d.test_in1k.safetensors", sha(data), 0.0, naming="timm",
                    origin="http://127.0.0.1:9/timm/resnet18d.test_in1k/resolve/main/model.safetensors")
    monkeypatch.setitem(WEIGHTS["resnet18d"], "test_in1k", entry)
    monkeypatch.delenv("RESNET_JAX_WEIGHTS_MIRROR", raising=False)
    mirror = Server({f"/m/{entry.filename}": data})
    try:
        model, variables = pretrained("resnet18d", "test_in1k", cache_dir=tmp_path / "cache",
                                      mirror=f"{mirror.url}/m", progress=False)
    finally:
        mirror.stop()
    assert (tmp_path / "cache" / entry.filename).read_bytes() == data
    from resnet_jax.torchvision import to_timm

    for k, v in tm.state_dict().items():
        np.testing.assert_array_equal(to_timm(model, variables)[k], v.numpy(), err_msg=k)
    with pytest.raises(DownloadError, match=r"could not download http://127\.0\.0\.1:9/timm/resnet18d"):
        pretrained("resnet18d", "test_in1k", cache_dir=tmp_path / "elsewhere", progress=False)


def test_torchvision_weights_enum_members_name_their_tag(tmp_path):
    """torchvision's own ``ResNet18_Weights.IMAGENET1K_V1`` (an Enum member, read without importing torch) works
    wherever its string does; another model's member, or anything not a tag, is refused."""
    from resnet_jax.training.classifier import Classifier

    members = torchvision.models
    v1 = members.ResNet18_Weights.IMAGENET1K_V1
    assert weights_info("resnet18", v1) == weights_info("resnet18", "IMAGENET1K_V1")
    assert weights_info("resnet18.IMAGENET1K_V1", v1) == weights_info("resnet18", "IMAGENET1K_V1")
    assert weights_info("resnet50", members.ResNet50_Weights.DEFAULT) == weights_info("resnet50")
    assert weights_info("resnext50_32x4d", members.ResNeXt50_32X4D_Weights.IMAGENET1K_V2).tag == "IMAGENET1K_V2"
    assert weights_info("wide_resnet50_2", members.Wide_ResNet50_2_Weights.IMAGENET1K_V1).tag == "IMAGENET1K_V1"
    for other in (members.ResNet50_Weights.IMAGENET1K_V1, "ResNet50_Weights.IMAGENET1K_V1"):
        with pytest.raises(ValueError, match="'ResNet50_Weights.IMAGENET1K_V1' are not resnet18's"):
            weights_info("resnet18", other)  # once silently resnet18's own V1
    for bad in (None, 1, ["IMAGENET1K_V1"]):
        with pytest.raises(TypeError, match=r"weights must be a tag string .* or a torchvision weights enum member"):
            weights_info("resnet18", bad)

    tm = torchvision.models.resnet18().eval()
    torch.save(tm.state_dict(), tmp_path / "resnet18.pth")
    _, variables = pretrained("resnet18", v1, file=tmp_path / "resnet18.pth")
    for k, v in to_torchvision(variables).items():
        np.testing.assert_array_equal(v, tm.state_dict()[k].numpy(), err_msg=k)
    clf = Classifier.from_pretrained("resnet18", v1, file=tmp_path / "resnet18.pth")
    assert clf.config.init_from == "resnet18.IMAGENET1K_V1"


def test_misspelt_tags_and_models_without_weights_get_true_advice(monkeypatch):
    """Used to be: "imagenet1k_v2" or "V2" went to the hub as timm tags (offline: "run once with network
    access"), and timm's resnet26d was told to load a file with load_timm, which refuses it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for tag in ("imagenet1k_v2", "V2"):
        with pytest.raises(ValueError, match=r"resnet50 has no weights '.*'; did you mean 'IMAGENET1K_V2'"):
            weights_info("resnet50", tag)
    with pytest.raises(ValueError, match=r"'resnet26d' is not a model resnet_jax builds") as info:
        weights_info("resnet26d.a1_in1k")
    assert "load_timm" not in str(info.value)
    with pytest.raises(ValueError, match=r"any other model of resnet_jax .* with load_torchvision\.$"):
        weights_info("resnet20")
    for args in (("resnet50.",), ("resnet50", ""), ("resnet50", " ")):  # was huggingface_hub's HFValidationError
        with pytest.raises(ValueError, match=r"the weights' tag is empty in 'resnet50.*; give 'resnet50' alone"):
            weights_info(*args)
