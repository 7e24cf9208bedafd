"""A real small filesystem, filled while ``slim``, ``calibrate`` and ``validate`` write to it.

A 2 MB tmpfs is mounted; a clean run of each command on it measures how much space the command takes at its peak
(the least free space seen at any of its writes), and the command is then run with the disk filled so as to leave
fractions of that: from nothing (not even the lock fits) to nearly enough (the last file does not fit). Each
failure must be one line saying what to do (no space left, or the free-space check's real numbers), leave the
folder byte-identical (a calibration: its statistics so far, nothing half-written), and once the space is freed
the same command succeeds (a calibration resumes, to statistics equal to the clean run's bit for bit).

Mounting needs root. Where the machine refuses it, the tests say so (a warning in pytest's summary) and fill by
``RLIMIT_FSIZE`` instead: a write past the limit then fails for real, with EFBIG rather than ENOSPC.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from moeslim.stream.options import CalibrationOptions
from moeslim.units import parse_size
from tests.budgets import spilling
from tests.conftest import run_cli
from tests.hostile import Injector, injecting, leftovers, outcome_table, record, snapshot  # noqa: F401

SRC = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-qwen3-moe"
WORDS = " ".join(f"w{i % 90}" for i in range(4000))  # words the fixture tokenizer knows
SMALL = ["--samples", "4", "--seq-len", "16"]
SPILL = spilling(SRC, CalibrationOptions(samples=4, seq_len=16), 1000)  # whole layers, 1 kB of hidden states in RAM
FRACTIONS = (0.0, 0.1, 0.3, 0.6, 0.85, 0.97)  # of the space a command needs at its peak
PAGE = 4096


class Disk:
    """A small filesystem at ``path`` (``real``: a tmpfs; else writes are limited by ``RLIMIT_FSIZE``)."""

    def __init__(self, path: Path, real: bool) -> None:
        self.path, self.real = path, real

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    @contextlib.contextmanager
    def leaving(self, free: int) -> Iterator[None]:
        """Fill the disk so that ``free`` bytes are left (fallback: no file may grow past ``free`` bytes)."""
        if not self.real:
            limits = resource.getrlimit(resource.RLIMIT_FSIZE)
            handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
            resource.setrlimit(resource.RLIMIT_FSIZE, (free, limits[1]))
            try:
                yield
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, limits)
                signal.signal(signal.SIGXFSZ, handler)
            return
        filler = self.path / ".filler"  # created and removed around the run, so no snapshot holds it
        with open(filler, "wb") as f:
            f.truncate(0)
            os.posix_fallocate(f.fileno(), 0, max(self.free() - free, 1))
        try:
            yield
        finally:
            filler.unlink()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    mount = tmp_path / "disk"
    mount.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)]
    if os.environ.get("MOESLIM_TEST_NO_MOUNT") != "1" and subprocess.run(cmd, capture_output=True).returncode == 0:
        try:
            yield Disk(mount, real=True)
        finally:
            subprocess.run(["umount", str(mount)], check=True)
        return
    why = "cannot mount a small tmpfs here (not root): filling by RLIMIT_FSIZE instead, whose writes fail with EFBIG"
    warnings.warn(why, stacklevel=1)
    print(f"\nmoeslim test: {why}")
    yield Disk(mount, real=False)


def _world(disk: Disk, texts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A previous pruned output and report on the disk; the texts beside it."""
    texts.mkdir()
    (texts / "calib.txt").write_text(WORDS)
    (texts / "heldout.txt").write_text(WORDS[::-1])
    code, _, err = run_cli(["slim", str(SRC), "--keep", "4", "--out", str(disk.path / "out"), "--criterion",
                            "router-norm", "--no-validate"], capsys)  # fmt: skip
    assert code == 0, err
    (disk.path / "report.json").write_text('{"previous": true}\n')


