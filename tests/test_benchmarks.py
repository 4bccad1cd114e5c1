"""Each benchmark script runs end to end in smoke mode, prints its table and writes its JSON (never timed)."""

import importlib.util
import json
import os

import pytest

from conftest import run_python

pytestmark = pytest.mark.long  # each benchmark script runs end to end against torch


def run_script(module, tmp_path, *extra):
    out = tmp_path / "result.json"
    proc = run_python(module=module, args=["--quick", "--json", out, *extra], env=dict(os.environ, JAX_PLATFORMS="cpu"),
                      timeout=600)
    assert "|---" in proc.stdout, proc.stdout  # a markdown table was printed
    data = json.loads(out.read_text())
    assert data["environment"]["jax"] and data["environment"]["cpu"]
    # what a figure depends on: the CPU's instructions, the threads, whether the extension ran
    assert {"cpu_flags", "threads_available", "extension"} <= set(data["environment"])
    return proc.stdout, data["results"]


def test_train_step_smoke(tmp_path):
    """Every variant in both modes, on the ResNet-18 case in float32. The greyscale digits case (one input
    channel) and bfloat16 run in the next test; on a CPU with bfloat16 instructions this one would otherwise run
    every variant twice, in minutes of compiling."""
    pytest.importorskip("torch")
    stdout, results = run_script("benchmarks.train_step", tmp_path, "--case", "resnet18_cifar_cpu",
                                 "--dtype", "float32", "--no-compile")
    expected = {"jax conv_impl=auto", "jax conv_impl=jax", "torch NCHW", "torch channels_last"}
    # OpenVINO's inference is an anchor where it is installed (a row of its own), a one-line note where not
    anchor = {("inference", "openvino f32 (own process, glibc)")} if importlib.util.find_spec("openvino") else set()
    want = {(m, v) for m in ("train", "inference") for v in expected} | anchor
    assert {(r["mode"], r["variant"]) for r in results} == want
    assert all(r["images_per_s"] > 0 and r["ratio_to_torch_best"] > 0 for r in results)
    assert "ours best / torch best" in stdout
    assert anchor or "no OpenVINO anchor (pip install openvino" in stdout
    # torch in a process of its own: in ours it had run on our extension's OpenMP runtime and its sleep policy
    assert data_environment(tmp_path)["torch_process"] == "own"


def data_environment(tmp_path):
    return json.loads((tmp_path / "result.json").read_text())["environment"]


FOLDED = """
    import sys
    import torch
    from benchmarks import common

    model = sys.argv[1]
    case = common.Case(model, model, 2, 32, "float32", "cpu", 10, channels=1 if model == "resnet20" else 3)
    reference = common.torch_model(case).eval()
    for module in reference.modules():  # statistics of a trained model, not the identity of a fresh one
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2)
    fused = common.torch_inference_model(reference, torch.channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules()), "a BatchNorm is left"
    x = torch.randn(2, case.channels, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-4, atol=1e-4)
    print("folded")
"""


@pytest.mark.parametrize("model", ["resnet50", "resnet18_cifar", "resnet20"])
def test_torchs_inference_model_folds_batchnorm_as_ours_does(model):
    """Ours folds BatchNorm for inference (fold_batchnorm); torch's peer had run it as its own pass. The fused
    model has no BatchNorm left and computes what torch's own eval-mode model computes. (In a child run from the
    repository, as the benchmarks run: ``benchmarks`` is not an installed package.)"""
    pytest.importorskip("torch")
    assert run_python(FOLDED, args=[model]).stdout.strip() == "folded"


def test_train_step_puts_bfloat16_ratios_next_to_float32(tmp_path):
    pytest.importorskip("torch")
    stdout, results = run_script("benchmarks.train_step", tmp_path, "--case", "resnet20_digits_cpu", "--no-compile",
                                 "--mode", "train", "--conv-impl", "auto", "--dtype", "float32", "--dtype", "bfloat16")
    assert {(r["dtype"], r["variant"]) for r in results} == {
        (d, v) for d in ("float32", "bfloat16") for v in ("jax conv_impl=auto", "torch NCHW", "torch channels_last")}
    side_by_side = stdout.split("by precision")[1].splitlines()
    assert side_by_side[1].split("|")[3:5] == [" float32 ", " bfloat16 "], side_by_side
    assert side_by_side[3].startswith("| resnet20_digits_cpu | train |"), side_by_side


