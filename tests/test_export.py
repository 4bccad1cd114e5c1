"""resnet_jax.export: StableHLO and ONNX artifacts of a trained digits model (the session's one, shared with
tests/test_classifier.py) and of a ResNet-50 at a fraction of its depth (random weights, non-trivial BatchNorm
statistics, 1000 classes) equal ``model.apply``; the StableHLO one runs in a process that cannot import
resnet_jax; ``train.predict`` gives the same top-5 on each artifact as on the workdir; bad artifacts and bad
inputs get one sentence each."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, random_batch_stats, random_variables, run_python
from resnet_jax import create_model, data
from resnet_jax.export import FORMAT_VERSION, ArtifactError, Preprocessing, export_model, load_exported
from resnet_jax.training.classifier import Classifier
from test_classifier import trained_digits
from training_helpers import once_per_session, worker_env

# Runs the StableHLO artifact with jax alone: any import of resnet_jax fails, as on a machine without it.
BLOCKED_RUNNER = r"""
import importlib.abc, json, sys
import numpy as np

class NoResnetJax(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "resnet_jax" or name.startswith("resnet_jax."):
            raise ImportError("resnet_jax is blocked in this process")

sys.meta_path.insert(0, NoResnetJax())
artifact, inputs, outputs = sys.argv[1:4]
import jax
from jax import export

manifest = json.load(open(artifact + ".json"))
assert manifest["format_version"] == 1 and manifest["format"] == "stablehlo", manifest
exported = export.deserialize(bytearray(open(artifact, "rb").read()))
batches = np.load(inputs)
np.savez(outputs, **{name: np.asarray(exported.call(batches[name])) for name in batches.files})
try:
    import resnet_jax
except ImportError:
    print("blocked:", sorted(m for m in sys.modules if m.startswith("resnet_jax")))
"""


FORMATS = ("stablehlo", "onnx")
# One block per stage and a second, identity-shortcut block after layer2's stride-2 one: each layer and shortcut
# kind a model has, at a fraction of its depth (as in tests/test_timm.py).
SMALL = (1, 2, 1, 1)

# Runs a command-line module's main() once per argument list in one process (absl's flags parsed afresh for each,
# as `python -m MODULE ARGS...` parses them) and prints one JSON line per run: its return code, stdout, stderr.
CLI_RUNNER = r"""
import contextlib, io, json, sys
from absl import flags

name, runs = sys.argv[1], json.loads(sys.argv[2])
module = __import__(name, fromlist=["main"])
for args in runs:
    flags.FLAGS.unparse_flags()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = module.main(flags.FLAGS([name, *args]))
        except SystemExit as exit:  # a usage error exits, as it does from the command line
            code = exit.code
    print(json.dumps({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}))
"""


def cli_runs(module, *runs):
    """``[{"code", "stdout", "stderr"}, ...]``: ``module``'s main run with each argument list, in one child."""
    proc = run_python(CLI_RUNNER, args=[module, json.dumps([[str(a) for a in args] for args in runs])],
                      env=worker_env(), timeout=600)
    return [json.loads(line) for line in proc.stdout.strip().splitlines()[-len(runs):]]


def random_bottleneck(directory):
    """A ResNet-50 with one bottleneck block per stage and a second (identity-shortcut) one after layer2's
    stride-2 one: every layer and shortcut kind ResNet-50 has, at 64x64 with 1000 classes, random weights and
    trained-like BatchNorm, saved as ``directory / "workdir"``."""
    clf = Classifier("resnet50", num_classes=1000, image_size=64, normalize="imagenet",
                     model_overrides={"stage_sizes": SMALL})
    clf.variables = random_variables(clf.model, (1, 64, 64, 3))
    clf.save(directory / "workdir")
    return {}


def session_run(tmp_path_factory, name, workdir):
    """``(classifier loaded from workdir, {format: artifact})``, exported once per test session (pytest-xdist
    workers share them), as a user would: load the workdir, then export it."""
    def compute(directory):
        clf = Classifier.load(workdir)
        for fmt in FORMATS:
            clf.export(directory / f"{name}.{fmt}")
        return {}

    directory, _ = once_per_session(tmp_path_factory, f"export_{name}", compute)
    return Classifier.load(workdir), {fmt: directory / f"{name}.{fmt}" for fmt in FORMATS}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    clf, artifacts = session_run(tmp_path_factory, "digits", trained_digits(tmp_path_factory)[0])
    src = data.get_source("digits", "validation", image_size=8)
    images = np.stack([src[i]["image"][:, :, 0] for i in range(7)])  # (7, 8, 8): a greyscale batch
    return clf, images, artifacts


@pytest.fixture(scope="module")
def bottleneck_run(tmp_path_factory):
    directory, _ = once_per_session(tmp_path_factory, "random_bottleneck", random_bottleneck)
    clf, artifacts = session_run(tmp_path_factory, "bottleneck", directory / "workdir")
    return clf, np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8), artifacts