COMMANDS = {
    "slim": lambda d, t: ["slim", str(SRC), "--keep", "4", "--out", str(d / "out"), "--overwrite", "--criterion",
                          "ean", "--calib", str(t / "calib.txt"), *SMALL],
    "calibrate": lambda d, t: ["calibrate", str(SRC), "--out", str(d / "stats"), "--calib", str(t / "calib.txt"),
                               *SMALL, "--max-memory", SPILL],
    "validate": lambda d, t: ["validate", str(SRC), str(d / "out"), "--calib", str(t / "heldout.txt"), *SMALL,
                              "--generations", "0", "--json", str(d / "report.json")],
}  # fmt: skip


def _peak(disk: Disk, args: list[str], capsys: pytest.CaptureFixture[str]) -> int:
    """Run ``args`` undisturbed; the most space it held at once (largest file written, without a real disk)."""
    start = disk.free()
    least = [start]
    injector = Injector(disk.path)
    injector.on_write = lambda: least.append(disk.free())
    with injecting(injector):
        code, _, err = run_cli(args, capsys)
    assert code == 0, err
    if not disk.real:
        return max(p.stat().st_size for p in disk.path.rglob("*") if p.is_file())
    return start - min(least) + PAGE  # the page of the write that was about to happen


@pytest.mark.parametrize("command", COMMANDS)
def test_a_disk_filled_during_the_run(command: str, disk: Disk, tmp_path: Path, capsys) -> None:
    texts = tmp_path / "texts"
    _world(disk, texts, capsys)
    args = COMMANDS[command](disk.path, texts)
    need = _peak(disk, args, capsys)
    done = snapshot(disk.path)  # what an undisturbed run leaves
    if command == "calibrate":
        shutil.rmtree(disk.path / "stats")
    levels = sorted({int(need * f) // PAGE * PAGE for f in FRACTIONS})
    for free in levels:
        before = snapshot(disk.path)
        with disk.leaving(free):
            code, _, err = run_cli(args, capsys)
        record("full disk (tmpfs)" if disk.real else "file size limit", command, _outcome(code, err))
        if code == 0:
            continue  # it fitted (tmpfs counts pages, and the peak was measured a page wide)
        assert code == 2 and err.count("\n") == 1 and err.startswith("moeslim: error: "), err
        assert re.search(r"no space left|not enough disk space|too large", err, re.IGNORECASE), err
        _real_numbers(err, free)
        if command == "calibrate":
            assert leftovers(disk.path) == []  # its statistics so far, to resume from; nothing half-written
        else:
            assert snapshot(disk.path) == before  # the previous output and report intact; no lock, temp or part
    code, _, err = run_cli(args, capsys)  # space freed: the same command again
    assert code == 0, err
    assert snapshot(disk.path) == done  # the same files as the undisturbed run: a calibration resumed to them


def _outcome(code: int, err: str) -> str:
    if code == 0:
        return "fitted"
    if "not enough disk space" in err:
        return "refused by the space check"
    return "one line while writing"


def _real_numbers(err: str, free: int) -> None:
    """The free-space check's message gives the sizes, in units that show them (not "0.00 GB")."""
    if m := re.search(r"needs ([0-9.]+ [KMGT]?B), ([0-9.]+ [KMGT]?B) free", err):
        needed, left = (parse_size(x.replace(" ", "")) for x in m.groups())
        assert needed > left and abs(left - free) <= 8 * PAGE, (err, free)


def test_out_that_is_a_mount_point_is_refused_in_one_line(disk: Disk, capsys) -> None:
    if not disk.real:
        pytest.skip("no mount point: this machine cannot mount")
    for extra in ([], ["--overwrite"]):
        args = ["slim", str(SRC), "--keep", "4", "--out", str(disk.path), "--criterion", "router-norm", *extra]
        code, _, err = run_cli(args, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"{disk.path} is a mount point" in err and f"--out {disk.path}/tiny-qwen3-moe-pruned" in err, err
    assert list(disk.path.iterdir()) == []
    assert sorted(p.name for p in disk.path.parent.iterdir()) == ["disk"]  # no lock left beside it
