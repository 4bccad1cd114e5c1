"""oneDNN convolutions inside jitted JAX code on CPU: an optional accelerator, built on first use.

XLA:CPU's convolutions run at 40-70% of oneDNN's on ResNet shapes (docs/cpu-convolution.md); calling
oneDNN's kernels through ``jax.ffi`` closes that gap while XLA keeps fusing everything around them. The C++
source (``_onednn/conv.cc``) is compiled once with the machine's C++ compiler against the headers and library
of the ``onednn-devel-cpu-gomp`` / ``onednn-cpu-gomp`` wheels (``pip install "resnet-jax[cpu]"``) into a
cache directory keyed by everything the binary depends on, so a new jaxlib or oneDNN rebuilds it.

Nothing here is required: ``available()`` is False (and says why, once) when the wheels, the compiler or the
build are missing, and ``conv_impl="auto"`` then runs the pure-JAX algorithms. ``RESNET_JAX_ONEDNN=0`` turns
the extension off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCES = tuple(sorted((Path(__file__).with_name("_onednn")).glob("*.cc")))
HEADERS = tuple(sorted((Path(__file__).with_name("_onednn")).glob("*.h")))
ENV_VAR = "RESNET_JAX_ONEDNN"
TARGETS = ("ResnetJaxConvForward", "ResnetJaxConvBackwardData", "ResnetJaxConvBackwardWeights",
           "ResnetJaxWinogradForward", "ResnetJaxWinogradBackwardWeights", "ResnetJaxMatmul")
_LIB_DIST, _HEADERS_DIST = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"
logger = logging.getLogger("resnet_jax")


class OnednnUnavailable(RuntimeError):
    """The oneDNN extension cannot be used here; the message says why and how to get it."""


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "resnet_jax" / "onednn"


def _dist_file(dist: str, suffix: str) -> Path | None:
    """A file of an installed wheel whose path ends with ``suffix`` (wheels put these under the prefix)."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            path = Path(f.locate()).resolve()
            if path.exists():
                return path
    return None


def _toolchain() -> dict[str, str]:
    """Paths the build needs, or ``OnednnUnavailable`` naming the missing piece and the fix."""
    header = _dist_file(_HEADERS_DIST, "oneapi/dnnl/dnnl.hpp")
    library = _dist_file(_LIB_DIST, "libdnnl.so.3") or _dist_file(_LIB_DIST, "libdnnl.so")
    if header is None or library is None:
        raise OnednnUnavailable(f"the {_LIB_DIST} and {_HEADERS_DIST} wheels are not installed "
                                '(pip install "resnet-jax[cpu]")')
    wanted = os.environ.get("CXX")  # an explicit choice is honoured, not second-guessed
    compiler = shutil.which(wanted) if wanted else shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise OnednnUnavailable(f"no C++ compiler to build it with ({f'CXX={wanted!r} not found' if wanted else 'install g++'})")
    return {"compiler": compiler, "include": str(header.parents[2]), "library": str(library),
            "jax_include": jax.ffi.include_dir()}


def _cpu_flags() -> str:
    """The CPU's feature flags: the build uses -march=native, so a cache shared between machines keys on them."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def native_bfloat16() -> bool:
    """Whether the CPU has bfloat16 instructions (AVX-512 BF16 or AMX). oneDNN 3.2 refuses to create bfloat16
    convolutions on an AVX2-only CPU ("could not create a primitive descriptor"), so elsewhere bfloat16 layers
    stay with XLA."""
    flags = _cpu_flags().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _build(tools: dict[str, str]) -> Path:
    """Compile the extension into the cache (once per source/toolchain/jaxlib/oneDNN/CPU); returns the .so path."""
    import jaxlib

    texts = [p.read_text() for p in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\n".join([*texts, jaxlib.__version__, *tools.values(), _cpu_flags(),
                                    importlib.metadata.version(_LIB_DIST)]).encode()).hexdigest()[:16]
    target = cache_dir() / key / "libresnet_jax_onednn.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    lib_dir = str(Path(tools["library"]).parent)
    command = [tools["compiler"], "-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w",
               f"-I{tools['jax_include']}", f"-I{tools['include']}", *map(str, SOURCES), "-o", str(partial),
               tools["library"], f"-Wl,-rpath,{lib_dir}"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise OnednnUnavailable(f"building it failed ({' '.join(command)}): {done.stderr.strip()[-2000:]}")
    os.replace(partial, target)  # atomic: concurrent first uses (pytest -n 2) each build, one file wins
    logger.info("built the oneDNN extension in %.1f s: %s", time.perf_counter() - start, target)
    return target


def _open_with_passive_openmp(path: Path) -> ctypes.CDLL:
    """Load the extension so that its OpenMP threads sleep between calls instead of spin-waiting.

    libgomp's default keeps a finished parallel region's threads spinning for a while. Between two of our calls
    XLA runs its own fusions on its own threads, and a spinning OpenMP thread holds one of the cores they need:
    a tiny convolution call then took 15 ms instead of 0.2-0.4 ms, and whole steps ran 1.15-1.25x slower
    (BENCHMARKS.md). libgomp reads ``OMP_WAIT_POLICY`` once, when it is loaded, so it is set only around the
    load (a value the user set is kept) and restored at once: other OpenMP runtimes loaded later in the process,
    e.g. torch's own copy, keep their defaults.
    """
    user_choice = os.environ.get("OMP_WAIT_POLICY")
    if user_choice is None:
        os.environ["OMP_WAIT_POLICY"] = "passive"
    try:
        return ctypes.CDLL(str(path))
    finally:
        if user_choice is None:
            del os.environ["OMP_WAIT_POLICY"]


@functools.cache
def _load() -> ctypes.CDLL:
    if os.environ.get(ENV_VAR, "").strip().lower() in ("0", "false", "no", "off"):
        raise OnednnUnavailable(f"{ENV_VAR}=0 turns it off")
    if not sys.platform.startswith("linux"):
        raise OnednnUnavailable("it is built for Linux only")
    path = _build(_toolchain())
    lib = _open_with_passive_openmp(path)
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return lib


@functools.cache
def unavailable_reason() -> str | None:
    """None when the extension is ready, else why not (logged once, the first time anyone asks)."""
    try:
        _load()
    except (OnednnUnavailable, OSError) as err:
        logger.warning("resnet_jax: oneDNN convolutions are off (%s); using the pure-JAX convolutions", err)
        return str(err)
    return None


def available() -> bool:
    return unavailable_reason() is None


def version() -> str:
    """oneDNN's version, e.g. "3.2.0" (raises ``OnednnUnavailable`` when it cannot be loaded)."""
    v = _load().ResnetJaxOnednnVersion()
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def _geometry(strides, padding, groups) -> dict:
    (top, bottom), (left, right) = padding
    return dict(strides=np.asarray(strides, np.int64), padding=np.asarray([top, bottom, left, right], np.int64),
                groups=np.int64(groups))