@pytest.fixture(scope="module", params=["digits", "bottleneck"])
def run(request):
    """(classifier, images in a form predict accepts, {format: artifact path})."""
    return request.getfixturevalue(f"{request.param}_run")


@pytest.fixture(scope="module")
def artifacts(run):
    return run[2]


_compiled = {}  # id(model) -> (model, its jitted apply); the model is kept so that its id is not reused


def apply(model, variables, x):
    """``model.apply(variables, x)``, compiled once per model and batch shape (not run op by op)."""
    if id(model) not in _compiled:
        _compiled[id(model)] = (model, jax.jit(model.apply))
    return _compiled[id(model)][1](variables, x)


def reference_logits(clf, batch):
    """``model.apply`` on the batch as evaluation normalises it (unfolded model, its own conv_impl)."""
    return np.asarray(apply(clf.model, clf.variables, data.normalize(batch, *clf._stats())))


@pytest.mark.long  # a fresh Python process per check
def test_the_base_install_declares_what_stablehlo_artifacts_need():
    """jax.export's serialize/deserialize import flatbuffers, which jax leaves optional; the dev extra brings it
    by way of onnxruntime and tensorflow, so a base install (Colab's ``pip install``) failed to export or load
    a .stablehlo artifact while every test passed. The base requirements must name it."""
    import importlib.metadata

    base = [r for r in importlib.metadata.requires("resnet-jax") if "extra ==" not in r]
    assert any(re.match(r"flatbuffers\b", r) for r in base), base
    from jax._src.export import serialization  # the module that needs it, so this list stays true

    assert "flatbuffers" in serialization.__dict__


def test_stablehlo_runs_without_resnet_jax_and_equals_model_apply(run, artifacts, tmp_path):
    clf, images, _ = run
    batch = load_exported(artifacts["stablehlo"]).prepare(images)
    batches = {"one": batch[:1], "many": batch}
    np.savez(tmp_path / "in.npz", **batches)
    proc = run_python(BLOCKED_RUNNER, args=[artifacts["stablehlo"], tmp_path / "in.npz", tmp_path / "out.npz"],
                      env=worker_env(), timeout=600)
    assert proc.stdout.strip() == "blocked: []"  # resnet_jax could not be imported and never was
    got = np.load(tmp_path / "out.npz")
    for name, b in batches.items():
        want = reference_logits(clf, b)
        assert got[name].shape == want.shape == (len(b), clf.num_classes)
        # float32 rounding (~1e-5 of the logits' scale for the bottleneck model): folding reorders the arithmetic, and the
        # model's own conv_impl may be Winograd's; the same bound as tests/test_ops_fold.py
        np.testing.assert_allclose(got[name], want, atol=5e-5 * np.abs(want).max(), rtol=0)


def test_onnx_in_onnxruntime_equals_model_apply(run, artifacts):
    clf, images, _ = run
    model = load_exported(artifacts["onnx"])
    batch = model.prepare(images)
    for b in (batch[:1], batch[:3], batch):
        want = reference_logits(clf, b)
        np.testing.assert_allclose(model.run(b), want, atol=1e-4 * np.abs(want).max(), rtol=0)


def top5(stdout):
    """{label: [class names]} from train.predict's output (probabilities are printed rounded)."""
    out, label = {}, None
    for line in stdout.splitlines():
        if line.startswith("  "):
            out[label].append(line.split()[-1])
        else:
            label = line.strip()
            out[label] = []
    return out


@pytest.mark.long  # a fresh Python process per check
def test_train_predict_gives_the_same_top5_on_each_artifact_as_on_the_workdir(run, artifacts, tmp_path):
    clf, images, _ = run
    np.save(tmp_path / "batch.npy", images)  # the digits as (N, 8, 8), the bottleneck's as (N, 64, 64, 3)
    from PIL import Image

    Image.fromarray(images[0]).save(tmp_path / "one.png")
    inputs = [tmp_path / "batch.npy", tmp_path / "one.png"]
    sources = [f"--workdir={clf.workdir}", *(f"--artifact={path}" for path in artifacts.values())]
    results = cli_runs("train.predict", *([source, *inputs] for source in sources))
    assert [r["code"] for r in results] == [0] * len(sources), results
    want, *got = [top5(r["stdout"]) for r in results]
    assert len(want) == len(images) + 1 and all(len(v) == 5 for v in want.values())
    assert want[f"{inputs[0]}[0]"] == want[str(inputs[1])]
    assert got == [want] * len(artifacts)
    if clf.config.model == "resnet20":  # trained: the digits are mostly recognised
        labels = [data.get_source("digits", "validation", image_size=8)[i]["label"] for i in range(len(images))]
        assert sum(want[f"{inputs[0]}[{i}]"][0] == str(label) for i, label in enumerate(labels)) >= 5


