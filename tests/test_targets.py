"""Nothing lost: --overwrite replaces only moeslim's own output, one run per target, dead runs' leftovers swept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeslim.targets import TargetLock, sweep, target_of
from tests.conftest import run_cli, tree_digest

ROOT = Path(__file__).resolve().parents[1]


def _slim(src: Path, out: Path, *extra: str) -> list[str]:
    return ["slim", str(src), "--keep", "4", "--out", str(out), "--criterion", "router-norm", "--no-validate", *extra]


def _assert_one_line(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("moeslim: error: ") and message in err, err


def test_overwrite_refuses_a_folder_moeslim_did_not_make(built, tmp_path: Path, capsys) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    before = tree_digest(target)
    code, _, err = run_cli(_slim(built("mixtral"), target, "--overwrite"), capsys)
    _assert_one_line(code, err, "has no moeslim_plan.json, so it is not a moeslim output")
    assert tree_digest(target) == before


def test_overwrite_refuses_an_output_holding_a_user_file(built, tmp_path: Path, capsys) -> None:
    src, target = built("mixtral"), tmp_path / "out"
    assert run_cli(_slim(src, target), capsys)[0] == 0
    (target / "notes.txt").write_text("mine")
    before = tree_digest(target)
    code, _, err = run_cli(_slim(src, target, "--overwrite"), capsys)
    _assert_one_line(code, err, "holds notes.txt, which moeslim did not write")
    assert tree_digest(target) == before


def test_overwrite_never_replaces_the_working_directory(built, tmp_path: Path, capsys, monkeypatch) -> None:
    src, target = built("mixtral"), tmp_path / "out"
    assert run_cli(_slim(src, target), capsys)[0] == 0
    before = tree_digest(target)
    monkeypatch.chdir(target)  # an output folder moeslim made, but the user is working in it
    code, _, err = run_cli(_slim(src, Path("."), "--overwrite"), capsys)
    _assert_one_line(code, err, "is the working directory or holds it")
    (target / "deeper").mkdir()
    monkeypatch.chdir(target / "deeper")
    code, _, err = run_cli(_slim(src, Path(".."), "--overwrite"), capsys)
    _assert_one_line(code, err, "is the working directory or holds it")
    (target / "deeper").rmdir()
    assert tree_digest(target) == before


def test_a_parent_of_the_source_is_never_a_target(built, tmp_path: Path, capsys) -> None:
    src = tmp_path / "models" / "src"
    src.parent.mkdir()
    os.symlink(built("mixtral"), src)
    code, _, err = run_cli(_slim(src, tmp_path / "models", "--overwrite"), capsys)
    _assert_one_line(code, err, "overlaps the source folder")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["src"]  # not even a lock file


def test_calibrate_into_the_model_folder_is_refused(tmp_path: Path, capsys) -> None:
    model = ROOT / "fixtures" / "trained" / "tiny-mixtral-16e"
    before = tree_digest(model)
    for out in (model, model / "stats", model.parent):
        code, _, err = run_cli(["calibrate", str(model), "--out", str(out), "--overwrite"], capsys)
        _assert_one_line(code, err, "overlaps the source folder")
    assert tree_digest(model) == before


def test_calibrate_overwrite_clears_only_its_own_files(tmp_path: Path, capsys, monkeypatch) -> None:
    model = ROOT / "fixtures" / "trained" / "tiny-mixtral-16e"
    stats = tmp_path / "stats"
    small = ["--samples", "4", "--seq-len", "16", "--reconstruction-tokens", "0"]
    assert run_cli(["calibrate", str(model), "--out", str(stats), *small], capsys)[0] == 0
    code, _, err = run_cli(["calibrate", str(model), "--out", str(stats), *small, "--seed", "1"], capsys)
    _assert_one_line(code, err, "holds statistics from other data or settings; pass --overwrite")
    code, _, err = run_cli(["calibrate", str(model), "--out", str(stats), *small, "--seed", "1", "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((stats / "stats.json").read_text())["calibration"]["seed"] == 1
    # a folder of the user's is refused, with or without --overwrite, and left as it was
    monkeypatch.chdir(tmp_path)
    (tmp_path / "paper.txt").write_text("mine")
    for flags in ([], ["--overwrite"]):
        code, _, err = run_cli(["calibrate", str(model), "--out", ".", *small, *flags], capsys)
        _assert_one_line(code, err, "holds paper.txt, which moeslim did not write")
    assert (tmp_path / "paper.txt").read_text() == "mine" and (stats / "stats.json").is_file()
    monkeypatch.chdir(stats)  # working inside a statistics folder is fine: only its files are ever rewritten
    code, _, err = run_cli(["calibrate", str(model), "--out", ".", *small, "--seed", "1"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in stats.iterdir()) == ["stats.json", "stats.safetensors"]


def test_a_target_held_by_a_live_run_is_refused(built, tmp_path: Path, capsys) -> None:
    target = tmp_path / "out"
    lock = TargetLock(target)  # the same lock another moeslim process would hold
    assert lock.acquire()
    try:
        code, _, err = run_cli(_slim(built("mixtral"), target), capsys)
        _assert_one_line(code, err, f"is being written by another moeslim run (pid {os.getpid()})")
    finally:
        lock.release()
    assert not target.exists()
    assert run_cli(_slim(built("mixtral"), target), capsys)[0] == 0  # released: the next run goes ahead


def test_two_runs_into_one_target_one_wins(built, tmp_path: Path) -> None:
    src = built("qwen3_moe")
    for attempt in range(3):
        target = tmp_path / f"out{attempt}"
        cmd = [sys.executable, "-m", "moeslim", *_slim(src, target)]
        procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [(p.wait(), p.stderr.read() if p.stderr else "") for p in procs]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 2], results
        loser = next(err for code, err in results if code == 2)
        assert "is being written by another moeslim run" in loser or "already exists" in loser, loser
        assert json.loads((target / "moeslim_plan.json").read_text())["keep"] == 4
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".out{attempt}")) == []


def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept(built, tmp_path: Path, capsys) -> None:
    dead = tmp_path / ".out.k3j2h1g0.moeslim-tmp"  # a run of --out out killed with -9
    other_dead = tmp_path / ".other.z9y8x7w6.moeslim-old"
    live = tmp_path / ".busy.a1b2c3d4.moeslim-tmp"  # a run of --out busy still going
    for folder in (dead, other_dead, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    user = tmp_path / ".config.moeslim-tmp"  # not a name moeslim makes: never touched
    user.mkdir()
    lock = TargetLock(tmp_path / "busy")
    assert lock.acquire()
    try:
        code, _, err = run_cli(_slim(built("mixtral"), tmp_path / "out"), capsys)
    finally:
        lock.release()
    assert code == 0, err
    assert not dead.exists() and not other_dead.exists() and live.exists() and user.exists()
    assert f"removed {dead}, left by an interrupted run" in err
    assert sweep(tmp_path) == [live]  # its run is gone now


@pytest.mark.parametrize(
    ("name", "target"),
    [(".out.k3j2h1g0.moeslim-tmp", "out"), (".my.model.abcdefgh.moeslim-old", "my.model"),
     (".moeslim-tmp", None), ("out.abc.moeslim-tmp", None), (".x.moeslim-tmp", None), ("..q.moeslim-tmp", None)],
)  # fmt: skip
def test_leftover_names_map_to_their_target(name: str, target: str | None) -> None:
    assert target_of(name) == target
