"""``moeslim inspect`` takes what ``slim`` takes: Hub repo ids, and only the ``--keep`` values slim would serve."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from moeslim import jsonio
from tests.conftest import run_cli
from tests.hub_server import Account, HubServer, folder_files

ROOT = Path(__file__).resolve().parent.parent
TOKEN = f"hf_inspect_{secrets.token_hex(12)}"


@pytest.mark.parametrize(
    ("fixture", "args", "message"),
    [
        ("qwen3_moe", ["--keep", "8"], "--keep 8 must be between 1 and 7"),
        ("qwen3_moe", ["--keep", "1"], "--keep 1 is below the router's top-k 2"),
        ("qwen3_moe", ["--keep", "2", "--top-k", "3"], "--top-k 3 must be between 1 and the model's top-k 2"),
        ("deepseek_v3", ["--keep", "6"], "keep a multiple of 4 with at least 2 per group"),
    ],
)
def test_inspect_refuses_what_slim_refuses(fixture: str, args: list[str], message: str, built, tmp_path: Path,
                                           capsys) -> None:  # fmt: skip
    src = str(built(fixture))
    code, out, err = run_cli(["inspect", src, *args], capsys)
    assert (code, out) == (2, "") and err.count("\n") == 1 and err.startswith("moeslim: error: ") and message in err
    slim = run_cli(["slim", src, *args, "--out", str(tmp_path / "o")], capsys)
    assert slim == (2, "", err)  # the same refusal, word for word


def test_inspect_projects_a_keep_served_by_a_lower_top_k(built, capsys) -> None:
    code, out, err = run_cli(["inspect", str(built("qwen3_moe")), "--keep", "1", "--top-k", "1", "--json"], capsys)
    assert code == 0, err
    assert jsonio.loads(out)["keep"] == 1  # strict JSON


def test_inspect_refuses_a_top_k_above_the_expert_count(built, tmp_path: Path, capsys) -> None:
    src = Path(shutil.copytree(built("qwen3_moe"), tmp_path / "src"))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 9}))  # 8 experts
    code, out, err = run_cli(["inspect", str(src)], capsys)
    assert (code, out) == (2, "") and err.count("\n") == 1 and "top-k 9" in err and "8 experts" in err, err


@pytest.fixture(scope="module")
def hub(built: Callable[[str], Path]) -> Iterator[HubServer]:
    server = HubServer().start()
    server.state.tokens[TOKEN] = Account("alice")
    server.state.add_repo("org/tiny", folder_files(built("qwen3_moe")))
    yield server
    server.stop()


def _inspect(args: list[str], hub: HubServer, home: Path) -> subprocess.CompletedProcess[str]:
    """The real entry point in a fresh interpreter, since huggingface_hub reads HF_ENDPOINT when imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_TOKEN=TOKEN, HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", PYTHONPATH=str(ROOT))  # fmt: skip
    return subprocess.run([sys.executable, "-m", "moeslim", "inspect", *args], env=env, cwd=home.parent,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.hub
def test_inspect_a_hub_repo(hub: HubServer, built: Callable[[str], Path], tmp_path: Path, capsys) -> None:
    done = _inspect(["org/tiny", "--json", "--keep", "4"], hub, tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    code, local, err = run_cli(["inspect", str(built("qwen3_moe")), "--json", "--keep", "4"], capsys)
    assert code == 0, err
    assert jsonio.loads(done.stdout) == jsonio.loads(local)  # the same checkpoint, read from the Hub


@pytest.mark.hub
def test_inspect_refuses_a_keep_before_downloading_weights(hub: HubServer, tmp_path: Path) -> None:
    start = len(hub.state.log)
    done = _inspect(["org/tiny", "--keep", "8"], hub, tmp_path / "hf")
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr == "moeslim: error: --keep 8 must be between 1 and 7: the model has 8 experts per MoE layer\n"
    downloads = hub.state.downloads("org/tiny", since=start)
    assert "config.json" in downloads and "model.safetensors" not in downloads
