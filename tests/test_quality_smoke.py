"""The quality study's reduced run (issue #6): it runs end to end and ranks the default above random."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quality_study_smoke(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality" / "study.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "results.md").read_text()
    default = re.search(r"\| \*\*ean\*\* \(default\) \| ([\d.]+) · ([\d.]+) \|", text)
    random = re.search(
        r"\| random, 2 seeds: mean ± sd \(best\) \| ([\d.]+) ± [\d.]+ \(best ([\d.]+)\) · ([\d.]+) \|", text
    )
    assert default and random, text
    # the default's plan loses less than every random plan, in perplexity and KL
    assert float(default[1]) < float(random[2]) and float(default[2]) < float(random[3])
    assert "task-specific calibration" in text and "calibration size" in text
    assert (tmp_path / "quality.png").read_bytes().startswith(b"\x89PNG")
