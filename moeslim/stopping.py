"""SIGTERM and SIGHUP (what `timeout`, `kill`, schedulers and a closed terminal send) as an exception in the main
thread, so that a run they stop unwinds as on Ctrl-C: every ``finally`` and context manager on the way out runs,
and the lock and temp folders beside the target are removed (``targets.py``).

A signal may come at any moment, three of which would lose it or cut a cleanup short: while Python runs a finalizer
or a weakref callback (where it ignores exceptions, so ``Stopped`` would vanish and the run go on), while a
cleanup on the normal path removes a temp folder (which would be left half-removed), and while a compiled library
calls back into Python (matplotlib's image resampling, drawing the card, replaces what its callback raised with its
own ``ValueError``, which would end the run in a traceback). The first is caught by ``sys.unraisablehook`` and the
signal sent again a moment later; the second is held back by ``deferred()`` until the cleanup is done; for the
third, an error that ends the run after a ``Stopped`` was raised ends it as that ``Stopped``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

STOPPING = (signal.SIGTERM, signal.SIGHUP)
RESEND_AFTER = 0.01  # seconds: a finalizer is over by then


class Stopped(BaseException):
    """A stopping signal (SIGTERM, SIGHUP) raised in the main thread, so that the run unwinds as on Ctrl-C: every
    ``finally`` and context manager on the way out runs (temp folders removed, locks released). Not an
    ``Exception``, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _State:
    deferring = 0  # depth of ``deferred()`` blocks
    held: int | None = None  # a signal that came during one
    resending: tuple[threading.Timer, int] | None = None  # a swallowed signal being sent again
    raised: int | None = None  # the signal a ``Stopped`` was raised for, in this block


def _raise(signum: int, frame: object) -> None:
    if _State.deferring:
        _State.held = _State.held or signum
        return
    for other in STOPPING:  # a second signal (a closed terminal sends SIGHUP twice) must not cut the cleanup short
        signal.signal(other, signal.SIG_IGN)
    _State.raised = signum
    raise Stopped(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a stopping signal back for the block (a cleanup that must finish); it is raised when the block ends."""
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
        if not _State.deferring and _State.held is not None:
            signum, _State.held = _State.held, None
            _raise(signum, None)


def _resend(previous: Any) -> Any:
    """An unraisable-exception hook that sends a ``Stopped`` swallowed by a finalizer as its signal again."""

    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, Stopped):
            previous(unraisable)
            return
        signum = unraisable.exc_value.signum
        signal.signal(signum, _raise)  # armed again: the swallowed one had set it to be ignored
        timer = threading.Timer(RESEND_AFTER, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        _State.resending = (timer, signum)

    return hook


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
    hook = sys.unraisablehook
    sys.unraisablehook = _resend(hook)
    _State.raised = None
    try:
        yield
        _stop_if_swallowed()
    except Exception as e:  # not a Stopped, nor Ctrl-C's KeyboardInterrupt or a SystemExit
        if _State.raised is None:
            raise
        raise Stopped(_State.raised) from e  # what a library made of the Stopped raised inside it
    finally:
        _State.raised = None
        sys.unraisablehook = hook
        if _State.resending is not None:
            _State.resending[0].cancel()
            _State.resending = None
        for signum, previous in saved.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)


def is_stop(e: BaseException) -> bool:
    """Whether ``e`` ends the run for a stopping signal: a ``Stopped``, or any error raised after one (what a library
    made of it)."""
    return isinstance(e, Stopped) or _State.raised is not None


def _stop_if_swallowed() -> None:
    """A run that ended before the signal it swallowed came again still ends as stopped by it."""
    if _State.resending is not None:
        timer, signum = _State.resending
        timer.cancel()
        _State.resending = None
        raise Stopped(signum)
