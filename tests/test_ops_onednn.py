"""The optional oneDNN extension: built where its wheels and a compiler are, cached, and replaced by the
pure-JAX convolutions, with one line saying why, wherever it cannot be used. Real processes; one real build (the
extension's normal cached one, which the rest of the suite loads too), and a stand-in compiler that records its
invocations for the lock and the cache key."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import on_linux_x86_64, require_onednn_toolchain
from resnet_jax.ops import onednn


PROBE = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from resnet_jax import create_model
    import logging
    from resnet_jax.ops import ConvSpec, choose, onednn
    logging.basicConfig(format="%(message)s")
    logging.getLogger("resnet_jax").setLevel(logging.INFO)  # the build's own lines too
    model = create_model("resnet20", stage_sizes=(1, 1, 1), num_classes=3, in_channels=1)
    x = jnp.ones((1, 8, 8, 1))
    print(jax.jit(lambda x: model.apply(model.init(jax.random.key(0), x), x))(x).shape)  # one compilation
    g = ConvSpec(128, 16, 16, 128, 128, (3, 3), (1, 1), ((1, 1), (1, 1)), 1, "float32")  # 9.7 GFLOP: Winograd
    print("available", onednn.available(), "choice", ",".join(choose(g, "cpu")))
""")


def run_probe(tmp_path, code=PROBE, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=600)


def test_extension_is_available_wherever_its_wheels_and_a_compiler_are():
    require_onednn_toolchain()
    assert onednn.available(), onednn.unavailable_reason()
    assert onednn.version().startswith("3.")


