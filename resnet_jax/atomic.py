"""Replacing a file whole or not at all.

Why: a file written in place is half a file when the process dies or the disk fills mid-write, and the old one
is gone already: a weights export lost the file it replaced, a torn config.json blocked the next resume. Each
writer here writes a complete sibling copy first and renames it over the target (atomic on POSIX within one
directory), so a reader finds the old file or the new one, and a failed write leaves no partial copy behind.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(partial)`` a sibling of ``path``, then rename it to ``path``; on any failure the partial copy is
    removed and the error raised, ``path`` untouched."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
