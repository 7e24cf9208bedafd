"""Shared by the tests of a hostile world (``test_fault_*.py``): failing moeslim's writes on purpose, and the
checks every such failure must pass.

``Injector`` sees every write moeslim makes under one folder, in order: files opened for writing (``open`` and
``os.open``, through Python's audit hooks), folders made, renames and replacements, and the bytes written
(``os.write``, ``os.copy_file_range``, ``os.sendfile``, ``os.ftruncate``, ``os.fsync``, wrapped). Armed with
``at = n`` it fails the n-th of them with an ``OSError`` of a chosen error number, or stops the run there as
SIGTERM or SIGHUP would (``stopping.Stopped``, what moeslim's signal handler raises). Writes by Python's file
objects after their ``open`` (``Path.write_text``) are seen at their ``open`` only; the real filesystem tests fail
those for real.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from moeslim.stopping import Stopped
from tests.conftest import tree_digest

# What the issue names, and what each failure must say (any one of the phrases, lower case).
ERRNOS = {
    errno.ENOSPC: ("no space left",),
    errno.EROFS: ("read-only",),
    errno.EACCES: ("permission denied",),
    errno.EBUSY: ("busy",),
    errno.EXDEV: ("another filesystem", "cross-device"),
    errno.ENAMETOOLONG: ("too long",),
}
SIGNALS = {signal.SIGTERM: 143, signal.SIGHUP: 129}
FAULTS: list[int | signal.Signals] = [*ERRNOS, *SIGNALS]

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT
RANDOM = re.compile(r"(?<=\.)[0-9a-z_]{8}(?=\.moeslim-)|(?<=moeslim-activations-)[0-9a-z_]{8}|tmp[0-9a-z_]{8}")


def fault_name(fault: int | signal.Signals) -> str:
    return fault.name if isinstance(fault, signal.Signals) else errno.errorcode[fault]


class Injector:
    """Counts moeslim's writes under ``root`` (``ops``: what each was, as ``(operation, path)`` with random name
    parts as ``R``) and, when ``at`` is set, fails the write numbered ``at`` with ``fault``."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.ops: list[tuple[str, str]] = []
        self.stacks: list[tuple[str, ...]] = []  # for each write, the lines of moeslim's code that made it
        self.at: int | None = None
        self.fault: int | signal.Signals = errno.ENOSPC
        self.fired: tuple[str, str] | None = None
        self.on_write: Callable[[], object] = lambda: None  # called before each write seen

    def arm(self, at: int | None, fault: int | signal.Signals = errno.ENOSPC) -> None:
        self.ops, self.stacks, self.at, self.fault, self.fired = [], [], at, fault, None

    def see(self, op: str, path: str | None) -> None:
        if path is None:
            return
        self.on_write()
        key = (op, RANDOM.sub("R", path.removeprefix(self.root)))
        self.ops.append(key)
        self.stacks.append(_moeslim_stack())
        if len(self.ops) - 1 == self.at:
            self.fired = key
            if isinstance(self.fault, signal.Signals):
                raise Stopped(self.fault)
            raise OSError(self.fault, os.strerror(self.fault), path)

    def mine(self, path: object, dir_fd: int | None = None) -> str | None:
        """``path`` when it lies under the root (a name relative to a folder's descriptor: that folder's)."""
        if isinstance(path, int):
            return self.mine(_fd_path(path))
        if path is None:
            return None
        name = os.fsdecode(path)  # type: ignore[arg-type]
        if not os.path.isabs(name):
            base = _fd_path(dir_fd) if dir_fd is not None else None
            name = os.path.join(base, name) if base else os.path.join("<folder>", name)
            if not base:
                return name  # opened relative to a folder's descriptor (safefs, the lock): moeslim's own
        return name if name.startswith(self.root) else None


PACKAGE = str(Path(__file__).resolve().parents[1] / "moeslim") + os.sep


def _moeslim_stack() -> tuple[str, ...]:
    """``file:line`` of each frame of moeslim's own code on the stack, innermost first."""
    frames = []
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(PACKAGE):
            frames.append(f"{frame.f_code.co_filename.removeprefix(PACKAGE)}:{frame.f_lineno}")
        frame = frame.f_back
    return tuple(frames)


def _fd_path(fd: int | None) -> str | None:
    if fd is None or fd < 0:
        return None
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


_active: Injector | None = None


def _audit(event: str, args: tuple) -> None:
    injector = _active
    if injector is None:
        return
    if event == "open" and args[0] is not None:
        flags = args[2] if isinstance(args[2], int) else 0
        mode = args[1] if isinstance(args[1], str) else ""
        if flags & WRITE_FLAGS or any(c in mode for c in "wax+"):
            injector.see("open", injector.mine(args[0]))
    elif event == "os.mkdir":
        injector.see("mkdir", injector.mine(args[0], args[2]))
    elif event == "os.rename":
        injector.see("rename", injector.mine(args[1], args[3]))


