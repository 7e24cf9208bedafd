"""The ``moeslim`` entry point: usage errors, --version, Ctrl-C, mistyped folders, and what ``slim`` says it wrote."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from moeslim import __version__
from moeslim.hub import is_hub_source, near_folder
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def _moeslim(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m moeslim ARGS`` in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "moeslim", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=120)  # fmt: skip


def _usage_error(err: str, usage: str | None, message: str) -> None:
    assert (usage is None or err.startswith(f"Usage: {usage}")) and message in err, err
    assert "Traceback" not in err and len(err.splitlines()) < 10, err


@pytest.mark.parametrize(
    ("args", "usage", "message"),
    [
        (["slim", "x", "--keep", "abc"], "moeslim slim [OPTIONS]", "Invalid value for '--keep'"),
        (["frobnicate"], "moeslim [OPTIONS] COMMAND [ARGS]", "No such command 'frobnicate'"),
    ],
)
def test_usage_errors_are_short_and_exit_2(args: list[str], usage: str, message: str) -> None:
    done = _moeslim(args)
    assert done.returncode == 2 and done.stdout == "", done
    _usage_error(done.stderr, usage, message)


@pytest.mark.parametrize(
    ("args", "usage", "message"),
    [
        (["slim"], "moeslim slim [OPTIONS]", "Missing argument"),
        (["validate", "a"], "moeslim validate [OPTIONS]", "Missing argument"),
        (["inspect", "x", "--keep"], None, "Option '--keep' requires an argument"),  # typer shows no usage here
        (["slim", "x", "--no-such-option"], "moeslim slim [OPTIONS]", "No such option: --no-such-option"),
        (["slim", "x", "--max-kl", "much"], "moeslim slim [OPTIONS]", "Invalid value for '--max-kl'"),
    ],
)
def test_usage_errors_in_process(args: list[str], usage: str | None, message: str, capsys) -> None:
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == "", (code, out, err)
    _usage_error(err, usage, message)


def test_version_option_and_command(capsys) -> None:
    done = _moeslim(["--version"])
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{__version__}\n", "")
    assert run_cli(["version"], capsys) == (0, f"{__version__}\n", "")
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "--version" in out and "slim" in out


def test_our_errors_stay_one_line(capsys) -> None:
    code, out, err = run_cli(["inspect", str(ROOT / "fixtures" / "tiny-qwen3-moe"), "--keep", "9"], capsys)
    assert (code, out) == (
        2,
        "",
    ) and err == "moeslim: error: --keep 9 must be between 1 and 7: the model has 8 experts per MoE layer\n"


@pytest.fixture
def silent_endpoint() -> Iterator[socket.socket]:
    """A Hub server that accepts connections and never answers: a download waits there until interrupted."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


