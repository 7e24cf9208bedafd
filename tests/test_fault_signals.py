"""SIGTERM and SIGHUP at random moments: real signals, sent to this process by a timer while ``slim``,
``calibrate`` and ``validate`` run in it (moeslim's own handler is installed by its entry point, as in a
terminal), at moments drawn uniformly over an undisturbed run's duration (seeded).

A run a signal stops says one line and exits with 128 + the signal; its folder is as before (a calibration: its
statistics so far, nothing half-written), and the same command then succeeds (a calibration resumes, to the
undisturbed run's statistics bit for bit). A run that ended before its signal came is the undisturbed run's
output. Two moments are also made on purpose: a signal whose handler runs inside a finalizer (where Python drops
what it raises), one during a cleanup, and one that a library turns into its own error. ``tests/test_fault_writes.py`` stops runs at each write site too; ``tests/test_signals.py`` at named
moments in a separate process.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from moeslim.stopping import RESEND_AFTER, Stopped, deferred, stopping_signals_raise
from moeslim.targets import FINISHED, atomic_folder
from tests.conftest import run_cli
from tests.hostile import SIGNALS, leftovers, old_or_new, outcome_table, record, snapshot  # noqa: F401
from tests.test_fault_writes import COMMANDS, world

CASES = {"slim": 5, "calibrate": 5, "validate": 3}


@contextlib.contextmanager
def signal_after(delay: float, sig: signal.Signals) -> Iterator[list[int]]:
    """Send ``sig`` to this process after ``delay`` seconds. Outside moeslim's run (before its handler is set, or
    after it is restored) a guard takes it instead of pytest's default (death); it is listed in the yielded list."""
    missed: list[int] = []
    saved = {s: signal.signal(s, lambda signum, frame: missed.append(signum)) for s in SIGNALS}
    timer = threading.Timer(delay, os.kill, (os.getpid(), sig))
    timer.start()
    try:
        yield missed
    finally:
        timer.cancel()
        timer.join()
        time.sleep(0.01)  # a signal sent just now is handled (by the guard) before the handlers are restored
        for s, handler in saved.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("command", CASES)
def test_a_signal_at_a_random_moment(command: str, tmp_path: Path, capsys) -> None:
    w = world(tmp_path / "w", capsys)
    args = COMMANDS[command](w)
    for _warm in range(2):  # the second run is timed: the first also imports what the command needs
        start = time.monotonic()
        code, _, err = run_cli(args, capsys)
        duration = time.monotonic() - start
        assert code == 0, err
        done = snapshot(w)
        if command == "calibrate":
            shutil.rmtree(w / "stats")
    shutil.rmtree(w)
    world(w, capsys)
    draw = random.Random(f"{command}-25")
    for case in range(CASES[command]):
        sig = list(SIGNALS)[case % 2]
        before = snapshot(w)
        with signal_after(draw.uniform(0, duration), sig) as missed:
            code, _, err = run_cli(args, capsys)
        if code == 0:  # it finished first (the signal, if it came, met the guard)
            assert snapshot(w) == done and leftovers(w) == [], err
            record(f"{sig.name} at random", command, "finished before it")
            continue
        assert not missed
        assert (code, err) == (SIGNALS[sig], f"moeslim: stopped by {sig.name}\n"), err
        if command != "calibrate":  # the previous output or report intact, or the new one whole; nothing left
            record(f"{sig.name} at random", command, f"stopped, {old_or_new(w, before, done)}")
            continue
        assert leftovers(w) == []  # its statistics so far, nothing half-written
        again, _, err = run_cli(args, capsys)
        assert again == 0, err
        assert snapshot(w) == done  # resumed to the undisturbed run's statistics
        shutil.rmtree(w / "stats")
        record(f"{sig.name} at random", command, "stopped, then resumed")


class _SignalsInFinalizer:
    """An object whose finalizer is running when a stopping signal's handler runs: Python ignores what a
    finalizer raises, so the ``Stopped`` raised there would vanish."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # the handler runs here, inside the finalizer
            pass


@contextlib.contextmanager
def _guarded() -> Iterator[list[int]]:
    """What pytest would do with a SIGTERM outside moeslim's handler (die) replaced by a list of them."""
    seen: list[int] = []
    saved = {s: signal.signal(s, lambda signum, frame: seen.append(signum)) for s in SIGNALS}
    try:
        yield seen
    finally:
        time.sleep(2 * RESEND_AFTER)
        for s, handler in saved.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("ends", ["later", "at once"])
def test_a_signal_swallowed_by_a_finalizer_still_stops_the_run(ends: str) -> None:
    steps = 0
    with _guarded() as stray, pytest.raises(Stopped, match="SIGTERM"), stopping_signals_raise():
        _SignalsInFinalizer()  # collected at once: its finalizer swallows the Stopped
        while ends == "later" and steps < 10**8:  # the run goes on: the signal is sent again and stops it
            steps += 1
    assert stray == [] and steps < 10**8  # (at once: the block's end raises it)


def test_a_signal_whose_stop_a_library_turned_into_its_own_error_still_stops_the_run() -> None:
    """As matplotlib's compiled image resampling does when the handler runs inside its callback into Python (seen
    in ``test_a_signal_at_a_random_moment[slim]`` while the card's image was drawn): it catches what the callback
    raised and raises its own ``ValueError``."""
    with _guarded() as stray, pytest.raises(Stopped, match="SIGTERM") as stopped, stopping_signals_raise():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # the handler runs here
                pass
        except Stopped:
            raise ValueError("Invalid affine transformation matrix") from None
    assert isinstance(stopped.value.__cause__, ValueError) and stray == []


def test_a_stop_turned_into_a_librarys_error_keeps_the_finished_shards(tmp_path: Path) -> None:
    """A stopped run's temp folder with finished shards stays for the rerun to adopt (``targets.atomic_folder``),
    also when the ``Stopped`` reached it as a library's error."""
    with _guarded(), pytest.raises(Stopped), stopping_signals_raise(), atomic_folder(tmp_path / "o") as tmp:
        (tmp / FINISHED).write_text("{}")
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # the handler runs here
                pass
        except Stopped:
            raise ValueError("Invalid affine transformation matrix") from None
    assert list(tmp_path.iterdir()) == [tmp] and (tmp / FINISHED).is_file()


def test_an_error_without_a_signal_stays_itself() -> None:
    with pytest.raises(ValueError, match="its own"), stopping_signals_raise():
        raise ValueError("its own")


def test_a_cleanup_is_not_cut_short_by_a_signal() -> None:
    removed = []
    with _guarded() as stray, pytest.raises(Stopped, match="SIGHUP"), stopping_signals_raise(), deferred():
        os.kill(os.getpid(), signal.SIGHUP)
        for i in range(10_000):  # the handler runs during these: the signal is held
            removed.append(i)
    assert len(removed) == 10_000 and stray == []
