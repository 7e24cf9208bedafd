"""The quality study's reduced run (issue #6): it runs end to end and ranks the default above random."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from moeslim.criteria import DEFAULT_CRITERION

ROOT = Path(__file__).resolve().parents[1]


def test_quality_study_smoke(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality" / "study.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "mixtral.json").read_text())["rows"]
    default = [r for r in rows if r["criterion"] == DEFAULT_CRITERION]
    random = [r for r in rows if r["criterion"] == "random"]
    assert len(default) == 2 and len(random) == 2  # the smoke run's two calibration seeds and two random seeds
    # every plan of the default loses less than every random plan, in perplexity and KL
    assert max(r["perplexity"] for r in default) < min(r["perplexity"] for r in random)
    assert max(r["kl"] for r in default) < min(r["kl"] for r in random)
    assert all(len(r["per_sequence"]["kl"]) == 8 for r in default + random)  # 8 held-out sequences, paired
    text = (tmp_path / "results.md").read_text()
    assert f"| **{DEFAULT_CRITERION}** (default) |" in text
    sections = [
        "every plan against the default",
        "The default criterion, by the rule",
        "task-specific",
        "calibration size",
    ]
    for section in sections:
        assert section in text, section
    assert (tmp_path / "quality.png").read_bytes().startswith(b"\x89PNG")
