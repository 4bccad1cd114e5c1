"""Keeps stderr readable when an Orbax save or restore fails part-way (a full disk, a damaged checkpoint).

Why: Orbax reads and writes a checkpoint's arrays as concurrent asyncio tasks on event loops of its own, in
threads, and stops at the first failure; the caller then gets that failure once, as an exception (which
``checkpoint`` turns into one ``CheckpointError`` line). Everything else it had in flight is abandoned, and
reports itself on stderr on its own, from other threads or the garbage collector, any time later, so no ``try``
can catch it:

- TensorStore finishing an abandoned read or write calls back into the closed loop ("RuntimeError: Event loop
  is closed"), and an abandoned read coroutine, once collected, raises again ("Exception ignored in: <coroutine
  object _read_array_index_and_device_put>", with a TensorStore spec of ~60 lines): ``sys.unraisablehook``;
- the save's threads log the exception they store for the caller ("_SignalingThread.run() raised an
  exception", "Failed to run 6 Handler Commit operations", "Save Finalize thread (save_finalize) failed"), and
  the write tasks beside the failed one log theirs when collected ("Task exception was never retrieved"), through
  absl's and asyncio's loggers.

That was 186-4258 lines after a damaged checkpoint's restore and ~450 after a save that met a full disk
(orbax-checkpoint 0.12.8), around the one line that said what happened and what to do. ``install`` puts
filters in front of the unraisable hook and on those two loggers, for the rest of the process, which drop
exactly these reports (each counted in ``hidden``) and pass every other one on unchanged. ``checkpoint``
installs them where a process saves checkpoints (the save's reports come before its failure is known) and after
any failed restore; a process that only reads checkpoints, and reads them all, gets nothing installed.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

_READ_COROUTINE = "_read_array_index_and_device_put"  # orbax/checkpoint/_src/serialization/serialization.py
# Orbax's logged reports of a failure that it stores and raises again to the caller of its save or wait
# (orbax/checkpoint/_src: futures/future.py, checkpointers/async_checkpointer.py, checkpoint_manager.py)
_SAVE_REPORTS = ("_SignalingThread.run() raised an exception",
                 "Handler Commit operations or the Commit callback in background save thread",
                 "Save Finalize thread (save_finalize) failed")
_UNRETRIEVED = "exception was never retrieved"  # asyncio: "Task ...", "Future ...", "_GatheringFuture ..."
_lock = threading.Lock()
hidden = 0  # reports dropped so far in this process


def is_abandoned_io(unraisable) -> bool:
    """Whether an unraisable report is one of an abandoned Orbax read or write: the read coroutine itself, or
    TensorStore's native thread calling back into the closed event loop (``call_soon_threadsafe`` raising "Event
    loop is closed" with no Python caller and no object: Python code doing the same, a ``__del__``, is reported)."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None:
        return code.co_name == _READ_COROUTINE
    if unraisable.exc_type is not RuntimeError or str(unraisable.exc_value) != "Event loop is closed":
        return False
    frames = list(_frames(unraisable.exc_traceback))
    return unraisable.object is None and bool(frames) and frames[0].f_code.co_name == "call_soon_threadsafe"


def is_orbax_failure_log(record: logging.LogRecord) -> bool:
    """Whether a log record is Orbax's own report of a failure it also raises to its caller: its save thread's,
    or an unretrieved write task's whose traceback runs through Orbax."""
    message = record.getMessage()
    if record.name == "absl":
        return any(report in message for report in _SAVE_REPORTS)
    if record.name == "asyncio" and message.partition("\n")[0].endswith(_UNRETRIEVED) and record.exc_info:
        return any(_in_orbax(frame) for frame in _frames(record.exc_info[2]))
    return False


def _frames(traceback):
    while traceback is not None:
        yield traceback.tb_frame
        traceback = traceback.tb_next


def _in_orbax(frame) -> bool:
    return "orbax" in Path(frame.f_code.co_filename).parts


class _DropOrbaxFailureLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        global hidden
        if is_orbax_failure_log(record):
            hidden += 1
            return False
        return True


def install() -> None:
    """The filters, from now on (once; the unraisable one again if someone replaced the hook since)."""
    with _lock:
        for name in ("absl", "asyncio"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _DropOrbaxFailureLogs) for f in logger.filters):
                logger.addFilter(_DropOrbaxFailureLogs())
        previous = sys.unraisablehook
        if getattr(previous, "_drops_abandoned_io", False):
            return

        def hook(unraisable):
            global hidden
            if is_abandoned_io(unraisable):
                hidden += 1
            else:
                previous(unraisable)

        hook._drops_abandoned_io = True
        sys.unraisablehook = hook
