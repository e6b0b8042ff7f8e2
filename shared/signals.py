"""Signals a batch scheduler or a user sends to stop a job: SIGTERM (Slurm, Kubernetes,
PBS on preemption or at the time limit, before SIGKILL), SIGINT (Ctrl-C), SIGHUP (the
terminal closed), SIGUSR1/SIGUSR2 (Slurm's ``--signal``, SGE's ``-notify`` warnings),
SIGXCPU (a CPU-time limit: LSF, ``ulimit -t``).

Python's default for most of them is to die on the spot, leaving temporary files
behind. A ``SignalGuard`` turns them into an ``Interrupted`` exception instead, so
``finally`` blocks and context managers clean up and the CLI exits with 128 + the
signal's number. Inside ``deferred()`` the first signal is only recorded (``pending``)
so that a training loop can finish its step and save a checkpoint; a second signal
raises at once."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from shared.errors import Interrupted

log = logging.getLogger(__name__)
STOP_SIGNALS = tuple(getattr(signal, name) for name in
                     ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGXCPU")
                     if hasattr(signal, name))


class SignalGuard:
    """Context manager installing the handlers (main thread only) and restoring the old
    ones on exit. Usable uninstalled: then ``pending`` stays None."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self._deferring = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self._deferring and self.pending is None:
            self.pending = signum
            log.warning("received %s: stopping after the current step (send it again to "
                        "stop at once)", signal.Signals(signum).name)
            return
        raise Interrupted(signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