def test_compile_time_smoke(tmp_path):
    _, results = run_script("benchmarks.compile_time", tmp_path, "--case", "resnet18_cifar_cpu")
    assert [r["run"] for r in results] == ["cold", "warm (persistent cache)"]
    assert results[0]["cache_entries"] > 0  # the thresholds let the cold run write the cache
    assert all(r["compile_s"] > 0 for r in results)


def test_memory_smoke(tmp_path):
    _, results = run_script("benchmarks.memory", tmp_path, "--case", "resnet18_cifar_cpu")
    assert [r["remat"] for r in results] == [False, True]
    assert all(r["temp_mb"] > 0 and r["max_rss_mb"] > 0 for r in results)


def test_conv_layers_smoke(tmp_path):
    pytest.importorskip("torch")
    stdout, results = run_script("benchmarks.conv_layers", tmp_path)
    from resnet_jax.ops import ALGORITHMS

    assert len(results) == 2
    for r in results:  # the first two layers of ResNet-18-CIFAR: 3x3 stride 1, every algorithm that computes them
        for rates in r["gflops"].values():
            assert {"xla", "matmul_grad", "winograd_f2", "winograd_f4", "torch"} <= set(rates) <= {*ALGORITHMS, "torch"}
            assert all(v > 0 for v in rates.values())
        assert len(r["auto"]) == len(r["jax"]) == 3 and set(r["auto"]) <= set(ALGORITHMS)
    assert "summed over each model's convolutions" in stdout


def test_kernel_grad_1x1_smoke(tmp_path):
    """The 1x1 kernel-gradient forms side by side, values checked against numpy inside the script."""
    stdout, results = run_script("benchmarks.kernel_grad_1x1", tmp_path)
    assert [(r["in"], r["out"]) for r in results] == [(8, 8), (8, 24), (24, 8), (24, 24)]
    assert all(set(r["gflops"]) == {"oneDNN", "own kernel", "numpy"} for r in results)
    assert "oneDNN / own kernel (numpy)" in stdout


def test_export_inference_smoke(tmp_path):
    stdout, results = run_script("benchmarks.export_inference", tmp_path)
    assert {(r["case"], r["variant"]) for r in results} == {
        (case, variant) for case in ("resnet50_cpu", "resnet18_cifar_cpu")
        for variant in ("stablehlo artifact", "onnxruntime", "torch NCHW", "torch channels_last")}
    assert all(r["images_per_s"] > 0 and r["ratio_to_torch_best"] > 0 for r in results)
    assert "x torch best" in stdout


def test_conv_bf16_smoke(tmp_path):
    stdout, results = run_script("benchmarks.conv_bf16", tmp_path)
    variants = {r["variant"] for r in results}
    assert {"float32 winograd_f2", "bfloat16 winograd_f2"} <= variants  # the pure-JAX ones run anywhere
    for r in results:
        assert r["forward_gflops"] > 0 and r["train_gflops"] > 0
        assert 0 <= r["relative_error"] < (2e-2 if r["variant"].startswith("bfloat16") else 1e-4)
    assert "forward + both gradients" in stdout


