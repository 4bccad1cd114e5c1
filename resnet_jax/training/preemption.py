"""Stopping cleanly on SIGTERM or SIGINT: spot VMs, TPU maintenance, SLURM time limits and Ctrl-C.

Those signals ask a process to stop soon, usually with a grace period before SIGKILL. ``StopOnSignal`` turns them
into a flag instead of an exception in the middle of a step; the training loop finishes the current step, writes
a checkpoint and raises ``Preempted``, which ``python -m train`` turns into ``EXIT_CODE``. A second signal while
that happens is left to its default action (stop now), so an impatient Ctrl-C still works.

With several processes the signal may reach them at different steps, or reach only one, but every process must
stop at the same step: a checkpoint is a collective write and the train step a collective computation. Each step
the local flags are therefore combined across processes (``parallel.any_process``, a tiny all-reduce dispatched
like the step itself), and each process acts on the result of the *previous* step's reduction. Every process
reads the same value at the same point of the loop, so they all stop after the same step, and reading a result
one step old never makes the host wait on the step still running. One process needs no reduction and stops
after the step in progress.
"""

from __future__ import annotations

import signal
import threading

import jax

from resnet_jax.parallel import any_process

# EX_TEMPFAIL from sysexits.h: "a temporary failure; the user is invited to retry". Run the same command again.
EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; running the same command again resumes it."""

    exit_code = EXIT_CODE

    def __init__(self, message: str, step: int, signal_name: str):
        super().__init__(message)
        self.step, self.signal_name = step, signal_name


class StopOnSignal:
    """While active, SIGTERM and SIGINT set a flag; ``requested()`` says when all processes should stop.

    Handlers can only be installed from the main thread; elsewhere (a training thread in a notebook or service)
    the signals keep their usual behaviour and ``requested()`` stays False.
    """

    def __init__(self, mesh=None):
        self.mesh = mesh  # set once the run has one (its start-up installs the handlers first)
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        self._pending = None  # the previous step's cross-process reduction, not read yet

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        del frame
        if self.received is not None:  # second signal: stop now, the default way
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        """Call once per step, at the same point on every process; True when all of them should stop now."""
        if jax.process_count() == 1:
            return self.received is not None
        previous, self._pending = self._pending, any_process(self.received is not None, self.mesh)
        return previous is not None and bool(previous)

    def received_anywhere(self) -> bool:
        """Whether any process has received a signal, now (a blocking reduction, at a point every process reaches
        together): for the run's start-up, before the loop's one-step-old reading applies."""
        if jax.process_count() == 1 or self.mesh is None:
            return self.received is not None
        return bool(any_process(self.received is not None, self.mesh))

    def interrupted(self, step: int, message: str, when: str | None = None) -> Preempted:
        """The exception to raise once the checkpoint at ``step`` is saved (``message`` says where it is);
        ``when`` says when it stopped instead of "at step N" (before the first step, nothing was saved)."""
        name = self.received or "a signal on another process"
        return Preempted(f"stopped by {name} {when or f'at step {step}'}; {message}; run the same command again to "
                         f"resume (exit code {EXIT_CODE})", step, name)
