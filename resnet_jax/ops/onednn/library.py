"""Loading the built extension and registering its FFI targets; whether it is usable here, and why not.

Nothing needs the extension: ``available()`` is False (and the reason is logged once) when the wheels, the
compiler or the build are missing, and ``conv_impl="auto"`` then runs the pure-JAX algorithms.
``RESNET_JAX_ONEDNN=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import jax

from resnet_jax.ops.onednn.build import OnednnBuildFailed, OnednnUnavailable, build

ENV_VAR = "RESNET_JAX_ONEDNN"
# The C++ entry points, registered as FFI targets of the same names (csrc/*.cc)
TARGETS = ("ResnetJaxConvForward", "ResnetJaxConvBackwardData", "ResnetJaxConvBackwardWeights",
           "ResnetJaxWinogradForward", "ResnetJaxWinogradBackwardWeights", "ResnetJaxMatmul",
           "ResnetJaxMatmulAccumulate", "ResnetJaxPatchKernelGrad", "ResnetJaxMaxPool", "ResnetJaxMaxPoolGrad",
           "ResnetJaxBatchNormSums", "ResnetJaxBatchNormApply", "ResnetJaxBatchNormGradSums",
           "ResnetJaxBatchNormGradSumsMasked", "ResnetJaxBatchNormGradApply")
logger = logging.getLogger("resnet_jax")


def _open_with_passive_openmp(path: Path) -> ctypes.CDLL:
    """Load the extension so that its OpenMP threads sleep between calls instead of spin-waiting.

    libgomp's default keeps a finished parallel region's threads spinning for a while. Between two of our calls
    XLA runs its own fusions on its own threads, and a spinning OpenMP thread holds a core they need: tiny
    convolution calls then took tens of times longer and whole steps ran slower (docs/ops.md has the figures).
    libgomp reads ``OMP_WAIT_POLICY`` once, when it is loaded, so it is set only around the load (a value the
    user set is kept) and restored at once: other OpenMP runtimes loaded later in the process, e.g. torch's own
    copy, keep their defaults.
    """
    user_choice = os.environ.get("OMP_WAIT_POLICY")
    if user_choice is None:
        os.environ["OMP_WAIT_POLICY"] = "passive"
    try:
        return ctypes.CDLL(str(path))
    finally:
        if user_choice is None:
            del os.environ["OMP_WAIT_POLICY"]


def built_library() -> str:
    """The loaded extension's file ("" where there is none): its path names its build (sources, oneDNN, jaxlib)."""
    return str(load()._name) if available() else ""


@functools.cache
def load() -> ctypes.CDLL:
    """The loaded extension with its targets registered (built first if needed); raises ``OnednnUnavailable``."""
    if os.environ.get(ENV_VAR, "").strip().lower() in ("0", "false", "no", "off"):
        raise OnednnUnavailable(f"{ENV_VAR}=0 turns it off")
    lib = _open_with_passive_openmp(build())
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return lib


@functools.cache
def unavailable_reason() -> str | None:
    """None when the extension is ready, else why not, logged once, the first time anyone asks: at INFO where a
    piece is merely absent (another platform, no compiler, switched off; the line says what to run), at WARNING
    where it is broken (the compiler failed, the binary does not load)."""
    try:
        load()
    except (OnednnUnavailable, OSError) as err:
        broken = isinstance(err, (OnednnBuildFailed, OSError))
        logger.log(logging.WARNING if broken else logging.INFO,
                   "resnet_jax: oneDNN convolutions are off (%s); using the pure-JAX convolutions", err)
        return str(err)
    return None


def available() -> bool:
    return unavailable_reason() is None


def version() -> str:
    """oneDNN's version, e.g. "3.2.0" (raises ``OnednnUnavailable`` when it cannot be loaded)."""
    v = load().ResnetJaxOnednnVersion()
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"
