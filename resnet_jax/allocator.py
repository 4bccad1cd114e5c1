"""Run the process under tcmalloc when it is installed: up to 1.4x faster CPU training, no code change.

glibc's malloc serves every block above its mmap threshold (32 MB at most) with a fresh ``mmap`` and returns it
on ``free``, so XLA:CPU's large activations are page-faulted in again on every step. A caching allocator keeps
those pages. An allocator can only be swapped before the process starts, so this re-executes the same command
with ``LD_PRELOAD`` set; it must run before anything heavy is imported. Nothing happens (and nothing fails)
where tcmalloc is absent: ``apt-get install libtcmalloc-minimal4`` on Debian/Ubuntu provides it.

``RESNET_JAX_TCMALLOC=0`` turns it off; ``RESNET_JAX_TCMALLOC=/path/to/libtcmalloc.so`` picks the library.
"""

from __future__ import annotations

import glob
import os
import sys

ENV_VAR = "RESNET_JAX_TCMALLOC"
_SEARCH = ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/*-linux-gnu/libtcmalloc.so.4",
           "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/local/lib/libtcmalloc_minimal.so.4")


def find_tcmalloc() -> str | None:
    """The tcmalloc library to preload: the one ``RESNET_JAX_TCMALLOC`` names, else the first installed one."""
    choice = os.environ.get(ENV_VAR, "").strip()
    if choice.lower() in ("0", "false", "no", "off"):
        return None
    if choice and choice.lower() not in ("1", "true", "yes", "on"):
        if os.path.isfile(choice):
            return choice
        print(f"warning: {ENV_VAR}={choice!r} is not a file; running with the default allocator "
              f"(set it to the path of libtcmalloc_minimal.so.4, or to 0 to silence this)", file=sys.stderr)
        return None
    for pattern in _SEARCH:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def preload_tcmalloc(enabled: bool = True) -> str:
    """Re-exec this process with tcmalloc in ``LD_PRELOAD`` if it is installed and not loaded yet.

    Returns the allocator this process runs with: "tcmalloc" or "glibc". Linux only; a no-op elsewhere.
    """
    library = find_tcmalloc() if enabled and sys.platform.startswith("linux") else None
    preloaded = os.environ.get("LD_PRELOAD", "").split(":")
    if library is None:
        return "tcmalloc" if any("tcmalloc" in p for p in preloaded) else "glibc"
    if library in preloaded:
        return _after_preload(library, preloaded)
    if sys.argv[0] in ("", "-"):  # a program read from stdin (or typed): a second process could not read it again
        return "glibc"
    env = dict(os.environ, LD_PRELOAD=":".join([library, *filter(None, preloaded)]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # keeps "-m module" and every flag
    raise AssertionError("unreachable")  # pragma: no cover


def _after_preload(library: str, preloaded: list[str]) -> str:
    """"tcmalloc" where ``library`` is mapped into this process. One that the loader could not load (a broken
    file) is ignored by it with an error line, and was reported as tcmalloc (a benchmark recorded the wrong
    allocator): it is said once, and taken out of LD_PRELOAD so that child processes do not repeat the error."""
    try:
        with open("/proc/self/maps") as maps:
            if any(line.rstrip().endswith(os.path.realpath(library)) or line.rstrip().endswith(library)
                   for line in maps):
                return "tcmalloc"
    except OSError:
        return "tcmalloc"  # no /proc to ask: as the loader was told
    print(f"warning: {library} could not be preloaded (see the loader's error above); running with the default "
          f"allocator (set {ENV_VAR}=0 to silence this)", file=sys.stderr)
    os.environ["LD_PRELOAD"] = ":".join(p for p in preloaded if p and p != library)
    return "glibc"
