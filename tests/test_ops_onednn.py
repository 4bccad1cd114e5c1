"""The optional oneDNN extension: built where its wheels and a compiler are, cached, and replaced by the
pure-JAX convolutions, with one line saying why, wherever it cannot be used. Real builds in real processes."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import on_linux_x86_64, require_onednn_toolchain
from resnet_jax.ops import onednn


PROBE = textwrap.dedent("""
    import jax.numpy as jnp
    from resnet_jax import create_model
    import logging
    from resnet_jax.ops import ConvSpec, choose, onednn
    logging.basicConfig(format="%(message)s")
    logging.getLogger("resnet_jax").setLevel(logging.INFO)  # the build's own lines too
    model = create_model("resnet20", num_classes=3, in_channels=1)
    x = jnp.ones((1, 8, 8, 1))
    print(model.apply(model.init(__import__("jax").random.key(0), x), x).shape)
    g = ConvSpec(128, 16, 16, 128, 128, (3, 3), (1, 1), ((1, 1), (1, 1)), 1, "float32")  # 9.7 GFLOP: Winograd
    print("available", onednn.available(), "choice", ",".join(choose(g, "cpu")))
""")


def start_probe(tmp_path, code=PROBE, **env):
    full = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **env}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full)


def run_probe(tmp_path, code=PROBE, **env) -> subprocess.CompletedProcess:
    process = start_probe(tmp_path, code, **env)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_extension_is_available_wherever_its_wheels_and_a_compiler_are():
    require_onednn_toolchain()
    assert onednn.available(), onednn.unavailable_reason()
    assert onednn.version().startswith("3.")


def test_ci_fails_instead_of_skipping_when_the_extension_is_unusable(tmp_path):
    """On Linux x86_64 CI must run the extension's tests: an unusable extension fails them, it does not skip
    them (a broken build would otherwise leave CI green with every fast algorithm untested)."""
    if not on_linux_x86_64():
        pytest.skip("the oneDNN wheels exist for Linux x86_64 only")
    tests = [f"{__file__}::test_extension_is_available_wherever_its_wheels_and_a_compiler_are",  # builds
             f"{os.path.dirname(__file__)}/test_ops_conv.py::test_bfloat16_where_supported[onednn]"]  # runs it
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "CXX": str(tmp_path / "no-such-compiler")}
    outside = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                             capture_output=True, text=True, env={**env, "CI": ""}, timeout=600)
    assert outside.returncode == 0 and "2 skipped" in outside.stdout, outside.stdout[-3000:]
    inside = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                            capture_output=True, text=True, env={**env, "CI": "true"}, timeout=600)
    assert inside.returncode == 1 and "2 failed" in inside.stdout, inside.stdout[-3000:]
    assert "no C++ compiler to build it with" in inside.stdout


def test_missing_wheels_fall_back_with_the_command_that_installs_them(tmp_path):
    """The one thing changed in the child: what the installed-package metadata says about the two oneDNN
    wheels (as on a machine without them); the model, the choice and the message are the real ones."""
    hide = textwrap.dedent("""
        import importlib.metadata as metadata
        _real = metadata.distribution
        def distribution(name):
            if name.startswith("onednn"):
                raise metadata.PackageNotFoundError(name)
            return _real(name)
        metadata.distribution = distribution
    """)
    done = run_probe(tmp_path, hide + PROBE)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(1, 3)" in done.stdout and "available False choice xla,xla,winograd_f4" in done.stdout
    assert ("the onednn-cpu-gomp and onednn-devel-cpu-gomp wheels are not installed (pip install onednn-cpu-gomp "
            "onednn-devel-cpu-gomp, or `pip install -e .` again in the clone, then python -m resnet_jax.ops.onednn "
            "--build)" in done.stderr), done.stderr[-3000:]


def test_off_switch_runs_the_pure_jax_convolutions_and_says_so_once(tmp_path):
    done = run_probe(tmp_path, RESNET_JAX_ONEDNN="0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(1, 3)" in done.stdout and "available False choice xla,xla,winograd_f4" in done.stdout
    lines = [line for line in done.stderr.splitlines() if "oneDNN" in line]
    assert lines == ["resnet_jax: oneDNN convolutions are off (RESNET_JAX_ONEDNN=0 turns it off); "
                     "using the pure-JAX convolutions"]


def test_missing_compiler_falls_back_with_the_reason(tmp_path):
    require_onednn_toolchain()
    done = run_probe(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "available False" in done.stdout
    assert "no C++ compiler to build it with (CXX=" in done.stderr and "not found" in done.stderr


def test_failed_build_falls_back_with_the_compiler_output(tmp_path):
    require_onednn_toolchain()
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\necho 'fatal: this compiler is broken' >&2\nexit 1\n")
    broken.chmod(0o755)
    done = run_probe(tmp_path, CXX=str(broken))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "available False" in done.stdout
    assert "building it failed" in done.stderr and "fatal: this compiler is broken" in done.stderr
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-built is left to be loaded later


def test_build_is_locked_cached_per_toolchain_and_reused(tmp_path):
    """Two processes starting at once (pytest -n 2, the processes of a multi-host run) build once: one compiles
    while the other waits for the lock, then both load the same file. Later processes reuse it; another
    compiler is another build."""
    require_onednn_toolchain()
    both = [start_probe(tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in both]
    for process, (stdout, stderr) in zip(both, outputs):
        assert process.returncode == 0, stderr[-3000:]
        assert "available True choice onednn_winograd_f4,onednn_winograd_f4,onednn_winograd_f4" in stdout
    builds = [line for _, stderr in outputs for line in stderr.splitlines() if "building the oneDNN" in line]
    assert len(builds) == 1, [stderr for _, stderr in outputs]
    (built,) = list((tmp_path / "cache").rglob("*.so"))
    stamp = built.stat().st_mtime_ns
    second = run_probe(tmp_path)
    assert second.returncode == 0 and "available True" in second.stdout
    assert [p for p in (tmp_path / "cache").rglob("*.so")] == [built] and built.stat().st_mtime_ns == stamp
    # another compiler is another build, in its own directory
    wrapper = tmp_path / "my-g++"
    wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('g++')} \"$@\"\n")
    wrapper.chmod(0o755)
    third = run_probe(tmp_path, CXX=str(wrapper))
    assert third.returncode == 0 and "available True" in third.stdout, third.stderr[-3000:]
    assert len(list((tmp_path / "cache").rglob("*.so"))) == 2


@pytest.mark.parametrize("call", [
    "calls.conv_backward_weights(x, x, spec)",
    "calls.conv_backward_data(x, jnp.ones((3, 3, 8, 8)), spec)",
    "calls.winograd_backward_weights(x, x, ((1, 1), (1, 1)), 4)",
])
def test_each_pass_loads_the_extension_when_called_first(tmp_path, call):
    """A process whose first use of the extension is a backward pass must find its FFI targets registered."""
    require_onednn_toolchain()
    code = textwrap.dedent(f"""
        import jax, jax.numpy as jnp
        from resnet_jax.ops import ConvSpec
        from resnet_jax.ops.onednn import calls
        x = jnp.ones((2, 6, 6, 8))
        spec = ConvSpec.of(x, jnp.ones((3, 3, 8, 8)), (1, 1), ((1, 1), (1, 1)), 1)
        print(jax.jit(lambda x: {call})(x).shape)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


