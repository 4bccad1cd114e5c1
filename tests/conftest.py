"""Helpers shared by the test files, one version of each; import them with ``from conftest import ...`` (pytest
puts tests/ on sys.path, as for ``training_helpers``).

- ``assert_close(actual, expected, what="", rtol_of_scale=1e-4, min_scale=0.0)``: same shape and dtype, and no
  entry further from the reference than ``rtol_of_scale`` times the reference's largest magnitude.
- ``random_batch_stats(variables, key)``: non-trivial BatchNorm statistics and affine parameters, for Flax
  variables or a torch ``state_dict``.
- ``random_variables(model, shape, seed=0)``: random variables for a Flax model without running ``init``;
  ``random_tree_like(tree, seed)``: normal values in a tree's shapes, drawn by numpy.
- ``run_python(snippet=None, *, module=None, args=(), env=None, timeout=300, check=True)``: a fresh Python
  process; a failure shows its output.
- ``require_onednn_toolchain()`` / ``require_onednn()``: skip a test where the oneDNN extension cannot be built /
  cannot be used here, and fail it instead on CI on Linux x86_64, where it must work;
  ``onednn_toolchain_missing()`` gives the reason, or None.

Importing this file also gives the whole test session one persistent JAX compilation cache (see
``share_one_compilation_cache``).
"""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
# pytest imports tracemalloc while it reports an unraisable exception (Orbax's, pyproject.toml's filterwarnings);
# imported first inside tensorflow_datasets' lazy-import block, it became a placeholder and the report itself
# failed the test it landed in
import tracemalloc  # noqa: F401

try:
    # tensorflow (which the TFDS tests import through tensorflow_datasets) loaded before triton (which importing
    # torchvision pulls in through torch._dynamo) makes triton's library segfault as it loads: `python -c "import
    # tensorflow; import torchvision"` exits 139 with tensorflow 2.x and torch 2.14. A pytest-xdist worker that ran
    # a TFDS test then died in its next torchvision parity test. Loaded first, both work.
    import torchvision  # noqa: F401
except ImportError:  # the parity tests skip or fail on their own where the dev extra is missing
    pass
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Computations cheaper to compile than this are not written to the cache: writing costs more than it saves.
CACHE_MIN_COMPILE_SECONDS = 0.2


def share_one_compilation_cache() -> None:
    """One persistent JAX compilation cache, in a temporary directory, for every process of the test session.

    Why: many tests compile the same computations (the same small models under different tests, the pytest-xdist
    workers, the training and export subprocesses), and compiling is most of the suite's time on a 2-core
    machine. JAX reads these variables when it is imported, so they are set here, before any test module imports
    it; xdist workers and subprocesses inherit them and share the directory. The process that made the directory
    removes it at exit, so every session starts cold and leaves nothing behind. A cache directory already in the
    environment (the user's own) is left alone."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    directory = tempfile.mkdtemp(prefix="resnet-jax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(CACHE_MIN_COMPILE_SECONDS)
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    if "jax" in sys.modules:  # imported before this file (a plugin): too late for the variables, not for the config
        import jax

        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)


share_one_compilation_cache()


def assert_same_distribution(ours, theirs, what: str, p_min: float = 1e-3) -> None:
    """Two samples (ours, and the reference library's own draws) from one distribution: the two-sample
    Kolmogorov-Smirnov test does not reject at ``p_min``. Seeded on both sides, so a pass is not luck that can
    change; a distribution drawn differently (another parameter, a lost sign) gives p far below it."""
    from scipy.stats import ks_2samp

    result = ks_2samp(np.ravel(ours), np.ravel(theirs))
    assert result.pvalue > p_min, (f"{what}: ours and the reference's draws differ (KS statistic "
                                   f"{result.statistic:.3f}, p={result.pvalue:.2g}; means {np.mean(ours):.4g} "
                                   f"against {np.mean(theirs):.4g})")


def assert_close(actual, expected, what: str = "", rtol_of_scale: float = 1e-4, min_scale: float = 0.0) -> None:
    """``max |actual - expected| <= rtol_of_scale * max(min_scale, max |expected|)``, after checking that shape and
    dtype agree. The bound is relative to the reference's scale, not to each entry, so float32 rounding in entries
    near zero does not fail it, while any mapping error (a transposed kernel, a swapped statistic) does."""
    __tracebackhide__ = True
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    if not expected.size:
        return
    a, b = actual.astype(np.float64), expected.astype(np.float64)
    scale = max(min_scale, float(np.abs(b).max()))
    err = float(np.abs(a - b).max())
    assert err <= rtol_of_scale * scale, (f"{what}: max |diff| {err:.3g} is over {rtol_of_scale:g} x the scale "
                                          f"{scale:.3g}")


# BatchNorm leaves by name (Flax / torch): those drawn around 1 and those drawn around 0.
_AROUND_ONE = ("scale", "var", "weight", "running_var")
_AROUND_ZERO = ("bias", "mean", "running_mean")


def random_variables(model, shape, seed: int = 0, **init_kwargs):
    """Variables of ``model`` for an input of ``shape``, made without running its initializers: He-scaled normal
    kernels drawn by numpy on ``jax.eval_shape``'s shapes, and trained-like BatchNorm statistics and affine
    parameters (``random_batch_stats``). Why: ``model.init`` run op by op computes a whole forward pass and
    compiles each operation (seconds per model), and compiled it costs a compilation; the tests need only
    weights. ``init_kwargs`` go to ``init`` (``train=False`` for a module that takes it)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)

    def draw(x):
        if x.ndim < 2:  # BatchNorm's and the head's vectors: drawn by random_batch_stats
            return np.zeros(x.shape, x.dtype)
        return (rng.standard_normal(x.shape) * np.sqrt(2 / np.prod(x.shape[:-1]))).astype(x.dtype)

    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), **init_kwargs))
    return random_batch_stats(jax.tree.map(draw, abstract), seed)


