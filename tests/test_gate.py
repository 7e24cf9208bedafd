"""``--max-kl`` opens only on a measured mean KL: a validation that measured nothing (no held-out text left, no
tokenizer) fails it with exit code 1 and nothing is pushed; a gate that cannot be checked at all is refused."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from moeslim.validate.report import kl_gate
from moeslim.validate.run import kl_exceeds
from tests.conftest import run_cli
from tests.hub_server import Account, HubServer

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "fixtures" / "trained" / "tiny-mixtral-16e"
TOKEN = f"hf_gate_{secrets.token_hex(12)}"
SKIPPED = {"summary": "structure checked; numeric comparison skipped: no tokenizer next to either model's weights"}


@pytest.mark.parametrize(
    ("report", "max_kl", "fails"),
    [
        ({"kl_mean": 0.5}, None, False),  # no gate
        ({"kl_mean": 0.5}, 1.0, False),
        ({"kl_mean": 1.0}, 1.0, False),  # at the bound passes
        ({"kl_mean": 1.5}, 1.0, True),
        (SKIPPED, 10.0, True),  # numeric comparison skipped: nothing measured
        ({**SKIPPED, "kl_mean": None}, 10.0, True),  # NaN, written as null
        ({"kl_mean": float("nan")}, 10.0, True),
        ({"kl_mean": float("inf")}, 10.0, True),
        ({}, 10.0, True),  # validation did not run
        (SKIPPED, None, False),  # nothing measured, but no gate to open
    ],
)
def test_gate_opens_only_on_a_measured_kl(report: dict, max_kl: float | None, fails: bool) -> None:
    assert (kl_gate(report, max_kl) is not None) is fails
    assert kl_exceeds(report, max_kl) is fails  # what slim consults before pushing


def test_gate_says_why_nothing_was_measured() -> None:
    reason = kl_gate(SKIPPED, 10.0)
    assert reason is not None and SKIPPED["summary"] in reason
    assert "--max-kl 10 cannot be checked" in reason and "--calib" in reason and "drop --max-kl" in reason
    assert kl_gate({"kl_mean": 1.5}, 1.0) == "mean KL 1.5 exceeds --max-kl 1"


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    """One small text file: calibration reads all of it, so nothing is left to hold out for validation."""
    path = tmp_path / "calib.txt"
    path.write_text((ROOT / "moeslim" / "plan.py").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return path


def _slim_args(calib: Path, out: Path) -> list[str]:
    return ["slim", str(TRAINED), "--keep", "8", "--calib", str(calib), "--samples", "2", "--seq-len", "32",
            "--max-kl", "10", "--out", str(out)]  # fmt: skip


def test_slim_fails_max_kl_when_nothing_was_measured(calib: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, stdout, err = run_cli(_slim_args(calib, out), capsys)
    assert code == 1, err
    report = json.loads((out / "validation.json").read_text())
    assert "kl_mean" not in report and "numeric comparison skipped" in report["summary"]  # the setup is what we meant
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("moeslim: validation failed: --max-kl 10 cannot be checked because no KL was measured")
    assert report["summary"] in err and "pass --calib with more or other text" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--no-validate", "--max-kl", "1"], "--max-kl checks the validation that --no-validate skips"),
        (["--max-kl", "nan"], "--max-kl nan is not a KL bound"),
        (["--max-kl", "-1"], "--max-kl -1 is not a KL bound"),
    ],
)
def test_a_gate_that_cannot_be_checked_is_refused_up_front(
    args: list[str], message: str, tmp_path: Path, capsys
) -> None:
    code, _, err = run_cli(["slim", str(TRAINED), "--keep", "8", "--out", str(tmp_path / "o"), *args], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("moeslim: error: ") and message in err, err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_validate_fails_max_kl_when_nothing_was_measured(built, tmp_path: Path, capsys) -> None:
    """No tokenizer next to either model: the structure is checked, the numbers are not."""
    original = Path(shutil.copytree(built("qwen3_moe"), tmp_path / "original"))
    (original / "tokenizer.json").unlink()
    code, _, err = run_cli(["slim", str(original), "--keep", "4", "--criterion", "router-norm", "--out",
                            str(tmp_path / "pruned")], capsys)  # fmt: skip
    assert code == 0, err
    args = ["validate", str(original), str(tmp_path / "pruned"), "--generations", "0"]
    code, _, err = run_cli([*args, "--max-kl", "5"], capsys)
    assert code == 1 and err.count("\n") == 1 and "no tokenizer next to either model's weights" in err, err
    code, _, err = run_cli([*args, "--max-kl", "-0.5"], capsys)
    assert code == 2 and "--max-kl -0.5 is not a KL bound" in err, err


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    server = HubServer().start()
    server.state.tokens[TOKEN] = Account("alice", orgs=("org",))
    yield server
    server.stop()


@pytest.mark.hub
def test_slim_pushes_nothing_when_nothing_was_measured(hub: HubServer, calib: Path, tmp_path: Path) -> None:
    """The real entry point in a fresh interpreter, since huggingface_hub reads HF_ENDPOINT when imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_TOKEN=TOKEN, HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", PYTHONPATH=str(ROOT))  # fmt: skip
    args = [*_slim_args(calib, tmp_path / "out"), "--push-to", "org/unmeasured"]
    done = subprocess.run([sys.executable, "-m", "moeslim", *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.endswith("or drop --max-kl; not pushed\n"), done.stderr
    assert "org/unmeasured" not in hub.state.repos and "pushed to" not in done.stdout
    assert [r.path for r in hub.state.log if r.method != "GET"] == []  # not one write request
    assert (tmp_path / "out" / "validation.json").is_file()  # the output itself is complete