def test_build_command_checks_every_extension_algorithm_against_xla():
    """README's ``python -m resnet_jax.ops.onednn --build``: each extension algorithm on its own kind of layer
    (the dilated ones on a dilated 3x3), all three passes against XLA's; exit 0 and the binary's path."""
    require_onednn_toolchain()
    done = subprocess.run([sys.executable, "-m", "resnet_jax.ops.onednn", "--build"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "extension ready and checked against XLA: " in done.stdout and "libresnet_jax_onednn.so" in done.stdout


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


def test_an_unwritable_build_cache_falls_back_naming_it(tmp_path):
    """Used to be: the reason was "[Errno 2] No such file or directory: '/proc/...'" alone."""
    require_onednn_toolchain()
    done = run_probe(tmp_path, XDG_CACHE_HOME="/proc/no-such-dir")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "available False" in done.stdout
    assert "cannot write its build cache /proc/no-such-dir/resnet_jax/onednn" in done.stderr
    assert "set XDG_CACHE_HOME to a writable directory" in done.stderr


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


# A stand-in for the C++ compiler: `--version` prints $FAKE_CXX_VERSION; a build appends its command line to
# the log beside it, holds on for a second (so a second process surely reaches the lock while it runs) and
# writes a placeholder at `-o`. What is checked is build.py's bookkeeping, not the compiler.
FAKE_CXX = """#!{python}
import os, sys, time
if sys.argv[1:] == ["--version"]:
    print(os.environ.get("FAKE_CXX_VERSION", "fake c++ 1.0"))
    sys.exit(0)
with open({log!r}, "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
time.sleep(1)
with open(sys.argv[sys.argv.index("-o") + 1], "w") as out:
    out.write("placeholder")
"""

# Each child imports, then waits until all its siblings have, so that their build() calls start together
BUILD_CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from resnet_jax.ops.onednn import build
    ready, siblings = Path(sys.argv[1]), int(sys.argv[2])
    (ready / str(os.getpid())).touch()
    while len(list(ready.iterdir())) < siblings:
        time.sleep(0.01)
    print(build.build())
""")


def fake_compiler(path, log):
    path.write_text(FAKE_CXX.format(python=sys.executable, log=str(log)))
    path.chmod(0o755)
    return path


def build_together(tmp_path, count, **env):
    ready = tmp_path / f"ready-{len(list(tmp_path.glob('ready-*')))}"
    ready.mkdir()
    full = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **env}
    children = [subprocess.Popen([sys.executable, "-c", BUILD_CHILD, str(ready), str(count)], env=full, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(count)]
    outputs = [child.communicate(timeout=300) for child in children]
    for child, (stdout, stderr) in zip(children, outputs):
        assert child.returncode == 0, stderr[-3000:]
    return [stdout.strip() for stdout, _ in outputs]


def test_build_is_locked_cached_per_toolchain_and_reused(tmp_path, monkeypatch):
    """Two processes starting at once (pytest -n 2, the processes of a multi-host run) build once: one compiles
    while the other waits for the lock, then both get the same file. Later processes reuse it; another compiler,
    or the same one at another version, is another build in its own directory."""
    require_onednn_toolchain()  # the wheels' headers and library: their paths are part of the command
    log = tmp_path / "compiled.log"
    cxx = fake_compiler(tmp_path / "fake-c++", log)
    first, second = build_together(tmp_path, 2, CXX=str(cxx))
    assert first == second and log.read_text().count("\n") == 1, log.read_text()
    built = Path(first)
    assert built.read_text() == "placeholder" and built.is_relative_to(tmp_path / "cache")
    (command,) = log.read_text().splitlines()
    output = Path(command.split(" -o ")[1].split()[0])  # a partial copy beside it, then renamed
    assert output.parent == built.parent and output.name.startswith(f".{built.name}.") and output.suffix == ".partial"
    stamp = built.stat().st_mtime_ns

    from resnet_jax.ops.onednn import build

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(cxx))
    assert build.build() == built and built.stat().st_mtime_ns == stamp  # a later process: no compiler run
    assert log.read_text().count("\n") == 1
    other = fake_compiler(tmp_path / "other-c++", log)  # another compiler, same version text
    monkeypatch.setenv("CXX", str(other))
    by_other = build.build()
    assert by_other.parent != built.parent and log.read_text().count("\n") == 2
    (upgraded,) = build_together(tmp_path, 1, CXX=str(cxx), FAKE_CXX_VERSION="fake c++ 1.1")  # same path
    assert Path(upgraded).parent not in (built.parent, by_other.parent) and log.read_text().count("\n") == 3
    assert sorted((tmp_path / "cache").rglob("*.so")) == sorted([built, by_other, Path(upgraded)])
    assert built.stat().st_mtime_ns == stamp


FIRST_CALL = textwrap.dedent("""
    import ctypes, os, sys
    import jax, jax.numpy as jnp
    from resnet_jax.ops import ConvSpec
    from resnet_jax.ops.onednn import calls
    x = jnp.ones((2, 6, 6, 8))
    spec = ConvSpec.of(x, jnp.ones((3, 3, 8, 8)), (1, 1), ((1, 1), (1, 1)), 1)
    print(jax.jit(lambda x: {call})(x).shape)
    print("environment after", os.environ.get("OMP_WAIT_POLICY"), flush=True)
    ctypes.CDLL("libgomp.so.1").omp_display_env(0)  # the extension's OpenMP runtime prints its settings
""")


@pytest.mark.parametrize("call, user_choice", [
    ("calls.conv_backward_weights(x, x, spec)", None),
    ("calls.conv_backward_data(x, jnp.ones((3, 3, 8, 8)), spec)", "active"),
    ("calls.winograd_backward_weights(x, x, ((1, 1), (1, 1)), 4)", None),
], ids=["conv_backward_weights", "conv_backward_data-user_says_active", "winograd_backward_weights"])
def test_first_call_of_each_pass_loads_the_extension_whose_openmp_threads_sleep(call, user_choice):
    """A process whose first use of the extension is a backward pass must find its FFI targets registered.

    And however it was loaded, its OpenMP threads sleep between calls unless the user says otherwise: spinning
    threads would take the cores XLA's fusions need between our calls. The setting is ours alone: the process
    environment is left as it was."""
    require_onednn_toolchain()
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user_choice:
        env["OMP_WAIT_POLICY"] = user_choice
    done = subprocess.run([sys.executable, "-c", FIRST_CALL.format(call=call)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"environment after {user_choice}" in done.stdout
    want = "PASSIVE" if user_choice is None else user_choice.upper()
    assert f"OMP_WAIT_POLICY = '{want}'" in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("name, conv_impl, stage_sizes", [("resnet50", "auto", (1, 1, 1, 2)),
                                                           ("resnet18", "onednn_winograd_f4", (1, 1, 1, 1))])
def test_folded_blocks_add_the_residual_in_place_without_copies(name, conv_impl, stage_sizes):
    """Each residual block's last convolution writes into its residual's buffer (one pass over the output less
    than reading it and writing a second buffer); the residual is dead after the add, so XLA must alias it
    without inserting a copy. Values are covered by the folding and convolution tests. Shallow models: each has
    blocks whose residual is a projection and blocks whose residual is the block's own input."""
    require_onednn_toolchain()
    import re

    import jax
    import jax.numpy as jnp

    from resnet_jax import create_model, ops

    model = create_model(name, stage_sizes=stage_sizes, num_classes=10, conv_impl=conv_impl)
    x = jnp.zeros((2, 40, 56, 3))
    folded, variables = ops.fold_batchnorm(model, jax.jit(model.init)(jax.random.key(0), x))
    hlo = jax.jit(lambda v, x: folded.apply(v, x, train=False)).lower(variables, x).compile().as_text()
    assert len(re.findall(r"custom_call_target=\"ResnetJax\w+Forward\"[^\n]*output_to_operand_aliasing", hlo)) \
        == sum(stage_sizes), hlo
    assert not re.findall(r"= \S+ copy\(", hlo)
    assert conv_impl == "auto" or "ResnetJaxWinogradForward" in hlo
