"""The README's commands are the ones CI and users run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = next(c for c in _readme_commands() if "pytest" in c)
    assert test_command in ci


def test_readme_demo_prunes_the_shipped_fixture(tmp_path: Path) -> None:
    demo = next(c for c in _readme_commands() if "moeslim slim fixtures/" in c)
    slim_part = demo.split("&& ")[-1].split()  # the command after the installs
    out = tmp_path / slim_part[slim_part.index("--out") + 1]
    args = [*slim_part[1:-1], str(out)]
    done = subprocess.run([sys.executable, "-m", "moeslim", *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").is_file() and (out / "moeslim_plan.json").is_file()
