"""Keeps stderr readable after an Orbax restore that failed part-way (a damaged checkpoint).

Why: Orbax reads a checkpoint's arrays as concurrent asyncio tasks on an event loop of its own and closes that
loop as soon as the first read fails (a truncated file). The reads still in flight are abandoned there. When
TensorStore later finishes one, it calls back into the closed loop ("RuntimeError: Event loop is closed"), and
each abandoned read coroutine, once collected, raises again ("Exception ignored in: <coroutine object
_read_array_index_and_device_put>", with a TensorStore spec of ~60 lines). Python reports both through
``sys.unraisablehook``: up to thousands of lines of tracebacks (186-4258 measured, orbax-checkpoint 0.12.8)
after the one line that already said which checkpoint was damaged and what happens next. They come from
TensorStore's threads and from the garbage collector, any time after the failed restore returned, so no
``try`` around the restore can catch them.

``after_failed_restore`` (called by ``checkpoint`` wherever a restore failed) puts a filter in front of the
installed hook, for the rest of the process: it drops exactly those two reports and passes every other one on
unchanged. Nothing is installed in a process whose restores all succeed.
"""

from __future__ import annotations

import sys
import threading

_READ_COROUTINE = "_read_array_index_and_device_put"  # orbax/checkpoint/_src/serialization/serialization.py
_lock = threading.Lock()
hidden = 0  # reports dropped so far in this process


def is_abandoned_read(unraisable) -> bool:
    """Whether an unraisable report is one of an abandoned Orbax read: the read coroutine itself, or a callback
    into the closed event loop (``call_soon_threadsafe`` raising "Event loop is closed")."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None:
        return code.co_name == _READ_COROUTINE
    if unraisable.exc_type is not RuntimeError or str(unraisable.exc_value) != "Event loop is closed":
        return False
    frame = unraisable.exc_traceback
    while frame is not None:
        if frame.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        frame = frame.tb_next
    return False


def after_failed_restore() -> None:
    """Filter the abandoned reads' reports from now on (once; again if someone replaced the hook since)."""
    with _lock:
        previous = sys.unraisablehook
        if getattr(previous, "_drops_abandoned_reads", False):
            return

        def hook(unraisable):
            global hidden
            if is_abandoned_read(unraisable):
                hidden += 1
            else:
                previous(unraisable)

        hook._drops_abandoned_reads = True
        sys.unraisablehook = hook
