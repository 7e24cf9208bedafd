"""Every write moeslim makes, failed in turn: after each failure the previous outputs are intact, nothing outside
moeslim's own files changed, nothing is left behind, the run said one line, and the next run succeeds (a
calibration resumes, and its statistics equal an undisturbed run's bit for bit).

The writes are not hand-listed: a clean run of each command records every write it makes (``tests/hostile.py``),
and each write site (the line of moeslim's code and its caller, and the operation: open, mkdir, rename, write,
fsync, ...) is then failed in a run of its own, at its first write, with the next fault of the list in turn:
ENOSPC, EROFS, EACCES, EBUSY, EXDEV, ENAMETOOLONG, and a stop by SIGTERM or SIGHUP at that moment. The calibration's
hidden states spill past 1 kB (a ``--max-memory`` of its layer and 1 kB more), so the spill beside the target is
among its writes; slim's
correction writes its patches, its validation its report. After a failed ``slim`` or ``validate`` the folder is byte-identical to before, so the next run
is the recorded clean run, which succeeded; a calibration leaves its statistics so far and is run again to resume.
The table of classes, cases and outcomes is printed in pytest's summary.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from moeslim.stream.options import CalibrationOptions
from tests.budgets import spilling
from tests.conftest import run_cli
from tests.hostile import (  # noqa: F401  (outcome_table: a fixture)
    FAULTS,
    Injector,
    fault_name,
    injecting,
    leftovers,
    old_or_new,
    one_line,
    outcome_table,
    record,
    sites,
    snapshot,
)

SRC = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-qwen3-moe"
WORDS = " ".join(f"w{i % 90}" for i in range(4000))  # words the fixture tokenizer knows
SMALL = ["--samples", "4", "--seq-len", "16"]
SPILL = spilling(SRC, CalibrationOptions(samples=4, seq_len=16), 1000)  # whole layers, 1 kB of hidden states in RAM


def world(root: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A folder as a user leaves it: calibration and held-out text, a previous pruned output and its report."""
    root.mkdir()
    (root / "calib.txt").write_text(WORDS)
    (root / "heldout.txt").write_text(WORDS[::-1])
    code, _, err = run_cli(["slim", str(SRC), "--keep", "4", "--out", str(root / "out"), "--criterion",
                            "router-norm", "--no-validate"], capsys)  # fmt: skip
    assert code == 0, err
    (root / "report.json").write_text('{"previous": true}\n')
    return root


COMMANDS = {
    "slim": lambda w: ["slim", str(SRC), "--keep", "4", "--out", str(w / "out"), "--overwrite", "--criterion", "ean",
                       "--calib", str(w / "calib.txt"), *SMALL],
    "calibrate": lambda w: ["calibrate", str(SRC), "--out", str(w / "stats"), "--calib", str(w / "calib.txt"), *SMALL,
                            "--max-memory", SPILL],
    "validate": lambda w: ["validate", str(SRC), str(w / "out"), "--calib", str(w / "heldout.txt"), *SMALL,
                           "--generations", "0", "--json", str(w / "report.json")],
}  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_every_write_failed_in_turn(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w = world(tmp_path / "w", capsys)
    injector = Injector(w)
    with injecting(injector):
        code, _, err = run_cli(COMMANDS[command](w), capsys)
    assert code == 0, err
    recorded, cases = injector.ops, sites(injector)
    done = snapshot(w)  # what the undisturbed run leaves
    shutil.rmtree(w)
    world(w, capsys)  # the same folder again, so that every path written is the same
    failures = []
    for case, n in enumerate(cases):
        fault = FAULTS[case % len(FAULTS)]
        before = snapshot(w)
        injector.arm(n, fault)
        with injecting(injector):
            code, _, err = run_cli(COMMANDS[command](w), capsys)
        assert injector.fired == recorded[n], (n, injector.fired, recorded[n])  # the same run, to the same write
        try:
            outcome = _check(command, w, code, err, fault, before, done, capsys)
        except AssertionError as e:
            failures.append(f"write {n} {recorded[n]} failed with {fault_name(fault)}: {e}")
            outcome = "FAILED"
        record(fault_name(fault), command, outcome)
    assert not failures, "\n".join(failures)


def _check(command: str, w: Path, code: int, err: str, fault: Any, before: tuple, done: tuple,
           capsys: pytest.CaptureFixture[str]) -> str:  # fmt: skip
    if code == 0:  # the failed write had a fallback (copy_file_range → read and write): the run completed
        assert snapshot(w) == done
        return "completed"
    one_line(code, err, fault)
    said = "stopped" if code != 2 else "refused in one line"
    if command != "calibrate":  # the previous output and report intact (or the new one whole); nothing left
        return f"{said}, {old_or_new(w, before, done)}"
    assert leftovers(w) == []  # statistics so far stay, to resume from: nothing half-written among them
    assert {p.name for p in w.iterdir()} <= {*before[1], "stats"}  # nothing else was made
    again, _, err = run_cli(COMMANDS[command](w), capsys)  # the same command, once space is back: it resumes
    assert again == 0, err
    assert snapshot(w) == done  # statistics equal to an undisturbed run's, bit for bit; no resume files left
    shutil.rmtree(w / "stats")
    return f"{said}, then resumed"


README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
CLASSES = ["ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "EBUSY", "ETXTBSY", "EXDEV", "ENAMETOOLONG",
           "ELOOP", "EMFILE", "ENFILE", "EIO"]  # the README's list of errors said in one line with exit code 2  # fmt: skip


def _data_free(folder: Path) -> list[str]:
    return ["slim", str(SRC), "--keep", "4", "--out", str(folder / "out"), "--criterion", "router-norm",
            "--no-validate"]  # fmt: skip


@pytest.fixture(scope="module")
def shard_write(tmp_path_factory: pytest.TempPathFactory) -> int:
    """The number of the write that opens the output's shard, in a data-free slim."""
    from moeslim.cli import main

    folder = tmp_path_factory.mktemp("record")
    injector = Injector(folder)
    quiet = io.StringIO()
    argv = mock.patch.object(sys, "argv", ["moeslim", *_data_free(folder)])
    with injecting(injector), argv, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        main()  # returns on success
    return injector.ops.index(("open", "/.out.R.moeslim-tmp/model.safetensors"))


@pytest.mark.parametrize("name", [*CLASSES, "ESTALE", "ENOTDIR"])
def test_the_exit_code_table_is_true_for_each_error_class(name: str, shard_write: int, tmp_path: Path,
                                                          capsys) -> None:  # fmt: skip
    """A failed write of the output's shard, with each error number: one line naming the file (a full disk: the
    output it was writing); exit code 2 and what to do for the classes the README lists, exit code 1 and the
    system's text for others."""
    args = _data_free(tmp_path)
    injector = Injector(tmp_path)
    number = getattr(errno, name)
    injector.arm(shard_write, number)
    with injecting(injector):
        code, _, err = run_cli(args, capsys)
    assert injector.fired is not None and err.count("\n") == 1 and err.startswith("moeslim: error: "), err
    assert re.search(rf"model\.safetensors|writing {tmp_path / 'out'};", err) and "Traceback" not in err, err
    listed = re.search(rf"\b{name}\b", README.split("| exit code |")[0].split("### Errors")[1]) is not None
    assert listed == (name in CLASSES)
    assert code == (2 if listed else 1), err
    if listed:
        assert ";" in err and os.strerror(number) not in err, err  # said in moeslim's words, with what to do
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, lock or temp folder
    record(name, "slim", f"exit {code}, one line")
