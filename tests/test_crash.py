"""kill -9 at random moments: the target is absent or complete, and a rerun succeeds and leaves nothing behind."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import tree_digest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "fixtures" / "trained" / "tiny-mixtral-16e"
KILLS = 3


def _run(cmd: list[str], cwd: Path) -> tuple[int, str]:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stderr


def _killed_after(cmd: list[str], cwd: Path, seconds: float) -> None:
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(seconds)
    proc.kill()  # SIGKILL: no cleanup code runs
    proc.wait()


@pytest.mark.slow
def test_slim_killed_at_random_moments(tmp_path: Path) -> None:
    """Kill times are spread over a whole run (start-up, scoring, writing, validation, card, rename)."""
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-m", "moeslim", "slim", str(MODEL), "--keep", "8", "--criterion", "router-norm",
           "--out", "out", "--overwrite"]  # fmt: skip
    started = time.monotonic()
    code, err = _run(cmd, work)
    assert code == 0, err
    whole = time.monotonic() - started
    reference = tree_digest(work / "out")
    shutil.rmtree(work / "out")
    rng = random.Random(12)
    for _ in range(KILLS):
        _killed_after(cmd, work, rng.uniform(0.2, whole))
        target = work / "out"
        assert not target.exists() or tree_digest(target) == reference  # absent or complete, never partial
        code, err = _run(cmd, work)
        assert code == 0, err
        assert tree_digest(target) == reference
        assert sorted(p.name for p in work.iterdir()) == ["out"], err  # temp folders and locks of the dead run gone
        shutil.rmtree(target)


@pytest.mark.slow
def test_calibrate_killed_at_random_moments_resumes_to_the_same_statistics(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "moeslim", "calibrate", str(MODEL), "--out", "stats", "--samples", "16",
           "--seq-len", "64"]  # fmt: skip
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    started = time.monotonic()
    code, err = _run(cmd, fresh)
    assert code == 0, err
    whole = time.monotonic() - started
    expected = load_file(fresh / "stats" / "stats.safetensors")
    rng = random.Random(7)
    for attempt in range(KILLS):
        work = tmp_path / f"run{attempt}"
        work.mkdir()
        _killed_after(cmd, work, rng.uniform(0.2, whole))
        code, err = _run(cmd, work)
        assert code == 0, err
        got = load_file(work / "stats" / "stats.safetensors")
        assert sorted(got) == sorted(expected)
        for key, value in expected.items():
            assert np.allclose(got[key], value, rtol=1e-12, atol=0), key
        assert sorted(p.name for p in work.iterdir()) == ["stats"], err
        assert sorted(p.name for p in (work / "stats").iterdir()) == ["stats.json", "stats.safetensors"]