def test_artifacts_carry_class_names_and_predict_like_the_classifier(run, artifacts):
    clf, images, _ = run
    want = clf.predict(images)
    for path in artifacts.values():
        model = load_exported(path)
        assert model.class_names == clf.class_names
        got = model.predict(list(images))  # a list of single images
        assert [[n for n, _ in row] for row in got] == [[n for n, _ in row] for row in want]
        np.testing.assert_allclose([[p for _, p in r] for r in got], [[p for _, p in r] for r in want], atol=1e-4)


def test_stablehlo_artifact_holds_no_extension_call(run, artifacts):
    """conv_impl "auto" may call the oneDNN extension (jax.ffi custom calls); the artifact must not."""
    from resnet_jax.ops import onednn

    clf, images, _ = run
    text = jax.export.deserialize(bytearray(artifacts["stablehlo"].read_bytes())).mlir_module()
    assert not [t for t in onednn.TARGETS if t in text]
    assert set(re.findall(r"custom_call @(\w+)", text)) <= {"shape_assertion"}  # jax's check of the batch size
    if onednn.available():  # the model itself does use it here: the export is what keeps it out
        lowered = jax.jit(lambda x: clf.model.apply(clf.variables, x)).lower(
            jnp.zeros((2, *images.shape[1:3], clf.model.in_channels))).as_text()
        assert any(t in lowered for t in onednn.TARGETS)


def test_artifacts_hold_the_folded_model(run, artifacts):
    """No BatchNorm is left: no rsqrt(var + eps) in the StableHLO module, no BatchNormalization in the ONNX
    graph, and every convolution carries the folded BatchNorm's shift as its bias."""
    import onnx

    clf, _, _ = run
    text = jax.export.deserialize(bytearray(artifacts["stablehlo"].read_bytes())).mlir_module()
    assert "rsqrt" not in text
    convs = jax.tree_util.tree_flatten_with_path(clf.variables["params"])[0]
    n_convs = sum(1 for path, _ in convs if path[-1].key == "kernel" and "fc" not in str(path))
    assert text.count("stablehlo.convolution") == n_convs
    graph = onnx.load(str(artifacts["onnx"])).graph
    ops = [node.op_type for node in graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == n_convs
    assert all(len(node.input) == 3 for node in graph.node if node.op_type == "Conv")


@pytest.mark.long  # a fresh Python process per check
def test_export_command_writes_each_format(digits_run, tmp_path):
    clf, images, _ = digits_run
    written = [("stablehlo", "m.stablehlo"), ("onnx", "m.onnx"), (None, "m.pth"), ("safetensors", "m.safetensors")]
    runs = [[f"--workdir={clf.workdir}", f"--output={tmp_path / name}", *([f"--format={fmt}"] if fmt else [])]
            for fmt, name in written]
    (tmp_path / "dir.onnx").mkdir()
    *results, refused, other_suffix, directory = cli_runs(
        "train.export", *runs, [f"--workdir={clf.workdir}", f"--output={tmp_path / 'm.bin'}"],
        [f"--workdir={clf.workdir}", f"--output={tmp_path / 'a.pth'}", "--format=onnx"],
        [f"--workdir={clf.workdir}", f"--output={tmp_path / 'dir.onnx'}"])
    # an ONNX graph named .pth had been written, which torch.load then failed on; a directory named the hidden file.
    # A format the flags cannot name is a usage mistake (exit 2, as an unknown flag); a failed write exits 1.
    assert other_suffix["code"] == 2 and other_suffix["stderr"].strip().splitlines() == [
        "error: a.pth's suffix says torchvision but --format=onnx; name it a.onnx (or leave the format to the suffix)"]
    assert directory["code"] == 1 and directory["stderr"].strip().splitlines() == [
        f"error: [Errno 21] {tmp_path / 'dir.onnx'} is a directory; name the file to write (e.g. "
        f"{tmp_path / 'dir.onnx' / 'model.onnx'})"]
    assert not (tmp_path / "a.pth").exists() and list((tmp_path / "dir.onnx").iterdir()) == []
    for (_, name), result in zip(written, results, strict=True):
        assert result["code"] == 0 and result["stdout"].startswith(f"wrote {tmp_path / name}"), result
        assert (tmp_path / name).exists()
    want = [row[0][0] for row in clf.predict(images, top_k=1)]
    for name in ("m.stablehlo", "m.onnx"):
        assert [row[0][0] for row in load_exported(tmp_path / name).predict(images, top_k=1)] == want
    assert refused["code"] == 2 and refused["stderr"].strip().splitlines() == [
        "error: cannot tell the format from m.bin; pass --format=stablehlo|onnx|torchvision|safetensors or name the "
        "file .stablehlo, .onnx, .pth, .safetensors"]


# --------------------------------------------------------------------------- bad artifacts and bad inputs


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory):
    """A tiny greyscale ResNet exported to StableHLO (its manifest and checks are what is tested)."""
    model = create_model("resnet20", stage_sizes=(1, 1, 1), in_channels=1, num_classes=3)
    variables = random_variables(model, (1, 8, 8, 1))
    path = tmp_path_factory.mktemp("small") / "small.stablehlo"
    return export_model(model, variables, path, preprocessing=Preprocessing(8, (0.5,), (0.25,)),
                        class_names=["a", "b", "c"])


