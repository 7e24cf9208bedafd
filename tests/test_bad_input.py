"""Every bad input, through the real command, for every command that takes it: exit code 2, exactly one line on
stderr that starts ``moeslim: error: `` (no traceback), nothing written beside the target. And ``~`` in ``--out``
means the home folder for the lock, the checks and the files alike."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from moeslim.pipeline import SlimOptions, slim
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "fixtures" / "trained" / "tiny-mixtral-16e"
SMALL = ["--samples", "4", "--seq-len", "16"]


@dataclass(frozen=True)
class Inputs:
    source: str
    pruned: str
    out: str
    extra: tuple[str, ...] = ()


def _argv(command: str, i: Inputs) -> list[str]:
    if command == "slim":
        return ["slim", i.source, "--keep", "8", "--out", i.out, *SMALL, *i.extra]
    if command == "calibrate":
        return ["calibrate", i.source, "--out", i.out, *SMALL, "--reconstruction-tokens", "0", *i.extra]
    return ["validate", i.source, i.pruned, *SMALL, "--generations", "0", *i.extra]


@dataclass(frozen=True)
class Files:
    """What the bad inputs point at, made once per test."""

    not_utf8: Callable[[str], str]  # a name → a link to the model under that name plus an invalid byte
    surrogate: str  # a JSONL file whose text holds half of an emoji


def _with(option: str, value: str) -> Callable[[Inputs, Files], Inputs]:
    return lambda i, f: replace(i, extra=(*i.extra, option, value))


ALL, WRITERS = ("slim", "calibrate", "validate"), ("slim", "calibrate")
BAD: dict[str, tuple[tuple[str, ...], Callable[[Inputs, Files], Inputs]]] = {
    "--batch-size 0": (ALL, _with("--batch-size", "0")),
    "--batch-size -2": (ALL, _with("--batch-size", "-2")),
    "--seed -1": (ALL, _with("--seed", "-1")),
    "--samples 1": (WRITERS, _with("--samples", "1")),  # calibration's statistics have two halves; validation takes 1
    "--samples 0": (ALL, _with("--samples", "0")),
    "--seq-len 1": (ALL, _with("--seq-len", "1")),
    "source not UTF-8": (ALL, lambda i, f: replace(i, source=f.not_utf8("src"))),
    "pruned not UTF-8": (("validate",), lambda i, f: replace(i, pruned=f.not_utf8("pruned"))),
    "--out not UTF-8": (WRITERS, lambda i, f: replace(i, out=i.out + "\udcff")),
    "--json not UTF-8": (("validate",), lambda i, f: replace(i, extra=(*i.extra, "--json", i.out + "\udcff.json"))),
    "--calib with a lone surrogate": (ALL, lambda i, f: replace(i, extra=(*i.extra, "--calib", f.surrogate))),
}
CASES = [(bad, command) for bad, (commands, _) in BAD.items() for command in commands]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "out"
    slim(SlimOptions(MODEL, keep=8, out=out, criterion="router-norm", validation=None))
    return out


@pytest.mark.parametrize(("bad", "command"), CASES, ids=[f"{c}: {b}" for b, c in CASES])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, pruned: Path, bad: str, command: str, capsys) -> None:
    outs = tmp_path / "outs"
    outs.mkdir()

    def not_utf8(name: str) -> str:
        link = os.fsdecode(bytes(tmp_path) + b"/" + name.encode() + b"\xff")  # surrogateescape, as argv decodes it
        os.symlink(pruned if name == "pruned" else MODEL, link)
        return link

    surrogate = tmp_path / "half-emoji.jsonl"
    surrogate.write_text('{"text": "the one \\ud83d of it"}\n' * 64)  # JSON's escape of a lone high surrogate
    inputs = Inputs(str(MODEL), str(pruned), str(outs / "target"))
    args = _argv(command, BAD[bad][1](inputs, Files(not_utf8, str(surrogate))))
    code, out, err = run_cli(args, capsys)
    assert code == 2, err
    assert err.startswith("moeslim: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and out == "", out
    assert list(outs.iterdir()) == []  # no output, lock or temp folder left where the target would be


@pytest.mark.parametrize("command", ["slim", "calibrate"])
def test_a_tilde_in_out_is_the_home_folder(tmp_path: Path, command: str, capsys, monkeypatch) -> None:
    """Quoted (so the shell left it) or not, ``~/x`` is ``$HOME/x``: the files, the lock and the checks agree."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    args = {"slim": ["slim", str(MODEL), "--keep", "8", "--criterion", "router-norm", "--no-validate"],
            "calibrate": ["calibrate", str(MODEL), *SMALL, "--reconstruction-tokens", "0"]}[command]  # fmt: skip
    code, _, err = run_cli([*args, "--out", "~/x"], capsys)
    assert code == 0, err
    assert (home / "x" / ("moeslim_plan.json" if command == "slim" else "stats.json")).is_file()
    assert sorted(p.name for p in home.iterdir()) == ["x"] and list(work.iterdir()) == []
    code, _, err = run_cli([*args, "--out", str(work / "~")], capsys)  # a folder named ~: with a path before it
    assert code == 0, err
    assert sorted(p.name for p in work.iterdir()) == ["~"]
    if command == "slim":
        assert json.loads((work / "~" / "moeslim_plan.json").read_text())["keep"] == 8
