"""Compiling the extension: find the toolchain, key the binary by everything it depends on, build it once.

The C++ sources (``csrc/``) are compiled with the machine's C++ compiler against the headers and library of the
``onednn-devel-cpu-gomp`` / ``onednn-cpu-gomp`` wheels into a cache directory. The key covers the sources, the
full command line, the compiler's own version, jaxlib's version (the FFI headers), both wheels' versions and the
CPU's flags (``-march=native``), so any change rebuilds and nothing stale is ever loaded. A file lock makes
concurrent first uses (``pytest -n 2``, one process per host of a multi-process run) build once: the first
process builds while the others wait, then all load the same file.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax

from resnet_jax.atomic import one_at_a_time, replace_atomically
from resnet_jax.ops import cpu

SOURCE_DIR = Path(__file__).with_name("csrc")
LIBRARY_DIST, HEADERS_DIST = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"
# The wheels are default dependencies on Linux x86_64 (pyproject.toml); this puts them back where they went missing
INSTALL_HINT = (f"pip install {LIBRARY_DIST} {HEADERS_DIST}, or `pip install -e .` again in the clone, then "
                "python -m resnet_jax.ops.onednn --build")
logger = logging.getLogger("resnet_jax")


class OnednnUnavailable(RuntimeError):
    """The oneDNN extension cannot be used here; the message says why and how to get it."""


class OnednnBuildFailed(OnednnUnavailable):
    """Everything the build needs is there, yet compiling failed: something is broken, not merely absent."""


def supported_platform() -> bool:
    """Where the oneDNN wheels exist (pip skips them elsewhere, by their environment markers)."""
    return sys.platform.startswith("linux") and platform.machine() == "x86_64"


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


def toolchain() -> dict[str, str]:
    """Paths the build needs, or ``OnednnUnavailable`` naming the missing piece and the fix."""
    if not supported_platform():
        raise OnednnUnavailable(f"its {LIBRARY_DIST} wheels exist for Linux x86_64 only")
    header = _dist_file(HEADERS_DIST, "oneapi/dnnl/dnnl.hpp")
    library = _dist_file(LIBRARY_DIST, "libdnnl.so.3") or _dist_file(LIBRARY_DIST, "libdnnl.so")
    if header is None or library is None:
        raise OnednnUnavailable(f"the {LIBRARY_DIST} and {HEADERS_DIST} wheels are not installed ({INSTALL_HINT})")
    wanted = os.environ.get("CXX")  # an explicit choice is honoured, not second-guessed
    compiler = shutil.which(wanted) if wanted else shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        missing = f"CXX={wanted!r} not found" if wanted else "install g++, e.g. apt install g++"
        raise OnednnUnavailable(f"no C++ compiler to build it with ({missing}; then "
                                "python -m resnet_jax.ops.onednn --build)")
    return {"compiler": compiler, "include": str(header.parents[2]), "library": str(library),
            "jax_include": jax.ffi.include_dir()}


@functools.cache
def _compiler_version(compiler: str) -> str:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip()


def command(tools: dict[str, str], output: Path) -> list[str]:
    lib_dir = str(Path(tools["library"]).parent)
    sources = sorted(map(str, SOURCE_DIR.glob("*.cc")))
    # 512-bit vectors where the CPU has them (GCC's default for -march=native is 256): the BatchNorm passes'
    # bfloat16 rounding and the auto-vectorised Winograd transforms are ALU-bound, and on an AMX Xeon this took
    # 8% off a bfloat16 ResNet-50 training step and 2.5-4% off float32 ones (BENCHMARKS.md, Machine C). Without
    # AVX-512 the flag changes nothing.
    return [tools["compiler"], "-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-std=c++17",
            "-shared", "-fPIC", "-w",
            f"-I{tools['jax_include']}", f"-I{tools['include']}", *sources, "-o", str(output), tools["library"],
            f"-Wl,-rpath,{lib_dir}"]


def cache_key(tools: dict[str, str]) -> str:
    import jaxlib

    texts = [p.read_text() for p in sorted(SOURCE_DIR.iterdir()) if p.suffix in (".cc", ".h")]
    parts = [*texts, *command(tools, Path("OUT")), _compiler_version(tools["compiler"]), jaxlib.__version__,
             importlib.metadata.version(LIBRARY_DIST), importlib.metadata.version(HEADERS_DIST), cpu.flags()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build(tools: dict[str, str] | None = None) -> Path:
    """The extension's shared library for this toolchain and machine, compiled first if the cache lacks it."""
    tools = tools or toolchain()
    target = cache_dir() / cache_key(tools) / "libresnet_jax_onednn.so"
    if target.exists():
        return target
    try:  # the cache itself: its reason alone ("No such file or directory: '/x'") had named neither
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OnednnBuildFailed(f"cannot write its build cache {cache_dir()} ({err}); set XDG_CACHE_HOME to a "
                                "writable directory") from err
    with one_at_a_time(target.with_name("build.lock")):  # one process builds; the others wait, then find it
        if target.exists():
            return target
        logger.info("resnet_jax: building the oneDNN extension once for this machine (about a minute) into %s",
                    target.parent)
        start = time.perf_counter()

        def compile_into(partial: Path) -> None:
            cmd = command(tools, partial)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise OnednnBuildFailed(f"building it failed ({' '.join(cmd)}): {done.stderr.strip()[-2000:]}")

        replace_atomically(target, compile_into)
        logger.info("resnet_jax: built the oneDNN extension in %.1f s: %s", time.perf_counter() - start, target)
    return target
