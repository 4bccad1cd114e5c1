"""Asking whether an algorithm fits a convolution reads shapes and dtypes only: it never builds, loads or even
looks for the C++ extension. Only a convolution that fits asks whether the extension is there."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import require_onednn_toolchain
from resnet_jax.ops.registry import REGISTRY

# In a fresh process with a fresh cache directory and a compiler that only writes down that it was called
PROBE = textwrap.dedent("""
    import itertools, os, pathlib
    from resnet_jax.ops import ConvSpec
    from resnet_jax.ops.registry import REGISTRY

    marker = pathlib.Path(os.environ["CXX_MARKER"])
    specs = [ConvSpec(2, 9, 9, cin, 8, (k, k), (s, s), ((p, p), (p, p)), g, dtype)
             for k, s, p, g, cin, dtype in itertools.product((1, 3, 7), (1, 2), (0, 1, 3), (1, 2), (4, 16),
                                                             ("float32", "bfloat16", "float16"))]
    refused = 0
    for algorithm in REGISTRY.values():
        for spec in specs:
            if algorithm.limits(spec) is not None:
                assert algorithm.refusal(spec, "cpu") is not None
                refused += 1
            if algorithm.cpu_only:
                assert "runs on CPU only" in algorithm.refusal(spec, "gpu")
    assert not marker.exists(), "asking the limits called the compiler: " + marker.read_text()
    fits = ConvSpec(2, 9, 9, 16, 8, (3, 3), (1, 1), ((1, 1), (1, 1)), 1, "float32")
    reason = REGISTRY["onednn"].refusal(fits, "cpu")  # the positive control: this one asks for the extension
    print("refused", refused, "compiler called", marker.exists(), "reason", reason)
""")


def test_limits_never_build_the_extension(tmp_path):
    require_onednn_toolchain()  # the control below needs the wheels, which the build looks for before the compiler
    marker = tmp_path / "compiler_called"
    fake = tmp_path / "fake-g++"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {marker}\nexit 1\n')
    fake.chmod(0o755)
    env = {**os.environ, "CXX": str(fake), "CXX_MARKER": str(marker), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "JAX_PLATFORMS": "cpu"}
    env.pop("RESNET_JAX_ONEDNN", None)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    words = done.stdout.split()
    assert int(words[words.index("refused") + 1]) > 500  # most (algorithm, shape) pairs were refused
    # the control: a convolution that fits asked for the extension, whose build called the compiler and failed
    assert "compiler called True" in done.stdout and "is unavailable (building it failed" in done.stdout


def test_every_extension_algorithm_declares_its_availability_apart_from_its_limits():
    """``limits`` are shapes; ``unavailable`` is the extension. The pure-JAX algorithms are always available."""
    for name, algorithm in REGISTRY.items():
        assert (algorithm.unavailable is not None) == algorithm.cpu_only, name
