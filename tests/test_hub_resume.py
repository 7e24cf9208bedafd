"""A killed ``slim REPO`` rerun adopts the output shards the killed run had finished (surgery/finished.py), so
their bytes are not downloaded again; a shard changed since, or of another plan, is written anew.

Each case stops a run (SIGKILL, SIGTERM, Ctrl-C's SIGINT, or the Hub failing) at the first range request for the
third output shard's bytes, when the first two shards are finished and recorded, then reruns. What is asserted is what the test server sent on the rerun,
range by range, against what the plan's output shards are made of (computed from the local copy), and that the
result is byte for byte the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from moeslim.inspection import human_bytes
from moeslim.layout import resolve_layout
from moeslim.plan import load_plan
from moeslim.remote.spans import merge, missing
from moeslim.source import open_checkpoint
from moeslim.surgery.mapping import plan_outputs
from moeslim.surgery.writer import plan_shards
from moeslim.targets import FINISHED
from moeslim.units import parse_size
from tests.conftest import run_cli
from tests.hub_server import Account, Fault, HubServer, folder_files
from tests.test_hub import WRITE, _env, _moeslim
from tests.test_hub_stream import _same_weights, _sent

SHARD = "40KB"  # the fixture's output (about 180 kB) in five shards
Spans = dict[str, list[tuple[int, int]]]


@pytest.fixture(scope="module")
def hub(built: Callable[[str], Path]) -> Iterator[HubServer]:
    server = HubServer().start()
    server.state.tokens[WRITE] = Account("alice", orgs=("org",))
    for name in ("resumed-SIGKILL", "resumed-SIGTERM", "resumed-SIGINT", "resumed-Hub-failing", "replanned", "twice",
                 "tampered", "link", "hard-link", "open-folder"):  # fmt: skip
        server.state.add_repo(f"org/{name}", folder_files(built("qwen3_moe_multishard")))
    yield server
    server.stop()


def _args(repo_id: str, seed: int) -> list[str]:
    return ["slim", repo_id, "--keep", "6", "--criterion", "random", "--seed", str(seed), "--out", "o",
            "--no-validate", "--cache-window", "2layers", "--max-shard-size", SHARD]  # fmt: skip


def _uninterrupted(
    folder: Path, seed: int, out: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Path, dict[str, Spans]]:
    """The same prune from the local copy, in one go: its output folder, and its shards' source ranges."""
    args = ["slim", str(folder), "--keep", "6", "--criterion", "random", "--seed", str(seed), "--out", str(out),
            "--no-validate", "--max-shard-size", SHARD]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    return out, _shard_spans(folder, out / "moeslim_plan.json")


def _rerun(hub: HubServer, repo_id: str, seed: int, cwd: Path) -> tuple[str, Spans]:
    """Run the prune again, to success: what it said, and the bytes the server sent it."""
    since = len(hub.state.sent)
    run = _moeslim(_args(repo_id, seed), _env(hub, cwd / "hf"), cwd)
    assert run.code == 0, run.err
    return run.err, _sent(hub, repo_id, since)


def _shard_spans(folder: Path, plan_file: Path) -> dict[str, Spans]:
    """Output shard → the source byte ranges (by source shard) it is copied from, as surgery plans them."""
    ckpt = open_checkpoint(folder)
    outputs = plan_outputs(ckpt, resolve_layout(ckpt), load_plan(plan_file).kept)
    spans: dict[str, Spans] = {}
    for shard, tensors in plan_shards(outputs, parse_size(SHARD)).items():
        for tensor in tensors:
            for file, start, end in tensor.pieces:
                spans.setdefault(shard, {}).setdefault(file.name, []).append((start, end))
    return spans


def _union(*parts: Spans) -> Spans:
    spans: Spans = {}
    for part in parts:
        for name, ranges in part.items():
            spans.setdefault(name, []).extend(ranges)
    return {name: merge(ranges) for name, ranges in spans.items()}