def copy_artifact(src, dst_dir):
    dst = dst_dir / src.name
    dst.write_bytes(src.read_bytes())
    (dst_dir / (src.name + ".json")).write_bytes((src.parent / (src.name + ".json")).read_bytes())
    return dst


def one_sentence(err):
    text = str(err.value)
    assert "\n" not in text and ". " not in text, text
    return text


def test_newer_format_version_is_refused(small_artifact, tmp_path):
    path = copy_artifact(small_artifact, tmp_path)
    manifest = json.loads((tmp_path / "small.stablehlo.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "small.stablehlo.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"export format version {FORMAT_VERSION + 1}, newer than the version "
                                            f"{FORMAT_VERSION}") as err:
        load_exported(path)
    assert "upgrade resnet-jax" in one_sentence(err)


def test_truncated_or_changed_artifact_is_refused(small_artifact, tmp_path):
    path = copy_artifact(small_artifact, tmp_path)
    data_ = small_artifact.read_bytes()
    path.write_bytes(data_[: len(data_) // 2])
    with pytest.raises(ArtifactError, match="is truncated") as err:
        load_exported(path)
    one_sentence(err)
    path.write_bytes(data_[:-1] + bytes([data_[-1] ^ 1]))
    with pytest.raises(ArtifactError, match="does not match the sha256") as err:
        load_exported(path)
    one_sentence(err)
    (tmp_path / "small.stablehlo.json").unlink()
    with pytest.raises(ArtifactError, match="has no manifest small.stablehlo.json beside it") as err:
        load_exported(path)
    one_sentence(err)


def test_wrong_image_size_or_channels_are_refused(small_artifact):
    model = load_exported(small_artifact)
    assert model(np.zeros((2, 8, 8), np.uint8)).shape == (2, 3)  # any accepted form, resized as needed
    assert model(np.zeros((20, 12, 3), np.uint8)).shape == (1, 3)
    with pytest.raises(ValueError, match=r"takes uint8 batches of shape \(N, 8, 8, 1\), got \(2, 16, 16, 1\)") as e:
        model.run(np.zeros((2, 16, 16, 1), np.uint8))
    one_sentence(e)
    with pytest.raises(ValueError, match=r"got \(2, 8, 8, 3\)") as e:
        model.run(np.zeros((2, 8, 8, 3), np.uint8))
    one_sentence(e)
    with pytest.raises(ValueError, match="takes uint8 images") as e:
        model.run(np.zeros((2, 8, 8, 1), np.float32))
    one_sentence(e)
    with pytest.raises(ValueError, match=r"images of shape \(2, 8, 8, 2\)") as e:
        model(np.zeros((2, 8, 8, 2), np.uint8))
    one_sentence(e)


@pytest.mark.long  # a fresh Python process per check
def test_predict_command_reports_a_bad_artifact_in_one_line(small_artifact, tmp_path):
    path = copy_artifact(small_artifact, tmp_path)
    path.write_bytes(small_artifact.read_bytes()[:100])
    np.save(tmp_path / "x.npy", np.zeros((8, 8), np.uint8))
    proc = run_python(module="train.predict", args=[f"--artifact={path}", tmp_path / "x.npy"], env=worker_env(),
                      timeout=600, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {path} is {100} bytes but its manifest says "
                                                f"{small_artifact.stat().st_size}: the file is truncated; copy it "
                                                "again or export again"]


def test_symbolic_batch_serves_any_batch_size(small_artifact):
    model = load_exported(small_artifact)
    for n in (1, 2, 33):
        assert model.run(np.zeros((n, 8, 8, 1), np.uint8)).shape == (n, 3)
    assert model.manifest["input"]["shape"] == ["batch", 8, 8, 1]


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_empty_batch_gives_no_logits_in_both_formats(tmp_path, fmt):
    """ONNX returned (0, classes) where StableHLO raised jax's "Expected value >= 1 for dimension variable"."""
    model, variables = small_model()
    exported = load_exported(export_model(model, variables, tmp_path / f"m.{fmt}",
                                          preprocessing=Preprocessing(8, (0.5,), (0.25,))))
    out = exported.run(np.zeros((0, 8, 8, 1), np.uint8))
    assert out.shape == (0, 3) and out.dtype == np.float32


# --------------------------------------------------------------------------- every architecture knob in ONNX

VARIANTS = [  # (name, overrides, image size): one block per stage keeps them small; 40 px gives odd feature maps
    ("resnet20", {"stage_sizes": (1, 1, 1), "in_channels": 1}, 16),        # CIFAR stem, zero-pad shortcut
    ("resnet18", {"stage_sizes": (1, 1, 1, 1)}, 40),                        # ImageNet stem, projection
    ("resnet50d", {"stage_sizes": (1, 1, 1, 1)}, 40),                       # deep stem, avg-pool shortcut (ceil)
    ("resnext50_32x4d", {"stage_sizes": (1, 1, 1, 1)}, 32),                 # grouped 3x3
    ("preact_resnet18", {"stage_sizes": (1, 1, 1, 1)}, 32),                 # pre-activation, unfolded BNs
    ("preact_resnet50", {"stage_sizes": (1, 1, 1, 1), "stem": "deep"}, 32),  # pre-activation bottleneck, deep stem
    ("resnet18_cifar", {"stage_sizes": (1, 1, 1, 1)}, 16),                  # CIFAR stem with projections
    ("preact_resnet18", {"stage_sizes": (1, 1, 1, 1), "stem": "cifar"}, 16),  # a bare stem feeding the shortcut
]


@pytest.mark.parametrize("name,overrides,size", VARIANTS, ids=[v[0] + v[1].get("stem", "") for v in VARIANTS])
def test_onnx_covers_every_variant(name, overrides, size, tmp_path):
    model = create_model(name, num_classes=11, **overrides)
    channels = model.in_channels
    variables = random_variables(model, (1, size, size, channels))
    prep = Preprocessing(size, (0.4,) * channels, (0.2,) * channels)
    exported = load_exported(export_model(model, variables, tmp_path / "m.onnx", preprocessing=prep))
    batch = np.random.default_rng(1).integers(0, 256, (2, size, size, channels), dtype=np.uint8)
    want = np.asarray(apply(model, variables, data.normalize(batch, *prep.per_channel(channels))))
    np.testing.assert_allclose(exported.run(batch), want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_models_without_logits_are_refused(tmp_path):
    model = create_model("resnet18", features_only=True)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))  # refused before use
    for suffix in ("stablehlo", "onnx"):
        with pytest.raises(ValueError, match="export writes classifiers") as err:
            export_model(model, variables, tmp_path / f"m.{suffix}", preprocessing=Preprocessing(32, (0.5,), (0.5,)))
        one_sentence(err)


def test_one_stablehlo_file_can_serve_several_platforms(tmp_path):
    """--platforms=cpu,cuda: lowered for both (only the CPU half can run here)."""
    model = create_model("resnet20", stage_sizes=(1, 1, 1), in_channels=1, num_classes=3)
    variables = random_variables(model, (1, 8, 8, 1))
    path = export_model(model, variables, tmp_path / "m.stablehlo", preprocessing=Preprocessing(8, (0.5,), (0.25,)),
                        platforms=("cpu", "cuda"))
    exported = load_exported(path)
    assert exported.manifest["platforms"] == ["cpu", "cuda"]
    want = model.apply(variables, (np.ones((2, 8, 8, 1), np.float32) / 255 - 0.5) / 0.25)
    np.testing.assert_allclose(exported.run(np.ones((2, 8, 8, 1), np.uint8)), want, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("platforms,message", [(("CPU",), r"unknown platform\(s\) \['CPU'\]; choose from"),
                                               (("cpu", "gpu"), "NVIDIA GPUs are 'cuda'")])
def test_an_unknown_platform_is_refused_before_anything_is_written(tmp_path, platforms, message):
    """jax.export lowers for any name; the artifact then ran nowhere ("exported for ('CPU',), used on ('cpu',)")."""
    model = create_model("resnet20", stage_sizes=(1, 1, 1), in_channels=1, num_classes=3)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))  # refused before use
    with pytest.raises(ValueError, match=message) as err:
        export_model(model, variables, tmp_path / "m.stablehlo", preprocessing=Preprocessing(8, (0.5,), (0.25,)),
                     platforms=platforms)
    one_sentence(err)
    assert list(tmp_path.iterdir()) == []


def small_model(num_classes=3):
    model = create_model("resnet20", stage_sizes=(1, 1, 1), in_channels=1, num_classes=num_classes)
    return model, random_variables(model, (1, 8, 8, 1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_failed_export_leaves_the_previous_artifact_and_manifest_loading(tmp_path, fmt):
    """The artifact was written in place, then its manifest: a re-export that failed mid-write (a full disk, made
    real here by the file-size limit of a child process) left half a new file beside the old manifest, and neither
    loaded."""
    model, variables = small_model()
    prep = Preprocessing(8, (0.5,), (0.25,))
    path = export_model(model, variables, tmp_path / f"m.{fmt}", preprocessing=prep, class_names=["a", "b", "c"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    proc = run_python(f"""
        import resource
        import numpy as np
        from conftest import random_variables
        from resnet_jax import create_model
        from resnet_jax.export import Preprocessing, export_model
        model = create_model("resnet20", stage_sizes=(2, 2, 2), in_channels=1, num_classes=300)  # a larger file
        variables = random_variables(model, (1, 8, 8, 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before[path.name]) + 1000}, resource.RLIM_INFINITY))
        try:
            export_model(model, variables, {str(path)!r}, preprocessing=Preprocessing(8, (0.5,), (0.25,)))
        except OSError as err:
            print("failed:", err)
    """, env={**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}"})
    assert "failed: [Errno 27] File too large" in proc.stdout, proc.stdout
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # and no partial file left
    assert load_exported(path).class_names == ["a", "b", "c"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_manifest_that_cannot_be_written_leaves_the_previous_pair(tmp_path, fmt):
    """The artifact was renamed into place before the manifest was written: a full disk at the manifest (here a
    file-size limit the new artifact fits under and its manifest, with long class names, does not) left the new
    artifact beside the old manifest, a pair that failed its checksum."""
    model, variables = small_model()
    prep = Preprocessing(8, (0.5,), (0.25,))
    path = export_model(model, variables, tmp_path / f"m.{fmt}", preprocessing=prep, class_names=["a", "b", "c"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    proc = run_python(f"""
        import resource
        from conftest import random_variables
        from resnet_jax import create_model
        from resnet_jax.export import Preprocessing, export_model
        model = create_model("resnet20", stage_sizes=(1, 1, 1), in_channels=1, num_classes=3)
        variables = random_variables(model, (1, 8, 8, 1), seed=1)  # other weights, the same size
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before[path.name]) + 1000}, resource.RLIM_INFINITY))
        try:
            export_model(model, variables, {str(path)!r}, preprocessing=Preprocessing(8, (0.5,), (0.25,)),
                         class_names=[c * 2_000_000 for c in "xyz"])
        except OSError as err:
            print("failed:", err)
    """, env={**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}"})
    assert "failed: [Errno 27] File too large" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert load_exported(path).class_names == ["a", "b", "c"]


@pytest.mark.parametrize("change, says", [
    ({"variables": "params_only"}, "do not fit the model: missing batch_stats/bn1/mean"),
    ({"variables": "other_classes"}, "do not fit the model: params/fc/bias is (5,), the model's (3,)"),
    ({"class_names": "abc"}, "class_names must be a list of names, one per class, not the single string 'abc'"),
    ({"name": "m.pth", "format": "onnx"}, "m.pth's suffix is a PyTorch state_dict's"),
    ({"prep": dict(crop_mode="zoom")}, "crop_mode 'zoom' is not one of ['center', 'squash', 'border']"),
    ({"prep": dict(interpolation="foo", resize_size=10)}, "interpolation 'foo' is not one of"),
    ({"prep": dict(resize_size=0)}, "resize_size must be a positive whole number of pixels, got 0"),
    ({"prep": dict(crop_fraction=-1.0)}, "crop_fraction must be a number in (0, 1]"),
    ({"prep": dict(std=(0.0,))}, "std must be finite numbers, all above 0"),
    ({"prep": dict(image_size="8")}, "image_size must be a positive whole number of pixels, got '8'"),
])
def test_bad_export_arguments_are_one_sentence_before_anything_is_written(tmp_path, change, says):
    """Each had been written (over any previous pair) and failed only when loaded or run (a std of 0: every
    prediction NaN; a bad interpolation: at load), or failed on a bare KeyError, jax's multi-line TypeError, or
    "this model's BatchNorm placement is not supported" for another model's variables; a string of class names
    was split into letters."""
    model, variables = small_model()
    if change.get("variables") == "params_only":
        variables = {"params": variables["params"]}
    elif change.get("variables") == "other_classes":
        variables = small_model(num_classes=5)[1]
    prep = {"image_size": 8, "mean": (0.5,), "std": (0.25,), **change.get("prep", {})}
    with pytest.raises((ValueError, TypeError), match=re.escape(says)) as err:
        export_model(model, variables, tmp_path / change.get("name", "m.onnx"), preprocessing=Preprocessing(**prep),
                     class_names=change.get("class_names"), format=change.get("format"))
    one_sentence(err)
    assert list(tmp_path.iterdir()) == []


def test_preprocessing_takes_numbers_of_any_library(tmp_path):
    """numpy's and jax's scalars are numbers (a crop fraction computed with jnp exported before the checks came)."""
    model, variables = small_model()
    prep = Preprocessing(jnp.int32(8), np.float32(0.5), (0.25,), crop_fraction=jnp.float32(0.875))
    exported = load_exported(export_model(model, variables, tmp_path / "m.onnx", preprocessing=prep))
    assert (exported.image_size, exported.crop_fraction) == (8, 0.875)


def test_a_format_other_than_the_suffix_says_is_refused(tmp_path):
    """--format=stablehlo --output=x.onnx wrote a StableHLO file named .onnx, which onnxruntime then misreads."""
    model, variables = small_model()
    says = r"x.onnx's suffix says onnx but format='stablehlo'; name it x.stablehlo"
    with pytest.raises(ValueError, match=says) as err:
        export_model(model, variables, tmp_path / "x.onnx", preprocessing=Preprocessing(8, (0.5,), (0.25,)),
                     format="stablehlo")
    one_sentence(err)
    assert list(tmp_path.iterdir()) == []
    assert export_model(model, variables, tmp_path / "x.bin", preprocessing=Preprocessing(8, (0.5,), (0.25,)),
                        format="onnx").exists()  # a suffix of no format is the user's choice


def test_class_names_of_any_sequence_are_written_as_text(tmp_path):
    """numpy arrays of names raised numpy's truth-value error, numpy integer labels a JSON TypeError, and int
    labels came back from predict as ints where Classifier.predict gives strings."""
    model, variables = small_model()
    prep = Preprocessing(8, (0.5,), (0.25,))
    for i, names in enumerate([np.array(["a", "b", "c"]), np.unique([7, 3, 5]), (0, 1, 2)]):
        path = export_model(model, variables, tmp_path / f"m{i}.stablehlo", preprocessing=prep, class_names=names)
        exported = load_exported(path)
        assert exported.class_names == [str(n) for n in np.asarray(names).tolist()]
        assert all(isinstance(name, str) for name, _ in exported.predict(np.zeros((8, 8), np.uint8), top_k=3)[0])


@pytest.mark.parametrize("edit, says", [
    (lambda m: m.update(class_names=["a", "b"]), "returns 3 logits, the manifest says 8x8 images of 1 channels "
                                                 "and 2 class names"),
    (lambda m: m.update(class_names=["a", "b", "c", "d"]), "and 4 class names"),
    (lambda m: m["preprocessing"].update(image_size=16), "the artifact takes (N, 8, 8, 1) images"),
    (lambda m: m["preprocessing"].update(channels=3), "the manifest says 8x8 images of 3 channels"),
    (lambda m: m.update(class_names=[0, 1, 2]), "class_names are not all text"),
    (lambda m: m["preprocessing"].update(resize_size=10, interpolation="foo"),
     "holds invalid preprocessing (Preprocessing's interpolation 'foo' is not one of"),
    (lambda m: m.pop("class_names"), "has no valid 'class_names' entry"),
    (lambda m: m.pop("artifact"), "has no valid 'artifact' entry"),
    (lambda m: m["preprocessing"].pop("image_size"), "has no valid 'preprocessing.image_size' entry"),
    (lambda m: m.update(format_version="1"), "has format_version '1', not a version number resnet_jax writes"),
])
def test_a_manifest_missing_an_entry_is_one_clear_error(small_artifact, tmp_path, edit, says):
    """A hand-edited or partly copied manifest failed as a bare KeyError (and train.predict with a traceback);
    a version written as text was called newer than this one."""
    path = copy_artifact(small_artifact, tmp_path)
    manifest = json.loads((tmp_path / "small.stablehlo.json").read_text())
    edit(manifest)
    (tmp_path / "small.stablehlo.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=re.escape(says)) as err:
        load_exported(path)
    one_sentence(err)


def test_an_artifact_for_another_platform_is_refused_at_load(small_artifact, tmp_path):
    """Exported on a GPU machine (platforms cuda), served on CPU: jax's own error came at the first call. A
    platform given as one string is that platform (it was split into 'c', 'p', 'u')."""
    path = copy_artifact(small_artifact, tmp_path)
    manifest = json.loads((tmp_path / "small.stablehlo.json").read_text())
    manifest["platforms"] = ["cuda"]
    (tmp_path / "small.stablehlo.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"was exported for cuda only and this process runs on cpu; export it "
                                            r"again including 'cpu'") as err:
        load_exported(path)
    one_sentence(err)
    model, variables = small_model()
    path = export_model(model, variables, tmp_path / "one.stablehlo", preprocessing=Preprocessing(8, (0.5,), (0.25,)),
                        platforms="cpu")
    assert load_exported(path).manifest["platforms"] == ["cpu"]


def test_state_dict_exports_create_their_directory_and_are_readable_by_others(tmp_path):
    """A .pth into a missing directory failed naming the hidden partial file (the artifacts' directory was
    created); safetensors' own writer makes its file 0600, unreadable by a serving process of another user."""
    from resnet_jax.torch_file import write_safetensors, write_torch_file

    write_torch_file(tmp_path / "new" / "dir" / "a.pth", {"w": np.ones(2, np.float32)})
    write_safetensors(tmp_path / "other" / "a.safetensors", {"w": np.ones(2, np.float32)})
    for path in (tmp_path / "new" / "dir" / "a.pth", tmp_path / "other" / "a.safetensors"):
        umask = os.umask(0)
        os.umask(umask)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (path, oct(path.stat().st_mode))
    assert not [p for p in tmp_path.rglob(".*partial")]


@pytest.mark.parametrize("name", ["resnetv2_18d", "resnetv2_50"])
def test_onnx_of_a_pre_activation_model_equals_timm(name, tmp_path):
    """timm's ResNetV2 at ``SMALL`` depth (random weights, random BatchNorm statistics; a basic one with the
    deep stem and a bottleneck one: each layer and shortcut kind), its weights mapped by the timm rules
    ``load_timm`` applies, exported: the ONNX artifact in onnxruntime gives timm's logits, so the exporter
    computes what timm does, not only what this project's model does."""
    torch = pytest.importorskip("torch")
    import timm

    from resnet_jax.torchvision import convert_state_dict

    torch.manual_seed(0)
    tm = timm.create_model(name, layers=list(SMALL)).eval()
    tm.load_state_dict(random_batch_stats(tm.state_dict(), 0))
    model = create_model(name, stage_sizes=SMALL)
    variables, _ = convert_state_dict(model, tm.state_dict(), naming="timm", model_name=name)
    prep = Preprocessing(48, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    exported = load_exported(export_model(model, variables, tmp_path / "m.onnx", preprocessing=prep))
    assert exported.manifest["format"] == "onnx"
    batch = np.random.default_rng(2).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    with torch.no_grad():
        want = tm(torch.from_numpy(data.normalize(batch, *prep.per_channel(3)).transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(exported.run(batch), want, atol=1e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("mode, says", [("center", "shorter side to resize_size"),
                                        ("squash", "both sides to resize_size (aspect ratio not kept)"),
                                        ("border", "longer side to resize_size (keeping the aspect ratio")])
def test_the_manifest_describes_each_crop_mode_as_it_is_done(tmp_path, mode, says):
    """A serving process may follow the text alone: it must say what EvalTransform does in that mode (the text
    had described the centre mode's resize for all three)."""
    from resnet_jax.export.manifest import Preprocessing, manifest_text

    prep = Preprocessing(image_size=20, mean=(0.5,), std=(0.25,), resize_size=24, interpolation="bicubic",
                         crop_mode=mode)
    text = manifest_text(tmp_path / "model.onnx", b"stand-in artifact bytes", fmt="onnx", model_name="resnet18",
                         num_classes=2, channels=3, preprocessing=prep, class_names=["a", "b"], extra={})
    resize = json.loads(text)["preprocessing"]["resize"]
    assert resize.startswith(f"bicubic (Pillow, antialiased), {mode} mode: {says}"), resize