OPENMP_PROBE = textwrap.dedent("""
    import ctypes, os, sys
    from resnet_jax.ops import onednn
    assert onednn.available(), onednn.unavailable_reason()
    print("environment after", os.environ.get("OMP_WAIT_POLICY"), flush=True)
    ctypes.CDLL("libgomp.so.1").omp_display_env(0)  # the extension's OpenMP runtime prints its settings
""")


@pytest.mark.parametrize("user_choice", [None, "active"])
def test_extension_openmp_threads_sleep_between_calls_unless_the_user_says_otherwise(user_choice):
    """Spin-waiting OpenMP threads would take the cores XLA's fusions need between our calls; the setting is
    ours alone: the process environment is left as it was."""
    require_onednn_toolchain()
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user_choice:
        env["OMP_WAIT_POLICY"] = user_choice
    done = subprocess.run([sys.executable, "-c", OPENMP_PROBE], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"environment after {user_choice}" in done.stdout
    want = "PASSIVE" if user_choice is None else user_choice.upper()
    assert f"OMP_WAIT_POLICY = '{want}'" in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("name, conv_impl, blocks", [("resnet50", "auto", 16), ("resnet18", "onednn_winograd_f4", 8)])
def test_folded_blocks_add_the_residual_in_place_without_copies(name, conv_impl, blocks):
    """Each residual block's last convolution writes into its residual's buffer (one pass over the output less
    than reading it and writing a second buffer); the residual is dead after the add, so XLA must alias it
    without inserting a copy. Values are covered by the folding and convolution tests."""
    require_onednn_toolchain()
    import re

    import jax
    import jax.numpy as jnp

    from resnet_jax import create_model, ops

    model = create_model(name, num_classes=10, conv_impl=conv_impl)
    x = jnp.zeros((2, 48, 48, 3))
    folded, variables = ops.fold_batchnorm(model, model.init(jax.random.key(0), x, train=False))
    hlo = jax.jit(lambda v, x: folded.apply(v, x, train=False)).lower(variables, x).compile().as_text()
    assert len(re.findall(r"custom_call_target=\"ResnetJax\w+Forward\"[^\n]*output_to_operand_aliasing", hlo)) \
        == blocks, hlo
    assert not re.findall(r"= \S+ copy\(", hlo)
    assert conv_impl == "auto" or "ResnetJaxWinogradForward" in hlo