sys.addaudithook(_audit)

# os functions that write bytes: (name, position of the descriptor written to)
_WRITERS = {"write": 0, "fsync": 0, "ftruncate": 0, "copy_file_range": 1, "sendfile": 0}


@contextlib.contextmanager
def injecting(injector: Injector) -> Iterator[Injector]:
    """Let ``injector`` see (and fail) moeslim's writes for the block."""
    global _active
    saved = {name: getattr(os, name) for name in _WRITERS}
    for name, position in _WRITERS.items():
        setattr(os, name, _seen(injector, saved[name], name, position))
    _active = injector
    try:
        yield injector
    finally:
        _active = None
        for name, original in saved.items():
            setattr(os, name, original)


def _seen(injector: Injector, original: Callable[..., object], name: str, position: int) -> Callable[..., object]:
    def wrapped(*args: object) -> object:
        injector.see(name, injector.mine(args[position]))
        return original(*args)

    return wrapped


def sites(injector: Injector) -> list[int]:
    """The writes of a recorded run worth failing: the first made by each line of moeslim's code, told apart by
    the line that called it (``write_atomic`` writing stats.json is not writing stats.safetensors), and each kind
    of operation there. Repeats (the 2nd batch spilled, the 60th copy into one shard, the same save after the
    next layer) fail the same code in the same way."""
    first: dict[tuple[str, tuple[str, ...]], int] = {}
    for n, (key, stack) in enumerate(zip(injector.ops, injector.stacks, strict=True)):
        first.setdefault((key[0], stack[:2]), n)
    return sorted(first.values())


def one_line(code: int, err: str, fault: int | signal.Signals | None) -> None:
    """A failed run said one line: a signal's, or an error saying what happened (for an error number: in the
    words of ``ERRNOS``) and what to do."""
    assert "Traceback" not in err, err
    if isinstance(fault, signal.Signals):
        assert (code, err) == (SIGNALS[fault], f"moeslim: stopped by {fault.name}\n"), (code, err)
        return
    assert code == 2 and err.count("\n") == 1 and err.startswith("moeslim: error: "), (code, err)
    if fault is not None:
        assert any(p in err.lower() for p in ERRNOS[fault]), err
        assert ";" in err, err  # what happened; what to do


def leftovers(folder: Path) -> list[str]:
    """moeslim's working names anywhere under ``folder``: locks, temp and old folders, half-written files."""
    marks = (".moeslim-lock", ".moeslim-tmp", ".moeslim-old", ".moeslim-part", "resume.tmp")
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(marks))


def snapshot(folder: Path) -> tuple[dict[str, str], list[str]]:
    """Every file's bytes and mode under ``folder``, and every name there (folders and links included)."""
    return tree_digest(folder), sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# The closing table: (fault class, command) → outcome → cases, printed in pytest's summary by every test module of
# the hostile world that ran.
OUTCOMES: dict[tuple[str, str], Counter[str]] = {}


def record(fault: str, command: str, outcome: str) -> None:
    OUTCOMES.setdefault((fault, command), Counter())[outcome] += 1


class _Table:
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not OUTCOMES:
            return
        terminalreporter.write_sep("-", "a hostile world: fault class × command, cases tried and outcomes")
        for (fault, command), seen in sorted(OUTCOMES.items()):
            said = ", ".join(f"{n} {what}" for what, n in sorted(seen.items()))
            terminalreporter.write_line(f"{fault:<24}{command:<10}{sum(seen.values()):>4}  {said}")


@pytest.fixture(scope="module", autouse=True)
def outcome_table(request: pytest.FixtureRequest) -> None:
    """Print the table of outcomes at the end of the run (imported by each ``test_fault_*`` module)."""
    if not request.config.pluginmanager.has_plugin("moeslim-hostile-table"):
        request.config.pluginmanager.register(_Table(), "moeslim-hostile-table")


def old_or_new(folder: Path, before: tuple, done: tuple) -> str:
    """Each thing in ``folder`` is as it was (``before``) or as an undisturbed run leaves it (``done``), whole:
    an output folder (swapped in one step) or a report (replaced in one step), never a mix or a part; and nothing
    else is there. Says which ("as before" when all of it is)."""
    now = snapshot(folder)
    for top in {p.split("/")[0] for p in [*now[1], *before[1], *done[1]]}:
        part = [{k: v for k, v in shot[0].items() if k.split("/")[0] == top} for shot in (now, before, done)]
        assert part[0] in (part[1], part[2]), f"{top} is neither as before nor as an undisturbed run leaves it"
    assert set(now[1]) <= set(before[1]) | set(done[1]) and leftovers(folder) == [], now[1]
    return "folder as before" if now == before else "new files in place, whole"
