"""Start-up: commands that need no model (help, inspect, data-free slim) import neither torch nor transformers.

Each command runs through the real entry point in a fresh interpreter, which then lists every module imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "fixtures" / "tiny-qwen3-moe"
HEAVY = ("torch", "transformers")
DERIVATION = ("moeslim.families.derive", "moeslim.families.tiny")

# Runs `python -m moeslim ARGS...` and writes the names of all imported modules to the file named first.
RECORD = """\
import json, runpy, sys
listing, sys.argv = sys.argv[1], ["moeslim", *sys.argv[2:]]
try:
    runpy.run_module("moeslim", run_name="__main__", alter_sys=True)
finally:
    with open(listing, "w") as f:
        json.dump(sorted(sys.modules), f)
"""


def imported(
    args: list[str], tmp_path: Path, env: dict[str, str] | None = None
) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """Run ``moeslim args`` in a fresh interpreter in ``tmp_path`` (with ``env`` added to the environment); the
    modules it imported, and how it ended."""
    listing = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", RECORD, str(listing), *args], cwd=tmp_path, capture_output=True, text=True,
        timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip
    return set(json.loads(listing.read_text())), done


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["inspect", str(TINY)],
        ["slim", str(TINY), "--keep", "4", "--criterion", "router-norm", "--no-validate", "--out", "out"],
        ["slim", str(TINY), "--keep", "4", "--criterion", "weight-norm", "--no-validate", "--out", "out"],
    ],
    ids=["help", "inspect", "slim-router-norm", "slim-weight-norm"],
)
def test_commands_without_a_model_import_no_torch(args: list[str], tmp_path: Path) -> None:
    modules, done = imported(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert not [m for m in HEAVY if m in modules], done.stdout
    assert not [m for m in DERIVATION if m in modules]  # a committed family: nothing derived


def test_slim_from_a_saved_plan_imports_no_torch(tmp_path: Path) -> None:
    first = ["slim", str(TINY), "--keep", "4", "--criterion", "random", "--no-validate", "--out", "first"]
    assert imported(first, tmp_path)[1].returncode == 0
    again = ["slim", str(TINY), "--plan", "first/moeslim_plan.json", "--no-validate", "--out", "again"]
    modules, done = imported(again, tmp_path)
    assert done.returncode == 0, done.stderr
    assert not [m for m in HEAVY if m in modules]


def test_calibrate_imports_torch(tmp_path: Path) -> None:
    """The lazy import is in place: calibrating loads torch (here before it finds there is no checkpoint)."""
    modules, done = imported(["calibrate", str(tmp_path / "missing"), "--out", "stats"], tmp_path)
    assert done.returncode != 0
    assert "torch" in modules
