"""Any timm tag from the Hugging Face hub, through the real huggingface_hub against a loopback stand-in for the hub
whose repository timm itself wrote (``save_for_hf``): the weights equal timm's model loaded from that repository,
the preprocessing equals timm's reading of its config.json; offline, tampered and missing pieces are one sentence."""

import hashlib
import http.server
import os
import re
import shutil
import threading
from urllib.parse import urlparse

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from conftest import assert_close, random_batch_stats, run_python

pytestmark = pytest.mark.long  # the real huggingface_hub in fresh processes against a loopback hub

MODEL, TAG = "resnet18", "fb_ssl_yfcc100m_ft_in1k"  # a real timm tag that pretrained.py does not pin
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin")


class HubStandIn(http.server.BaseHTTPRequestHandler):
    """The two hub requests huggingface_hub makes for a file: HEAD and GET of
    ``/<org>/<repo>/resolve/<revision>/<file>``, with the headers it reads (commit, ETag: the LFS sha256 for
    weights, the git blob id for small files) and the error codes it maps to its exceptions."""

    root = None  # the directory holding <org>/<repo>/<file>

    def do_HEAD(self):
        self._serve(send_body=False)

    def do_GET(self):
        self._serve(send_body=True)

    def log_message(self, *args):
        pass

    def _serve(self, send_body):
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", urlparse(self.path).path)
        repo = self.root / match[1] if match else None
        if repo is None or not repo.is_dir():
            return self._error("RepoNotFound")
        path = repo / match[2]
        if not path.is_file():
            return self._error("EntryNotFound")
        data = path.read_bytes()
        lfs = path.suffix in LFS_SUFFIXES
        etag = (hashlib.sha256(data) if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data)).hexdigest()
        self.send_response(200)
        for key, value in {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Content-Length": str(len(data)),
                           **({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))} if lfs else {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def _error(self, code):
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A served repository timm/resnet18.<TAG> written by timm (random weights and BatchNorm statistics), and the
    base environment of a child that uses it."""
    root = tmp_path_factory.mktemp("hub")
    repo = root / "timm" / f"{MODEL}.{TAG}"
    torch.manual_seed(0)
    model = timm.create_model(f"{MODEL}.{TAG}", pretrained=False).eval()
    model.load_state_dict(random_batch_stats(model.state_dict(), 0))
    timm.models.save_for_hf(model, repo, safe_serialization=True)
    handler = type("Handler", (HubStandIn,), {"root": root})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
    yield repo, env
    server.shutdown()


def photo():
    return load_sample_image("china.jpg")[30:330, 50:480]


LOAD = f"""
    import sys
    import jax
    import numpy as np
    from sklearn.datasets import load_sample_image
    from resnet_jax import pretrained, weights_info
    model, variables = pretrained("{MODEL}.{TAG}", conv_impl="xla")
    x = weights_info("{MODEL}.{TAG}").transforms()(load_sample_image("china.jpg")[30:330, 50:480])
    np.savez(sys.argv[1], x=x, logits=np.asarray(jax.jit(model.apply)(variables, x[None])))
"""


@pytest.fixture(scope="module")
def online(hub, tmp_path_factory):
    """One child that fetched the tag from the stand-in: its huggingface_hub home and what it computed."""
    _, env = hub
    directory = tmp_path_factory.mktemp("online")
    run_python(LOAD, args=[directory / "out.npz"], env={**env, "HF_HOME": str(directory / "hf")})
    return directory / "hf", dict(np.load(directory / "out.npz"))


def test_any_timm_tag_loads_from_the_hub_as_timm_reads_it(hub, online):
    repo, _ = hub
    _, out = online

    reference = timm.create_model(f"local-dir:{repo}", pretrained=True).eval()  # timm reads the repository
    config = timm.data.resolve_data_config(model=reference, use_test_size=True)
    expected_x = timm.data.create_transform(**config)(Image.fromarray(photo()))
    np.testing.assert_array_equal(out["x"], expected_x.permute(1, 2, 0).numpy())
    with torch.no_grad():
        expected = reference(expected_x[None]).numpy()
    assert_close(out["logits"], expected, "logits")


def test_offline_uses_the_cache_and_refuses_a_tampered_or_missing_file(hub, online, tmp_path):
    _, env = hub
    home = tmp_path / "hf"
    shutil.copytree(online[0], home, symlinks=True)  # this test damages its copy
    offline = {**env, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    run_python(LOAD, args=[tmp_path / "offline.npz"], env=offline)  # from huggingface_hub's cache alone
    np.testing.assert_array_equal(np.load(tmp_path / "offline.npz")["logits"], online[1]["logits"])

    blob = next(p for p in home.rglob("blobs/*") if re.fullmatch(r"[0-9a-f]{64}", p.name))
    blob.write_bytes(blob.read_bytes()[:-8] + b"tampered")
    proc = run_python(LOAD, args=[tmp_path / "x.npz"], env=offline, check=False)
    last = proc.stderr.splitlines()[-1]
    assert proc.returncode != 0 and "did not have the sha256 the hub published" in last, last
    assert f"moved to {blob}.sha256-mismatch" in last and "run once with network access" in last, last
    assert blob.with_name(blob.name + ".sha256-mismatch").is_file() and not blob.exists()

    # online, the damaged copy is replaced by a verified one. Used to be: the message said to delete "that
    # file", the snapshot's link, and huggingface_hub linked the same damaged blob again, failing alike.
    damaged = tmp_path / "hf-damaged"
    shutil.copytree(online[0], damaged, symlinks=True)
    blob = next(p for p in damaged.rglob("blobs/*") if re.fullmatch(r"[0-9a-f]{64}", p.name))
    blob.write_bytes(blob.read_bytes()[:-8] + b"tampered")
    proc = run_python(LOAD, args=[tmp_path / "again.npz"], env={**env, "HF_HOME": str(damaged)})
    assert "A verified copy was fetched again" in proc.stderr, proc.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "again.npz")["logits"], online[1]["logits"])

    proc = run_python(LOAD, args=[tmp_path / "x.npz"], env={**offline, "HF_HOME": str(tmp_path / "empty")},
                      check=False)
    last = proc.stderr.splitlines()[-1]
    assert proc.returncode != 0 and "HF_HUB_OFFLINE is set" in last
    assert f"/timm/{MODEL}.{TAG}/resolve/main/config.json" in last and "file=PATH to pretrained" in last
    assert "Classifier.from_pretrained, even with file=, needs this config.json" in last  # no advice it ignores


def test_a_tag_published_only_as_pytorch_model_bin_loads_offline_from_the_cache(hub, tmp_path):
    """Used to be: online it loaded, offline with the file in the cache it failed ("huggingface_hub's cache has no
    copy; run once with network access"): the miss of model.safetensors ended the search."""
    repo, env = hub
    tag = "gluon_in1k"  # a real timm tag, not pinned; its repository written with the pickle only
    torch.manual_seed(1)
    model = timm.create_model(f"{MODEL}.{tag}", pretrained=False).eval()
    model.load_state_dict(random_batch_stats(model.state_dict(), 1))
    timm.models.save_for_hf(model, repo.parents[1] / "timm" / f"{MODEL}.{tag}", safe_serialization=False)
    load = LOAD.replace(f"{MODEL}.{TAG}", f"{MODEL}.{tag}")
    home = {**env, "HF_HOME": str(tmp_path / "hf")}
    run_python(load, args=[tmp_path / "online.npz"], env=home)
    run_python(load, args=[tmp_path / "offline.npz"], env={**home, "HF_HUB_OFFLINE": "1"})
    np.testing.assert_array_equal(np.load(tmp_path / "offline.npz")["logits"],
                                  np.load(tmp_path / "online.npz")["logits"])
    with torch.no_grad():
        expected = model(torch.from_numpy(np.load(tmp_path / "online.npz")["x"]).permute(2, 0, 1)[None]).numpy()
    assert_close(np.load(tmp_path / "offline.npz")["logits"], expected, "logits")


def test_a_tag_the_hub_lacks_is_named(hub, tmp_path):
    _, env = hub
    proc = run_python("""
        from resnet_jax import weights_info
        weights_info("resnet18.no_such_tag")
    """, env={**env, "HF_HOME": str(tmp_path / "hf")}, check=False)
    assert "the hub has no repository timm/resnet18.no_such_tag" in proc.stderr.splitlines()[-1]


def test_weights_the_hub_cannot_give_are_a_download_error_as_torchvisions_are(hub, tmp_path):
    """One ``except DownloadError`` covers weights from either place (the hub's was a RuntimeError only)."""
    _, env = hub
    said = run_python(f"""
        from resnet_jax import weights_info
        from resnet_jax.pretrained import DownloadError
        try:
            weights_info("{MODEL}.{TAG}")  # offline, with nothing in the cache
        except DownloadError as err:
            print(isinstance(err, RuntimeError), err)
    """, env={**env, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}).stdout
    assert said.startswith("True ") and "HF_HUB_OFFLINE is set" in said, said


def test_pinned_tags_and_user_files_need_no_huggingface_hub(hub, tmp_path):
    """Without huggingface_hub: pinned tags keep their records, a hub tag's own file loads with file=, and a hub
    tag that would need the hub says what to install."""
    repo, _ = hub
    proc = run_python(f"""
        import sys
        sys.modules["huggingface_hub"] = None  # as if it were not installed
        from resnet_jax import pretrained, weights_info
        assert weights_info("resnet50.a1_in1k").crop_size == 288
        pretrained("{MODEL}.{TAG}", file="{repo / 'model.safetensors'}")
        from resnet_jax.hub import hub_file
        for fetch in (lambda: weights_info("{MODEL}.{TAG}"), lambda: hub_file("{MODEL}", "{TAG}")):
            try:
                fetch()
            except Exception as err:
                print(type(err).__name__, err)
    """)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("HubUnavailable") and "pip install huggingface_hub" in line
                                   for line in lines), lines


def test_a_missing_user_file_is_named(tmp_path):
    from resnet_jax import pretrained

    for name in ("resnet50", f"{MODEL}.{TAG}"):
        with pytest.raises(FileNotFoundError, match="is not a file; give the path of a local copy"):
            pretrained(name, file=tmp_path / "nothing.pth")


class RefusingHub(http.server.BaseHTTPRequestHandler):
    """A server that answers every request with an HTTP error: 403 for one repository, 404 (no hub error code,
    as from a plain web server) for any other."""

    def _refuse(self):
        self.send_response(403 if "fb_ssl_yfcc100m_ft_in1k" in self.path else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _refuse

    def log_message(self, *args):
        pass


def test_a_server_that_answers_with_an_error_is_not_called_no_network(tmp_path):
    """huggingface_hub reports a 403 or a 404 from HF_ENDPOINT as "not in the local cache"; the error says that
    the server answered, with what, and what to check, instead of advising network access."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    try:
        proc = run_python(f"""
            from resnet_jax import weights_info
            for name in ("{MODEL}.{TAG}", "resnet50.other_tag"):
                try:
                    weights_info(name)
                except Exception as err:
                    print(type(err).__name__, err)
        """, env=env)
    finally:
        server.shutdown()
        server.server_close()
    refused, missing = proc.stdout.splitlines()
    host = endpoint.removeprefix("http://")
    assert refused.startswith(f"HubUnavailable the server at {host} answered HTTP 403 for {endpoint}/timm/{MODEL}.{TAG}"
                              f"/resolve/main/config.json: it refuses access")
    assert "check your token (HF_TOKEN" in refused
    assert missing.startswith(f"HubUnavailable the server at {host} answered HTTP 404 for {endpoint}/timm/resnet50."
                              "other_tag/resolve/main/config.json: it has no such file")
    for line in (refused, missing):
        assert f"HF_ENDPOINT (now {endpoint!r})" in line and "not a missing network" in line
        assert "run once with network access" not in line and "file=PATH" in line


def test_a_local_copy_of_a_hub_tag_keeps_its_own_head(tmp_path):
    """A hub tag's head size comes from its config.json, which a local copy (``file=``) is loaded without: the
    file's own head is used, and the logits equal timm's model of that head (an 11-class head was refused as a
    mismatch against 1000)."""
    from safetensors.torch import save_file

    from resnet_jax import pretrained

    torch.manual_seed(0)
    reference = timm.create_model(MODEL, num_classes=11).eval()
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    model, variables = pretrained(f"{MODEL}.{TAG}", file=tmp_path / "model.safetensors")
    assert model.num_classes == 11
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    assert_close(model.apply(variables, x, train=False), expected, "logits")
