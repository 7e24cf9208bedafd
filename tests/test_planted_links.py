"""Links planted at every name moeslim creates never make it write outside its own files.

A folder shared with other users (where ``--out`` or the statistics folder lies) may hold a link planted under a
name moeslim is about to use. The names are not hand-listed: a first, clean run of ``slim``, ``calibrate`` and
``validate`` records (through Python's audit hooks) every name it creates in the shared folders, and each is
then planted as a link to a victim file (and, for leftover names, to a victim folder) before a second run. After
it: the victims are byte-identical, and the run either succeeded or failed with one line.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli, tree_digest

RANDOM = re.compile(r"\.[0-9a-z_]{8}\.(moeslim-tmp|moeslim-old|moeslim-part)$")
_created: list[str] | None = None  # names written or made while recording


def _audit(event: str, args: tuple) -> None:
    if _created is None:
        return
    if event == "open" and args[0] is not None and isinstance(args[2], int):
        if args[2] & os.O_DIRECTORY:  # a folder whose descriptor names are then opened relative to
            _created.append(os.path.join(os.fsdecode(args[0]), ""))
        elif args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            _created.append(os.fsdecode(args[0]))
    elif event in ("os.mkdir", "tempfile.mkdtemp", "tempfile.mkstemp") or (
        event == "open" and isinstance(args[1], str) and any(c in args[1] for c in "wax+")
    ):
        _created.append(os.fsdecode(args[0]))
    elif event in ("os.rename", "os.replace"):
        _created.append(os.fsdecode(args[1]))


sys.addaudithook(_audit)


def _commands(src: Path, shared: Path) -> list[list[str]]:
    out, stats = shared / "out", shared / "stats"
    return [
        ["slim", str(src), "--keep", "4", "--out", str(out), "--criterion", "router-norm", "--no-validate"],
        ["calibrate", str(src), "--out", str(stats), "--samples", "4", "--seq-len", "16"],
        ["validate", str(src), str(out), "--samples", "4", "--seq-len", "16", "--generations", "0",
         "--json", str(shared / "report.json")],
    ]  # fmt: skip


def _names_created(src: Path, shared: Path, capsys) -> set[tuple[str, str]]:
    """Every name the commands create directly in ``shared`` or in the folders they write (out, stats), as
    ``(folder, name)`` with the folder relative to ``shared``; names with a random part are given as a pattern
    (``<random>``)."""
    global _created
    _created = []
    try:
        for args in _commands(src, shared):
            code, _, err = run_cli(args, capsys)
            assert code == 0, err
    finally:
        seen, _created = _created, None
    folders = {shared: "", shared / "out": "out", shared / "stats": "stats"}
    last = ""
    names = set()
    for raw in seen:
        path = Path(raw)
        if raw.endswith(os.sep):  # a folder opened for its descriptor
            last = folders.get(path, "?")
            continue
        if path.is_absolute():
            if path.parent not in folders:
                continue  # inside a folder moeslim made private (mkdtemp) or elsewhere (the fixtures, caches)
            last = folders[path.parent]
        # a name relative to a folder's descriptor lies in the folder last opened
        names.add((last, RANDOM.sub(r".<random>.\1", path.name)))
    return names


def test_every_name_moeslim_creates_refuses_to_write_through_a_planted_link(built, tmp_path: Path, capsys) -> None:
    src = built("qwen3_moe")
    first = tmp_path / "first"
    first.mkdir()
    names = _names_created(src, first, capsys)
    # what the clean run makes beside and inside its targets (each also seen by the recorder, so the list is real)
    expected = {("", ".out.moeslim-lock"), ("", ".stats.moeslim-lock"), ("out", "validation.json")}
    assert expected | {("stats", "stats.json"), ("stats", "resume")} <= names, names

    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    (victim_dir / "precious.txt").write_text("keep me\n")
    victim = victim_dir / "precious.txt"
    before = tree_digest(victim_dir)
    outcomes = {}
    for rel, name in sorted(names):
        shared = tmp_path / f"shared-{len(outcomes)}"
        shared.mkdir()
        planted = name.replace("<random>", "k3j2h1g0")
        codes, errors = [], []
        for args, folder in zip(_commands(src, shared), ("", "stats", "out"), strict=True):
            where = shared / rel
            if folder == rel and rel and not where.exists():
                where.mkdir()  # the statistics folder of a run killed before its first file
            if where.is_dir() and not os.path.lexists(where / planted):
                os.symlink(victim_dir if "<random>" in name else victim, where / planted)
            code, _, err = run_cli(args, capsys)
            codes.append(code)
            errors.append(err.strip())
            assert code == 0 or (code == 2 and err.count("\n") == 1 and err.startswith("moeslim: error: ")), (
                name, args[0], err,
            )  # fmt: skip
            assert tree_digest(victim_dir) == before, (name, args[0])
        assert victim.read_text() == "keep me\n"
        if name.startswith("."):  # moeslim's own working names: the link is no obstacle
            assert codes == [0, 0, 0], (rel, name, errors)
        outcomes[f"{rel}/{name}"] = codes
    print("\nplanted link → exit codes of slim, calibrate, validate:")
    for name, codes in outcomes.items():
        print(f"  {name:40} {codes}")


def test_a_hard_link_at_the_lock_name_is_not_written(built, tmp_path: Path, capsys) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    os.link(victim, tmp_path / ".out.moeslim-lock")
    code, _, err = run_cli(
        ["slim", str(built("mixtral")), "--keep", "4", "--out", str(tmp_path / "out"), "--criterion", "router-norm",
         "--no-validate"], capsys,
    )  # fmt: skip
    assert code == 0, err
    assert victim.read_text() == "keep me\n"


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_failed_report_write_leaves_the_previous_report(tmp_path: Path, kind: str, monkeypatch) -> None:
    from moeslim.validate import report as report_module

    folder = tmp_path / "pruned"
    folder.mkdir()
    previous = folder / "validation.json"
    previous.write_text('{"kl_mean": 0.1}\n')

    def full_disk(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError):
        report_module.write_report({"kl_mean": 0.2}, folder if kind == "folder" else previous)
    monkeypatch.undo()
    assert previous.read_text() == '{"kl_mean": 0.1}\n'
    assert sorted(p.name for p in folder.iterdir()) == ["validation.json"]  # no half-written file beside it
