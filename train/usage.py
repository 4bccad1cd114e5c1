"""A usage mistake in any command (an unknown or missing flag, a stray argument) is ``error: <one line>`` on
stderr and exit code 2, the convention of argparse and of ``python -m train``'s config flags, rather than absl's
default of the whole help text and exit code 1: a script can tell a mistyped command from a run that failed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, NoReturn

from absl import flags


def usage_error(message: str, before_exit: Callable[[], None] | None = None) -> NoReturn:
    """Say ``message`` on one line, run ``before_exit`` (which may wait: the line is out first), exit 2."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    if before_exit is not None:
        before_exit()
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """``app.run``'s ``flags_parser``: absl's parsing, its errors (unknown flag, bad value, a required flag left
    out) as one line and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        usage_error(f"{str(err).rstrip('.')}; --helpshort lists the flags")


def workdir_problem(workdir: str) -> str | None:
    """Why ``--workdir`` names no run's directory, or None: empty (it was the current directory: a run wrote its
    files loose there, and a restart would have moved the user's own files aside), or an existing file."""
    if not workdir.strip():
        return "--workdir is empty; give a run's directory, e.g. --workdir=runs/default"
    if Path(workdir).expanduser().exists() and not Path(workdir).expanduser().is_dir():
        return f"--workdir={workdir} is a file, not a directory; give a run's directory"
    return None


def no_arguments(argv: list[str], options: str) -> None:
    """Refuse positional arguments a command does not take (``python -m train.evaluate runs/x`` without
    ``--workdir=``), which absl would otherwise hand over unread."""
    if len(argv) > 1:
        usage_error(f"unexpected arguments {argv[1:]}; {options}")