def test_ctrl_c_is_one_line_and_exit_130(silent_endpoint: socket.socket, tmp_path: Path) -> None:
    """SIGINT arrives while ``inspect`` waits for the Hub: sent once the request has reached the server (not on a
    timer, which a slow first import of a fresh environment can outrun)."""
    url = f"http://127.0.0.1:{silent_endpoint.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf"), NO_PROXY="127.0.0.1", PYTHONPATH=str(ROOT))
    # as from a terminal: a test run started in the background (`cmd &`) inherits SIGINT ignored, and Python then
    # never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "moeslim", "inspect", "org/model"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        silent_endpoint.settimeout(120)
        connection, _ = silent_endpoint.accept()  # the request is on its way: moeslim now waits for an answer
        with connection:
            connection.recv(1)  # its first byte has arrived
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert stderr.strip() == "moeslim: interrupted", stderr


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding ``models/tiny-qwen3-moe/`` (empty: a typo is caught before it is read)."""
    (tmp_path / "models" / "tiny-qwen3-moe").mkdir(parents=True)
    (tmp_path / "models" / "notes.txt").write_text("a file is not a checkpoint folder")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("src", "near"),
    [
        ("models/tiny-qwen3-mo", "models/tiny-qwen3-moe"),  # one slash: spelled like a Hub repo id
        ("models/tiny-qwen3-moe/", None),  # exists
        ("./models/tiny-qwen3-mo", "./models/tiny-qwen3-moe"),  # written as the user wrote it
        ("models/tiny-qwen2-moe", "models/tiny-qwen3-moe"),
        ("models/notes.tx", None),  # files are not suggested
        ("models/Qwen3-30B-A3B", None),  # nothing alike: a repo id, if the org is called models
        ("org/tiny-qwen3-mo", None),  # no local folder org
    ],
)
def test_near_folder(src: str, near: str | None, models: Path) -> None:
    assert near_folder(src) == near


def test_a_mistyped_folder_is_not_sent_to_the_hub(models: Path) -> None:
    assert not is_hub_source("models/tiny-qwen3-mo")  # a typo of a local folder
    assert is_hub_source("models/Qwen3-30B-A3B") and is_hub_source("Qwen/Qwen3-30B-A3B")  # repo ids still go


@pytest.mark.parametrize(
    "command", [["slim", "{src}", "--keep", "4"], ["inspect", "{src}"], ["validate", "{src}", "x"]]
)
@pytest.mark.parametrize("prefix", ["", "./", "{root}/"])
def test_mistyped_folder_message(command: list[str], prefix: str, models: Path, capsys) -> None:
    src = prefix.replace("{root}", str(models)) + "models/tiny-qwen3-mo"
    code, out, err = run_cli([a.replace("{src}", src) for a in command], capsys)
    assert (code, out) == (2, "")
    assert err == f"moeslim: error: no such folder {src}; did you mean {src}e?\n"


def test_missing_path_without_a_near_folder(models: Path, capsys) -> None:
    code, _, err = run_cli(["slim", "a/b/c", "--keep", "4"], capsys)
    assert (
        code == 2
        and err == "moeslim: error: a/b/c does not exist: pass a checkpoint folder or a Hub repo id like org/name\n"
    )


def _written(out: str) -> dict[str, str]:
    """The ``written:`` block at the end of slim's output: what → path."""
    lines = out.splitlines()
    block = lines[lines.index("written:") + 1 :]
    return {line[2:13].strip(): line[14:] for line in block if line.startswith("  ")}


def test_slim_ends_with_what_it_wrote_where(built, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pruned"
    args = ["slim", str(built("qwen3_moe")), "--keep", "4", "--criterion", "router-norm", "--out", str(out)]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert stdout.splitlines()[0].startswith("kept 4 of 8 experts in 3 layers (router-norm); wrote ")
    written = _written(stdout)
    assert written == {
        "checkpoint": f"{out} (1 shard(s))",
        "plan": str(out / "moeslim_plan.json"),
        "validation": str(out / "validation.json"),
        "model card": str(out / "README.md"),
        "expert map": str(out / "expert_map.png"),
    }
    assert all(Path(path).is_file() for what, path in written.items() if what != "checkpoint")
    assert stdout.splitlines()[-1] == f"  expert map  {out / 'expert_map.png'}"  # nothing pushed: no URL line

    code, stdout, err = run_cli([*args, "--overwrite", "--no-validate"], capsys)
    assert code == 0, err
    assert "validation" not in _written(stdout) and not (out / "validation.json").exists()


def test_other_os_errors_are_one_line_with_exit_1(capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Not a moeslim error (nothing checks beforehand that the --json file can be created), yet the user can act
    on it. (An --out that cannot be created is a moeslim error, exit 2: checked before any work.)"""
    model = str(ROOT / "fixtures" / "tiny-qwen3-moe")
    code, _, err = run_cli(["calibrate", model, "--out", "/dev/null/stats"], capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot write /dev/null/stats" in err, err
    pruned = str(shutil.copytree(model, tmp_path / "pruned"))  # validate writes validation.json into it
    args = ["validate", model, pruned, "--samples", "2", "--seq-len", "16", "--generations", "0",
            "--json", "/dev/null/r.json"]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("moeslim: error: ") and "/dev/null/r.json" in err, err
    monkeypatch.setenv("MOESLIM_DEBUG", "1")
    with pytest.raises(NotADirectoryError):
        run_cli(args, capsys)
