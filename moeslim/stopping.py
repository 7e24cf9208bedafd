"""SIGTERM and SIGHUP (what `timeout`, `kill`, schedulers and a closed terminal send) as an exception in the main
thread, so that a run they stop unwinds as on Ctrl-C: every ``finally`` and context manager on the way out runs,
and the lock and temp folders beside the target are removed (``targets.py``)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOPPING = (signal.SIGTERM, signal.SIGHUP)


class Stopped(BaseException):
    """A stopping signal (SIGTERM, SIGHUP) raised in the main thread, so that the run unwinds as on Ctrl-C: every
    ``finally`` and context manager on the way out runs (temp folders removed, locks released). Not an
    ``Exception``, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, frame: object) -> None:
    for other in STOPPING:  # a second signal (a closed terminal sends SIGHUP twice) must not cut the cleanup short
        signal.signal(other, signal.SIG_IGN)
    raise Stopped(signum)


@contextlib.contextmanager
def stopping_signals_raise() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into ``Stopped`` for the block; a signal already ignored (``nohup``) stays ignored.
    Python lets only the main thread set handlers: elsewhere (moeslim run from a library's thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in STOPPING}
    for signum, previous in saved.items():
        if previous is not signal.SIG_IGN:
            signal.signal(signum, _raise)
    try:
        yield
    finally:
        for signum, previous in saved.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