def test_conv_bf16_model_smoke(tmp_path):
    """A model's layers per pass: float32 and bfloat16 "auto", torch's bfloat16, and on a 3x3 stride-1 layer the
    bfloat16 pass by the extension's Winograd, directly and through the float32 detour, wherever it is built."""
    pytest.importorskip("torch")
    from resnet_jax.ops import ConvSpec
    from resnet_jax.ops.registry import REGISTRY

    stdout, results = run_script("benchmarks.conv_bf16", tmp_path, "--model", "resnet18_cifar")
    assert [(r["layer"], r["pass"]) for r in results] == [
        ("32 64->64 k3 s1", p) for p in ("forward", "input_grad", "kernel_grad")]  # --quick: the second layer
    spec = ConvSpec(128, 32, 32, 64, 64, (3, 3), (1, 1), ((1, 1), (1, 1)), 1, "bfloat16")
    widened = REGISTRY["onednn_winograd_f4@float32"].refusal(spec, "cpu") is None
    for r in results:
        assert {"float32 auto", "bfloat16 auto", "torch bfloat16"} <= set(r["gflops"])
        assert ("bfloat16 winograd_f4@float32" in r["gflops"]) == widened
        assert ("bfloat16 winograd_f4" in r["gflops"]) == widened  # and the same reading bfloat16 itself
        assert all(v > 0 for v in r["gflops"].values())
    assert "seconds per batch (time x uses), per layer group and pass" in stdout


def test_dilated_inference_smoke(tmp_path):
    stdout, results = run_script("benchmarks.dilated_inference", tmp_path)
    assert {r["variant"] for r in results} == {"ours auto", "ours xla", "torch NCHW", "torch channels_last"}
    assert all(r["images_per_s"] > 0 and r["ratio_to_torch_best"] > 0 for r in results)
    assert "output stride 8" in stdout


def test_input_pipeline_v2_smoke(tmp_path):
    """The V2 training transform, ours through `data.train_loader` with the V2 config's keys and torchvision's
    DataLoader with the same transforms, at 1 worker process each (the 2-worker case is the same code). torch is
    not imported here: in a process that has loaded TensorFlow (test_data_benchmark's) its import crashes."""
    out = tmp_path / "result.json"
    proc = run_python(module="benchmarks.input_pipeline", args=["--quick", "--recipes", "v2", "--v2-workers", "1",
                                                                 "--json", out],
                      env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert "vs torchvision" in proc.stdout, proc.stdout
    report = json.loads(out.read_text())
    assert report["versions"]["torchvision"] and report["cpu"]
    assert [r["pipeline"] for r in report["results"]] == ["grain workers=1", "torchvision workers=1"]
    assert all(r["images_per_s"] > 0 and r["cores_for_5000"] > 0 for r in report["results"])
    assert report["results"][1]["ratio_to_torchvision"] == 1.0


def test_cpu_peak_smoke(tmp_path):
    """The peak is measured by a compiled loop, with numpy's GEMM (OpenBLAS) beside it, which the script itself
    compares (a speed, so not asserted here: the other test worker shares the cores); torchvision's own count of
    ResNet-50's work checks the layer list every convolution benchmark uses."""
    torchvision = pytest.importorskip("torchvision")
    stdout, results = run_script("benchmarks.cpu_peak", tmp_path)
    assert results["fma_all"] > 0 and results["fma_one"] > 0 and results["threads"] >= 1
    assert results["numpy_gemm"] > 0 and results["read_gbs"] > 0 and results["copy_gbs"] > 0
    resnet50 = results["models"]["resnet50"]
    classifier_macs = 2048 * 1000  # torchvision's count includes the fully connected layer
    want = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["_ops"] * 1e9  # 4.089 GFLOPS, as multiply-adds
    assert resnet50["macs_per_image"] + classifier_macs == pytest.approx(want, rel=1e-3)
    assert resnet50["gflop"]["1x1"]["forward"] == pytest.approx(135.64, rel=1e-3)  # half of the 261.6 at batch 32
    assert "ms at peak" in stdout


@pytest.mark.parametrize("module", ["benchmarks.train_step", "benchmarks.memory", "benchmarks.compile_time"])
def test_device_gpu_without_one_says_so_at_once(module, tmp_path):
    """Left to choose, JAX fell back to the CPU: `--device gpu` wrote results labelled gpu that were measured on
    the CPU (with torch, it failed only after compiling). Where JAX has no GPU, each script stops first."""
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("this machine has a GPU: the scripts measure it (their smoke tests above run them)")
    proc = run_python(module=module, args=["--device", "gpu", "--quick", "--json", tmp_path / "r.json"],
                      check=False, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: --device gpu: JAX finds no GPU here (its default backend: cpu)"), proc.stderr[-2000:]
    assert not (tmp_path / "r.json").exists()