def _output_shape(x_shape, kernel_shape, strides, padding):
    (kh, kw, _, cout), (sh, sw) = kernel_shape, strides
    ho = (x_shape[1] + sum(padding[0]) - kh) // sh + 1
    wo = (x_shape[2] + sum(padding[1]) - kw) // sw + 1
    return (x_shape[0], ho, wo, cout)


def _call(target: str, shape, dtype, *operands, in_place: int | None = None, **attrs):
    """One FFI call; ``in_place`` names an operand whose buffer becomes the result (XLA copies it first only
    where it is still needed elsewhere)."""
    _load()  # registers the targets (once); raises OnednnUnavailable where it cannot
    aliases = {} if in_place is None else {in_place: 0}
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, dtype), vmap_method="sequential",
                            input_output_aliases=aliases)(*operands, **attrs)


def _epilogue_operands(bias, residual, shape, dtype):
    """The optional operands after (x, kernel), and the index of the residual, which is updated in place: the
    kernel adds its result to the residual's buffer instead of reading it and writing a second buffer (one
    pass over the output less; a residual is dead after the add, so XLA needs no copy)."""
    extra = [] if bias is None else [bias]
    if residual is None:
        return extra, None
    if residual.shape != tuple(shape):
        raise ValueError(f"the residual's shape {residual.shape} is not the convolution's output shape {tuple(shape)}")
    return [*extra, residual.astype(dtype)], 2 + len(extra)


def forward(x, kernel, strides, padding, groups, bias=None, residual=None, relu=False):
    """``relu(conv(x, kernel) + bias + residual)`` in one oneDNN call (bias, residual, relu optional)."""
    shape = _output_shape(x.shape, kernel.shape, strides, padding)
    extra, in_place = _epilogue_operands(bias, residual, shape, x.dtype)
    return _call(TARGETS[0], shape, x.dtype, x, kernel, *extra, in_place=in_place,
                 has_bias=np.int64(bias is not None), has_residual=np.int64(residual is not None),
                 relu=np.int64(bool(relu)), **_geometry(strides, padding, groups))


def backward_data(dy, kernel, x_shape, strides, padding, groups):
    return _call(TARGETS[1], x_shape, dy.dtype, dy, kernel, **_geometry(strides, padding, groups))


def backward_weights(x, dy, kernel_shape, kernel_dtype, strides, padding, groups):
    return _call(TARGETS[2], kernel_shape, kernel_dtype, x, dy, **_geometry(strides, padding, groups))


def winograd_forward(x, kernel, padding, m, bias=None, residual=None, relu=False):
    """A 3x3 stride-1 convolution by Winograd F(m x m, 3 x 3), with the same optional epilogue as ``forward``."""
    shape = _output_shape(x.shape, kernel.shape, (1, 1), padding)
    extra, in_place = _epilogue_operands(bias, residual, shape, x.dtype)
    return _call(TARGETS[3], shape, x.dtype, x, kernel, *extra, in_place=in_place,
                 padding=_geometry((1, 1), padding, 1)["padding"], m=np.int64(m),
                 has_bias=np.int64(bias is not None), has_residual=np.int64(residual is not None),
                 relu=np.int64(bool(relu)))


def winograd_backward_data(dy, kernel, padding, m):
    """The input gradient of a 3x3 stride-1 convolution is one too: the flipped kernel with in/out exchanged,
    padded by 2 - p on each side."""
    (top, bottom), (left, right) = padding
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    return winograd_forward(dy, flipped, ((2 - top, 2 - bottom), (2 - left, 2 - right)), m)


def winograd_backward_weights(x, dy, padding, m, kernel_dtype=None):
    dk = _call(TARGETS[4], (3, 3, x.shape[-1], dy.shape[-1]), x.dtype, x, dy,
               padding=_geometry((1, 1), padding, 1)["padding"], m=np.int64(m))
    return dk if kernel_dtype is None else dk.astype(kernel_dtype)


def matmul(a, b, transpose_a=False, transpose_b=False):
    """``a @ b`` (float32) by oneDNN's GEMM; ``transpose_a``/``transpose_b`` read an operand stored transposed."""
    rows = a.shape[1] if transpose_a else a.shape[0]
    cols = b.shape[0] if transpose_b else b.shape[1]
    return _call(TARGETS[5], (rows, cols), jnp.float32, a, b, transpose_lhs=np.int64(transpose_a),
                 transpose_rhs=np.int64(transpose_b))
