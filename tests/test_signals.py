"""SIGTERM and SIGHUP (what `timeout`, schedulers and a closed terminal send) end a run as Ctrl-C does: one line,
exit code 128 + the signal's number, no lock or temp folder left beside the target, and the next run succeeds.

Real processes, real signals: ``python -m moeslim`` is started, watched until it reaches a moment (its lock exists,
its output is being built, a layer's statistics are saved), and signalled there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "fixtures" / "trained" / "tiny-mixtral-16e"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's moeslim, whatever is installed

Moment = Callable[[Path], bool]  # the working folder → whether the run has got there


def _lock(name: str) -> Moment:
    return lambda work: (work / f".{name}.moeslim-lock").exists()


def _building(work: Path) -> bool:
    """slim's output folder is being built: a temp folder beside it holds the config (validation runs next)."""
    return any((tmp / "config.json").exists() for tmp in work.glob(".out.*.moeslim-tmp"))


def _layer_saved(work: Path) -> bool:
    """calibrate has saved its first layer's statistics and is running the next layers."""
    return (work / "stats" / "stats.json").exists()


def _calib_text(folder: Path) -> Path:
    """~400 kB of Python: enough tokens for the calibrate cases, read faster than the whole stdlib."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path = folder / "calib.txt"
    path.write_text("".join((stdlib / n).read_text() for n in ("argparse.py", "typing.py", "inspect.py", "pathlib.py")))
    return path


def _slim() -> list[str]:
    return ["slim", str(MODEL), "--keep", "8", "--criterion", "router-norm", "--out", "out"]


def _calibrate(calib: Path) -> list[str]:
    return ["calibrate", str(MODEL), "--out", "stats", "--samples", "64", "--seq-len", "128", "--calib", str(calib)]


COMMANDS = {"slim": {"lock": _lock("out"), "building": _building},
            "calibrate": {"lock": _lock("stats"), "layer saved": _layer_saved}}  # fmt: skip
SIGNALS = {signal.SIGTERM: 143, signal.SIGHUP: 129}
CASES = [(sig, command, moment) for sig in SIGNALS for command in COMMANDS for moment in COMMANDS[command]]


def _args(command: str, tmp_path: Path) -> list[str]:
    return _slim() if command == "slim" else _calibrate(_calib_text(tmp_path))


def _default_hangup() -> None:
    """The run starts as from a terminal, SIGHUP at its default, even when the tests themselves run under ``nohup``
    (a run that inherits SIGHUP ignored keeps it ignored, as the nohup test below proves)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _start(args: list[str], work: Path, **kwargs: object) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "moeslim", *args]
    kwargs.setdefault("preexec_fn", _default_hangup)
    return subprocess.Popen(cmd, cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            **kwargs)  # type: ignore[call-overload]  # fmt: skip


def _signal_at(proc: subprocess.Popen[str], work: Path, moment: Moment, sig: int) -> tuple[int, str]:
    """Send ``sig`` as soon as ``moment`` is reached; the exit code and stderr."""
    deadline = time.monotonic() + 300
    while not moment(work):
        assert proc.poll() is None, f"the run ended before the moment: {proc.communicate()[1]}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _leftovers(work: Path) -> list[str]:
    """Names in the working folder other than the targets (a calibration's statistics folder stays: it resumes)."""
    return sorted(p.name for p in work.iterdir() if p.name not in ("stats", "calib.txt"))


@pytest.mark.parametrize(("sig", "command", "moment"), CASES, ids=[f"{s.name}-{c}-{m}" for s, c, m in CASES])
def test_a_stopping_signal_ends_the_run_cleanly(tmp_path: Path, sig: signal.Signals, command: str, moment: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args = _args(command, tmp_path)
    code, err = _signal_at(_start(args, work), work, COMMANDS[command][moment], sig)
    assert code == SIGNALS[sig], err
    assert err == f"moeslim: stopped by {sig.name}\n", err  # one line, no traceback
    assert _leftovers(work) == [], err  # no lock, no temp folder, no partial output
    if (work / "stats").exists():  # a calibration's statistics so far, resumable: no half-written file
        assert not any(p.name.endswith(".moeslim-part") for p in (work / "stats").iterdir())
    again = [*args, "--no-validate"] if command == "slim" else args  # validation is what makes slim slow
    done = subprocess.run([sys.executable, "-m", "moeslim", *again], cwd=work, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "left by an interrupted run" not in done.stderr  # nothing for the next run to sweep
    target = work / ("out" if command == "slim" else "stats")
    assert _leftovers(work) == ([] if command == "calibrate" else ["out"])
    assert (target / ("moeslim_plan.json" if command == "slim" else "stats.json")).is_file()


def test_an_ignored_sighup_stays_ignored(tmp_path: Path) -> None:
    """Under ``nohup`` (SIGHUP ignored) a closed terminal does not stop the run."""
    work = tmp_path / "work"
    work.mkdir()
    args = _calibrate(_calib_text(tmp_path))

    def nohup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    code, err = _signal_at(_start(args, work, preexec_fn=nohup), work, _lock("stats"), signal.SIGHUP)
    assert code == 0, err
    assert (work / "stats" / "stats.json").is_file() and _leftovers(work) == []
