"""Hidden states spilled past ``--max-memory`` go beside the output or statistics folder, named as its temp folders:
a run killed with SIGKILL leaves them there (not in TMPDIR, where nothing would ever remove them), the next run
there removes them, and a run that ends leaves nothing. A full disk while spilling is one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moeslim.errors import OutputError
from moeslim.stream.activations import Activations
from moeslim.stream.options import CalibrationOptions
from tests.budgets import spilling
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "fixtures" / "trained" / "tiny-mixtral-16e"
#: batches of 8 × 64 × 64 float32, 128 kB each: whole layers with 5 kB of hidden states in RAM, so every batch spills
SPILL = ["--max-memory", spilling(MODEL, CalibrationOptions(samples=32, seq_len=64), 5000), "--samples", "32",
         "--seq-len", "64"]  # fmt: skip
COMMANDS = {
    "calibrate": ("stats", ["calibrate", str(MODEL), "--out", "stats", *SPILL]),
    "slim": ("out", ["slim", str(MODEL), "--keep", "8", "--criterion", "ean", "--out", "out", "--no-validate", *SPILL]),
}


def _calib_text(folder: Path) -> Path:
    """~400 kB of Python: enough tokens, read faster than the whole stdlib."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path = folder / "calib.txt"
    path.write_text("".join((stdlib / n).read_text() for n in ("argparse.py", "typing.py", "inspect.py", "pathlib.py")))
    return path


def _spills(work: Path, target: str) -> list[Path]:
    """The temp folders beside ``target`` holding spilled hidden states."""
    return [tmp for tmp in work.glob(f".{target}.*.moeslim-tmp") if any(tmp.glob("*.bin"))]


def _watched(cmd: list[str], work: Path, env: dict[str, str], target: str, kill: bool) -> tuple[int, str, list[Path]]:
    """Run ``cmd`` in ``work``, watching for its spill folders; with ``kill``, SIGKILL it once one holds a batch.
    Returns the exit code, stderr and the spill folders it made."""
    before = set(_spills(work, target))  # a dead run's, not this one's
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: set[Path] = set()
    while proc.poll() is None:
        seen.update(set(_spills(work, target)) - before)
        if kill and seen:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err, sorted(seen)


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_a_killed_runs_spill_is_beside_its_target_and_swept_by_the_next(tmp_path: Path, command: str) -> None:
    work, tmpdir = tmp_path / "work", tmp_path / "tmpdir"
    work.mkdir()
    tmpdir.mkdir()
    target, args = COMMANDS[command]
    cmd = [sys.executable, "-m", "moeslim", *args, "--calib", str(_calib_text(tmp_path))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir)}
    code, err, seen = _watched(cmd, work, env, target, kill=True)
    assert code == -signal.SIGKILL, err
    assert seen and all(spill.exists() for spill in seen)  # left beside the target by the dead run
    assert list(tmpdir.iterdir()) == []  # and nothing in TMPDIR
    code, err, again = _watched(cmd, work, env, target, kill=False)
    assert code == 0, err
    for spill in seen:
        assert f"removed {spill}, left by an interrupted run" in err
    assert again and set(again).isdisjoint(seen)  # the next run spilled beside the target too, into its own folder
    assert sorted(p.name for p in work.iterdir()) == [target]  # and its folders are gone once it ended
    assert list(tmpdir.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 kB filesystem: too small for one spilled batch. Needs root (CI and dev machines run as root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_while_spilling_is_one_line(small_disk: Path, tmp_path: Path, capsys) -> None:
    args = ["calibrate", str(MODEL), "--out", str(small_disk / "stats"), *SPILL, "--calib", str(_calib_text(tmp_path))]
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("moeslim: error: no space left on device for the hidden states")
    assert "Traceback" not in err
    assert list(small_disk.iterdir()) == []  # no lock, no spill folder, no statistics folder


def test_a_full_tmpdir_while_spilling_is_a_typed_error(small_disk: Path, monkeypatch) -> None:
    """A library caller without a target spills into TMPDIR; a full one is an ``OutputError`` saying so."""
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))
    store = Activations(max_bytes=0)
    with pytest.raises(OutputError, match="no space left on device for the hidden states spilled past --max-memory"):
        store.append(torch.zeros(64 * 1024))  # 256 kB
    store.close()
    assert list(small_disk.iterdir()) == []
