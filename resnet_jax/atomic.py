"""Replacing a file whole or not at all.

Why: a file written in place is half a file when the process dies or the disk fills mid-write, and the old one
is gone already: a weights export lost the file it replaced, a torn config.json blocked the next resume. Each
writer here writes a complete sibling copy first and renames it over the target (atomic on POSIX within one
directory), so a reader finds the old file or the new one, and a failed write leaves no partial copy behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import uuid
from pathlib import Path
from typing import Callable, Iterator


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(partial)`` a sibling of ``path``, then rename it to ``path``; on any failure the partial copy is
    removed and the error raised, ``path`` untouched. ``path``'s directory is created if missing (an export to
    ``out/model.pth`` had failed naming the hidden partial file), and the file gets the permissions an ordinary
    write gives (the umask's; executables keep their x bits): a writer that makes its file private
    (safetensors' ``save_file``: 0600) would hide an export from a serving process of another user."""
    replace_together({path: write})


def replace_together(writes: dict[str | os.PathLike, Callable[[Path], None]]) -> None:
    """``replace_atomically`` for files that only make sense together (an artifact and its manifest): every
    partial copy is written before any is renamed, so a failed write (a full disk) leaves all the old files.
    A target that is a directory is refused before anything is written (the rename's error named the hidden
    partial file)."""
    writes = {Path(path): write for path, write in writes.items()}
    for path in writes:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, f"{path} is a directory; name the file to write (e.g. "
                                                  f"{path / 'model'}{''.join(path.suffixes)})")
    partials = {path: path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial") for path in writes}
    try:
        for path, write in writes.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            write(partials[path])
            give_ordinary_permissions(partials[path])
        for path, partial in partials.items():
            os.replace(partial, path)
    except BaseException:
        for partial in partials.values():
            partial.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def one_at_a_time(lock_file: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created where missing, never written) for the block: processes
    that would build or change the same thing (the extension, a TFDS dataset, the tuning file) take turns, and
    each one that waited finds the first one's work. The system releases it when the holder ends, however. The
    lock's directory is created where missing (TFDS's default data_dir, on a fresh machine, is not there yet)."""
    Path(lock_file).parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def give_ordinary_permissions(path: str | os.PathLike) -> None:
    """The mode an ordinary write gives a file (the umask's; x bits kept), for files made private by how they
    were created (``tempfile.mkstemp``, safetensors: 0600)."""
    executable = os.stat(path).st_mode & 0o111  # a built library keeps its x bits
    os.chmod(path, (0o777 if executable else 0o666) & ~_umask())


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` can only be read by setting it, which races
    with other threads creating files); 0o022, the usual one, where /proc does not say."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022