def random_tree_like(tree, seed: int):
    """Standard normal values in the shapes and dtypes of ``tree`` (tangents, probes), drawn by numpy: drawn by
    ``jax.random``, each new shape would compile its own program."""
    import jax

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(rng.standard_normal(np.shape(x)), x.dtype), tree)


def random_batch_stats(variables, key):
    """Non-trivial BatchNorm statistics and affine parameters, as after training: every one-dimensional scale
    and variance is drawn from U(0.5, 1.5), every bias and mean from 0.2 N(0, 1). A fresh model's (1, 0, 0, 1)
    would hide a statistic loaded into the wrong slot; these do not. Convolution and dense kernels are kept.

    ``variables``: Flax variables (``{"params", "batch_stats"}``; new ones are returned), or a torch
    ``state_dict`` (a new one is returned, for ``load_state_dict``). ``key``: an int seed or a JAX PRNG key; the
    draws are numpy's (no JAX computation to compile), in the order of the leaves."""
    import jax

    if not isinstance(key, int):
        key = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
        key = np.asarray(key).ravel().tolist()
    rng = np.random.default_rng(key)

    def draw(name, shape):
        if name in _AROUND_ONE:
            return rng.uniform(0.5, 1.5, shape)
        return 0.2 * rng.standard_normal(shape)

    def touched(name, ndim):
        return ndim == 1 and name in _AROUND_ONE + _AROUND_ZERO

    if "params" in variables:  # Flax
        import jax.numpy as jnp

        def leaf(path, x):
            name = getattr(path[-1], "key", None)
            return jnp.asarray(draw(name, x.shape), x.dtype) if touched(name, np.ndim(x)) else x
        return jax.tree_util.tree_map_with_path(leaf, dict(variables))

    import torch  # a torch state_dict

    out = {}
    for name, tensor in variables.items():
        short = name.rsplit(".", 1)[-1]
        if touched(short, tensor.ndim) and tensor.is_floating_point():
            tensor = torch.from_numpy(draw(short, tuple(tensor.shape))).to(tensor.dtype)
        out[name] = tensor
    return out


def run_python(snippet: str | None = None, *, module: str | None = None, args: Sequence = (),
               env: Mapping[str, str] | None = None, timeout: float = 300, check: bool = True,
               cwd: str | Path = REPO) -> subprocess.CompletedProcess:
    """``python -c SNIPPET ARGS...`` (the snippet dedented), or ``python -m MODULE ARGS...``, in a fresh process
    from the repository root; returns the ``CompletedProcess`` (text). ``env``: the child's whole environment
    (default: this process's). With ``check`` a non-zero exit fails the test, and a timeout always does, showing
    the command and the ends of its stdout and stderr."""
    __tracebackhide__ = True
    if (snippet is None) == (module is None):
        raise TypeError("run_python takes a snippet or a module=, not both or neither")
    command = [sys.executable, *(["-c", textwrap.dedent(snippet)] if module is None else ["-m", module]),
               *map(str, args)]
    shown = " ".join(command[:2] + (["<snippet>"] if module is None else [module]) + command[3:])
    try:
        proc = subprocess.run(command, cwd=cwd, env=None if env is None else dict(env), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{shown} ran over {timeout} s\n{_tails(err.stdout, err.stderr)}")
    if check and proc.returncode != 0:
        pytest.fail(f"{shown} exited with {proc.returncode}\n{_tails(proc.stdout, proc.stderr)}")
    return proc


def _tails(stdout, stderr) -> str:
    def text(out):
        return (out.decode(errors="replace") if isinstance(out, bytes) else out or "")[-4000:]
    return f"--- stdout (end) ---\n{text(stdout)}\n--- stderr (end) ---\n{text(stderr)}"


def on_linux_x86_64() -> bool:
    return sys.platform.startswith("linux") and platform.machine() == "x86_64"


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def onednn_toolchain_missing() -> str | None:
    """Why the oneDNN extension cannot be expected to build here (not Linux x86_64, its wheels absent, no C++
    compiler), or None where it must build. Read afresh on each call: ``CXX`` in the environment picks the
    compiler."""
    from resnet_jax.ops.onednn.build import OnednnUnavailable, toolchain

    try:
        toolchain()
    except OnednnUnavailable as err:
        return str(err)
    return None


def _skip_or_fail(reason: str) -> None:
    """Skip with the reason; but CI on Linux x86_64 installs the wheels and a compiler, so there an unusable
    extension is a broken build, and skipping would leave CI green with every fast algorithm untested."""
    __tracebackhide__ = True
    if on_ci() and on_linux_x86_64():
        pytest.fail(f"CI on Linux x86_64 must run the oneDNN extension, but it is unusable: {reason}")
    pytest.skip(reason)


def require_onednn_toolchain() -> None:
    """For tests that build the extension themselves: skip where it cannot be built (fail on CI, see above)."""
    __tracebackhide__ = True
    if reason := onednn_toolchain_missing():
        _skip_or_fail(reason)


def require_onednn() -> None:
    """For tests that run the extension: skip where this process cannot use it (fail on CI, see above)."""
    __tracebackhide__ = True
    from resnet_jax.ops import onednn

    if reason := onednn.unavailable_reason():
        _skip_or_fail(f"the oneDNN extension is unavailable here: {reason}")