def _minus(spans: Spans, held: Spans) -> Spans:
    out = {name: [g for s, e in ranges for g in missing(held.get(name, []), s, e)] for name, ranges in spans.items()}
    return {name: ranges for name, ranges in out.items() if ranges}


def _kill_at_third_shard(
    hub: HubServer, repo_id: str, shards: dict[str, Spans], cwd: Path, how: str = "SIGKILL", index: int = 2
) -> tuple[Spans, Path]:
    """Run the seed-5 prune and stop it at its first range request for bytes of output shard ``index`` (the
    third): by ``how``, a signal sent to it then, or "Hub failing" (every such request answered 503 until it gives
    up). Return the bytes its source work folder's journal holds, and the temp folder with its finished shards
    (the one listing the most, when killed runs before it left others)."""
    env = _env(hub, cwd / "hf")
    proc = subprocess.Popen([sys.executable, "-m", "moeslim", *_args(repo_id, 5)], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    third = list(shards.values())[index]
    signals = [] if how == "Hub failing" else [getattr(signal, how)]

    def kill(repo: str, path: str, start: int, end: int) -> Fault | None:
        if repo != repo_id or not any(s <= end and start < e for s, e in third.get(path, [])):
            return None
        if signals:
            os.kill(proc.pid, signals.pop())
        elif how != "Hub failing":
            return None  # signalled once; the run is stopping
        return Fault(status=503)

    hub.state.faults.append(kill)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        hub.state.faults.remove(kill)
    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:  # stopped or failed in one line, leaving the finished shards for the rerun
        assert proc.returncode not in (0, -signal.SIGKILL) and err.count("\n") == 1, (proc.returncode, err)
    journal = json.loads((cwd / f".{repo_id.replace('/', '--')}.moeslim-source" / "ranges.json").read_text())
    held = {name: merge([(0, journal["headers"][name]), *map(tuple, spans)]) for name, spans in journal["have"].items()}
    temps = [p for p in cwd.glob(".o.*.moeslim-tmp") if (p / FINISHED).exists()]
    return held, max(temps, key=lambda p: len(_finished(p)))


def _reused(shards: dict[str, Spans], names: list[str]) -> str:
    """What a rerun says when it adopts the shards ``names``: the bytes of their tensors."""
    size = sum(e - s for name in names for ranges in shards[name].values() for s, e in ranges)
    return f"moeslim: note: reused {human_bytes(size)} of finished shards from an interrupted run\n"


def _finished(temp: Path) -> list[str]:
    return sorted(json.loads((temp / FINISHED).read_text())["shards"])


def _check_result(cwd: Path, twin: Path) -> None:
    """Byte for byte the uninterrupted run's, with no manifest in it and no leftover beside it."""
    _same_weights(cwd / "o", twin)
    assert sorted(p.name for p in (cwd / "o").iterdir()) == sorted(p.name for p in twin.iterdir())
    assert sorted(p.name for p in cwd.iterdir() if p.name != "hf") == ["o"]


@pytest.mark.hub
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT", "Hub failing"])
def test_a_rerun_adopts_the_finished_shards(how: str, hub: HubServer, built, tmp_path: Path, capsys) -> None:
    twin, shards = _uninterrupted(built("qwen3_moe_multishard"), 5, tmp_path.parent / f"{tmp_path.name}-twin", capsys)
    assert len(shards) >= 4
    repo_id = f"org/resumed-{how.replace(' ', '-')}"
    held, temp = _kill_at_third_shard(hub, repo_id, shards, tmp_path, how)
    names = list(shards)
    assert _finished(temp) == names[:2]
    err, sent = _rerun(hub, repo_id, 5, tmp_path)
    assert _reused(shards, names[:2]) in err
    # exactly the bytes of the shards not finished, less what the journal held: none of the finished shards'
    assert sent == _minus(_union(*[shards[n] for n in names[2:]]), held)
    _check_result(tmp_path, twin)


def _plant(how: str, temp: Path, first: str, aside: Path) -> None:
    """Change the killed run's leftover so that its first finished shard, or all of them, must not be adopted."""
    shard = temp / first
    if how == "tampered":
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0x01  # one bit of the last weight: same size, other sha256
        shard.write_bytes(bytes(data))
    elif how == "link":  # a link to a file of the very bytes recorded: still never followed
        shard.rename(aside)
        shard.symlink_to(aside)
    elif how == "hard link":  # another name through which the adopted output could be changed
        os.link(shard, aside)
    else:  # "open folder": not a private temp folder as a run makes them
        temp.chmod(0o755)


@pytest.mark.hub
@pytest.mark.parametrize("how", ["tampered", "link", "hard link", "open folder"])
def test_a_shard_not_as_recorded_is_written_again(how: str, hub: HubServer, built, tmp_path: Path, capsys) -> None:
    twin, shards = _uninterrupted(built("qwen3_moe_multishard"), 5, tmp_path.parent / f"{tmp_path.name}-twin", capsys)
    repo_id = f"org/{how.replace(' ', '-')}"
    held, temp = _kill_at_third_shard(hub, repo_id, shards, tmp_path)
    names = list(shards)
    aside = tmp_path.parent / f"{tmp_path.name}-aside"
    _plant(how, temp, names[0], aside)
    planted = aside.read_bytes() if aside.exists() else None
    err, sent = _rerun(hub, repo_id, 5, tmp_path)
    rewritten = names[:2] if how == "open folder" else names[:1]  # the intact second one is adopted
    assert ("reused" not in err) if how == "open folder" else (_reused(shards, names[1:2]) in err), err
    assert sent == _minus(_union(*[shards[n] for n in rewritten + names[2:]]), held)
    _check_result(tmp_path, twin)
    if planted is not None:
        assert aside.read_bytes() == planted and not aside.is_symlink()  # what the planted name led to: untouched


@pytest.mark.hub
def test_another_plan_adopts_nothing(hub: HubServer, built, tmp_path: Path, capsys) -> None:
    folder = built("qwen3_moe_multishard")
    _, before = _uninterrupted(folder, 5, tmp_path.parent / f"{tmp_path.name}-5", capsys)
    held, _ = _kill_at_third_shard(hub, "org/replanned", before, tmp_path)
    twin, after = _uninterrupted(folder, 6, tmp_path.parent / f"{tmp_path.name}-6", capsys)
    err, sent = _rerun(hub, "org/replanned", 6, tmp_path)
    assert "reused" not in err
    assert sent == _minus(_union(*after.values()), held)  # every shard made anew
    _check_result(tmp_path, twin)


@pytest.mark.hub
def test_a_rerun_killed_after_adopting_is_resumed_too(hub: HubServer, built, tmp_path: Path, capsys) -> None:
    """Killed at the third shard, then its rerun killed at the fourth: the third run adopts the three finished
    shards from the second run's folder, though the first run's still lists the two it gave up."""
    twin, shards = _uninterrupted(built("qwen3_moe_multishard"), 5, tmp_path.parent / f"{tmp_path.name}-twin", capsys)
    names = list(shards)
    _kill_at_third_shard(hub, "org/twice", shards, tmp_path)
    held, temp = _kill_at_third_shard(hub, "org/twice", shards, tmp_path, index=3)
    assert _finished(temp) == names[:3]
    (first,) = [p for p in tmp_path.glob(".o.*.moeslim-tmp") if (p / FINISHED).exists() and p != temp]
    first.rename(tmp_path / ".o.0.moeslim-tmp")  # looked at first, whatever the random names: it lists two shards
    assert not (tmp_path / ".o.0.moeslim-tmp" / names[0]).exists()  # that it no longer holds
    err, sent = _rerun(hub, "org/twice", 5, tmp_path)
    assert _reused(shards, names[:3]) in err
    assert sent == _minus(_union(*[shards[n] for n in names[3:]]), held)
    _check_result(tmp_path, twin)
