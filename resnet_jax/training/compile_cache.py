"""JAX's persistent compilation cache for the length of one training run, and no longer.

Why: a restarted or repeated run skips recompiling its steps when JAX keeps the compiled programs on disk. But the
cache directory is a process-wide JAX setting, and a library call must not change how the rest of its caller's
process compiles. So ``train`` sets it only around the run and puts back what was there after, even when the run
fails. A directory the caller already chose (``JAX_COMPILATION_CACHE_DIR`` in the environment, or
``jax.config.update`` before the run) is kept unless ``config.compilation_cache_dir`` names another one.
JAX's other cache settings (the minimum compile time and entry size worth writing) are the caller's, untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import jax

# config.compilation_cache_dir: "auto" (the caller's directory if JAX has one, else DEFAULT_DIR), a path, or "" (off:
# JAX's own setting stays as it is).
AUTO = "auto"
DEFAULT_DIR = "~/.cache/resnet_jax/jit"
_FLAG = "jax_compilation_cache_dir"


def directory_for(setting: str, current: str | None) -> str | None:
    """The cache directory a run with ``config.compilation_cache_dir = setting`` uses when JAX's is ``current``;
    None leaves JAX's setting alone."""
    if not setting:
        return None
    if setting == AUTO:
        return current or str(Path(DEFAULT_DIR).expanduser())
    return str(Path(setting).expanduser())


@contextlib.contextmanager
def compilation_cache(setting: str) -> Iterator[str | None]:
    """Inside the block JAX caches compiled programs where ``setting`` says (yields that directory, or None when
    none is in use); after it, JAX's setting is what it was before."""
    previous = getattr(jax.config, _FLAG)
    wanted = directory_for(setting, previous)
    if wanted is None or wanted == previous:
        yield wanted or previous
        return
    _use(wanted)
    try:
        yield wanted
    finally:
        _use(previous)


def _use(directory: str | None) -> None:
    """JAX opens its cache at the first compilation of a process and keeps it open; a changed directory takes
    effect only once the open cache is dropped (the next compilation reopens it where the setting says)."""
    from jax.experimental.compilation_cache.compilation_cache import reset_cache

    jax.config.update(_FLAG, directory)
    reset_cache()
