"""An interrupted calibration resumes at the layer after its last saved one, from the saved hidden states, and ends
with the statistics of an uninterrupted run.

Runs are interrupted for real: ``run_calibration``'s ``on_layer`` raises once a layer is saved, which stops the
run there, as a kill would between two layers. That the resumed run does only the unfinished layers is shown
two ways: the layers it calibrates, and a checkpoint whose finished layers are overwritten with NaN before
resuming (loading or running any of them would fail, or poison the statistics).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file

from moeslim import jsonio
from moeslim.calibrate.capture import Statistics
from moeslim.calibrate.session import run_calibration
from moeslim.layout import resolve_layout
from moeslim.source import open_checkpoint
from moeslim.stream.context import RunContext
from moeslim.stream.options import CalibrationOptions
from tests.budgets import spilling

pytestmark = pytest.mark.slow

TRAINED = Path(__file__).resolve().parents[1] / "fixtures" / "trained"
MIXTRAL, DEEPSEEK = TRAINED / "tiny-mixtral-16e", TRAINED / "tiny-deepseek-16e"  # MoE 0-3; dense 0, MoE 1-3
OPTS = CalibrationOptions(samples=6, seq_len=16, batch_size=2, reconstruction_tokens=16)  # 3 batches: halves 2 | 1
SPILLING = replace(OPTS, max_memory=spilling(DEEPSEEK, OPTS, 5000))  # whole layers, 5 kB in RAM: batches of 8 kB spill
Chooser = Callable[[int, Statistics], tuple[int, ...]]


class Stop(Exception):
    """Raised from ``on_layer``: the run stops right after that layer is saved."""


def calibrate(
    src: Path, out: Path, opts: CalibrationOptions = OPTS, stop_after: int | None = None,
    progressive: Chooser | None = None,
) -> list[int]:  # fmt: skip
    """Calibrate ``src`` into ``out``, stopping after layer ``stop_after``; the layers this run calibrated."""
    ckpt = open_checkpoint(src)
    calibrated: list[int] = []

    def on_layer(index: int) -> None:
        calibrated.append(index)
        if index == stop_after:
            raise Stop

    try:
        run_calibration(RunContext(ckpt, resolve_layout(ckpt), opts), out, progressive=progressive, on_layer=on_layer)
    except Stop:
        assert stop_after is not None
    return calibrated


def arrays(out: Path) -> dict[str, np.ndarray]:
    return load_file(out / "stats.safetensors")


def assert_same(out: Path, reference: Path) -> None:
    """Every statistics array as in ``reference``, bit for bit (same inputs, same order of operations)."""
    got, want = arrays(out), arrays(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    assert jsonio.loads((out / "stats.json").read_text()) == jsonio.loads((reference / "stats.json").read_text())


def poison_layers_before(model: Path, layer: int) -> None:
    """NaN in every tensor of decoder layers ``0..layer-1`` except the routers (they make the model's fingerprint)."""
    layout = resolve_layout(open_checkpoint(model))
    routers = {name for moe in layout.layers for name in moe.router}
    path = model / "model.safetensors"
    tensors = load_torch(path)
    for name in tensors:
        if name not in routers and any(name.startswith(f"model.layers.{i}.") for i in range(layer)):
            tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs: the references."""
    root = tmp_path_factory.mktemp("full")
    runs = {
        "mixtral": (MIXTRAL, OPTS, None), "deepseek": (DEEPSEEK, SPILLING, None),
        "progressive": (MIXTRAL, OPTS, keep_most_routed),
    }  # fmt: skip
    for name, (src, opts, progressive) in runs.items():
        moe = [1, 2, 3] if src == DEEPSEEK else [0, 1, 2, 3]
        assert calibrate(src, root / name, opts, progressive=progressive) == moe
        assert not (root / name / "resume").exists()
    return {name: root / name for name in runs}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Runs on the Mixtral fixture stopped after layer 1 and after layer 2 (tests work on copies)."""
    root = tmp_path_factory.mktemp("interrupted")
    for stop_after in (1, 2):
        assert calibrate(MIXTRAL, root / str(stop_after), stop_after=stop_after) == list(range(stop_after + 1))
    return {stop_after: root / str(stop_after) for stop_after in (1, 2)}


def keep_most_routed(index: int, stats: Statistics) -> tuple[int, ...]:
    """A progressive chooser: the 8 experts of 16 chosen most often."""
    return tuple(sorted(np.argsort(-stats.total(index)["count"], kind="stable")[:8].tolist()))


@pytest.mark.parametrize(("name", "stop_after"), [("mixtral", 0), ("mixtral", 2), ("deepseek", 2)])
def test_resumed_run_does_only_the_unfinished_layers(
    full: dict[str, Path], name: str, stop_after: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, opts = (DEEPSEEK, SPILLING) if name == "deepseek" else (MIXTRAL, OPTS)
    model = Path(shutil.copytree(src, tmp_path / src.name))  # same name: same stats.json
    out = tmp_path / "stats"
    done = calibrate(model, out, opts, stop_after=stop_after)
    boundary = jsonio.loads((out / "resume" / "boundary.json").read_text())
    assert boundary["next_layer"] == stop_after + 1 and boundary["layers_done"] == done
    assert jsonio.loads((out / "stats.json").read_text())["layers_done"] == done

    poison_layers_before(model, stop_after + 1)
    capsys.readouterr()
    assert calibrate(model, out, opts) == list(range(stop_after + 1, 4))
    err = capsys.readouterr().err
    finished = "layer 0" if stop_after == 0 else f"layers 0-{stop_after}"
    assert err == f"moeslim: resuming calibration of {out} at layer {stop_after + 1} of 4 ({finished} done)\n"
    assert_same(out, full[name])
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "stats.safetensors"]  # the boundary is gone

    assert calibrate(model, out, opts) == []  # complete: nothing to run, nothing read
    assert_same(out, full[name])


def test_a_kill_between_the_statistics_and_the_boundary_neither_skips_nor_counts_twice(
    full: dict[str, Path], interrupted: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """stats.json is saved before the boundary: a kill between them leaves layer 2's statistics with the
    boundary after layer 1 (and the next boundary half written in resume.tmp). Built from two real
    interrupted runs."""
    killed = Path(shutil.copytree(interrupted[2], tmp_path / "killed", ignore=shutil.ignore_patterns("resume")))
    shutil.copytree(interrupted[1] / "resume", killed / "resume")
    (killed / "resume.tmp").mkdir()
    (killed / "resume.tmp" / "0.safetensors").write_bytes(b"half written")
    capsys.readouterr()
    assert calibrate(MIXTRAL, killed) == [3]  # layer 2 is run from the boundary, not calibrated again
    assert "at layer 2 of 4 (layers 0-1 done)" in capsys.readouterr().err
    assert_same(killed, full["mixtral"])
    assert sorted(p.name for p in killed.iterdir()) == ["stats.json", "stats.safetensors"]


def test_a_boundary_ahead_of_the_statistics_is_not_used(
    full: dict[str, Path], interrupted: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reverse order (a boundary after layer 2, statistics up to layer 1) would skip layer 2: recompute."""
    ahead = Path(shutil.copytree(interrupted[1], tmp_path / "ahead", ignore=shutil.ignore_patterns("resume")))
    shutil.copytree(interrupted[2] / "resume", ahead / "resume")
    capsys.readouterr()
    assert calibrate(MIXTRAL, ahead) == [2, 3]
    err = capsys.readouterr().err.splitlines()
    assert "they follow layer 2, which has no statistics in stats.json" in err[0]
    assert err[0].endswith("computing the finished layers again")
    assert err[1].endswith("2 of 4 MoE layers done, the layers before layer 2 run again to rebuild their hidden states")
    assert_same(ahead, full["mixtral"])


@pytest.mark.parametrize("damage", ["truncated", "missing", "json"])
def test_an_unreadable_boundary_falls_back_to_recomputing(
    full: dict[str, Path], damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "stats"
    calibrate(DEEPSEEK, out, SPILLING, stop_after=2)
    resume = out / "resume"
    if damage == "truncated":
        data = (resume / "1.safetensors").read_bytes()
        (resume / "1.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "missing":
        (resume / "2.safetensors").unlink()
    else:
        (resume / "boundary.json").write_text('{"format": "moeslim.resume", "next_layer": NaN}')
    capsys.readouterr()
    assert calibrate(DEEPSEEK, out, SPILLING) == [3]
    err = capsys.readouterr().err
    assert f"moeslim: note: the saved hidden states in {resume} are unusable (" in err and "Traceback" not in err
    assert_same(out, full["deepseek"])
    assert not resume.exists()


def test_progressive_resumes_from_the_masked_hidden_states(full: dict[str, Path], tmp_path: Path) -> None:
    """The boundary holds the output of the layer routing only to its kept experts: a boundary saved before the
    masked forward would change the statistics of every later layer."""
    out = tmp_path / "stats"
    assert calibrate(MIXTRAL, out, stop_after=1, progressive=keep_most_routed) == [0, 1]
    assert jsonio.loads((out / "resume" / "boundary.json").read_text())["next_layer"] == 2
    assert calibrate(MIXTRAL, out, progressive=keep_most_routed) == [2, 3]
    assert_same(out, full["progressive"])
    assert not np.array_equal(arrays(out)["layers.3.a.count"], arrays(full["mixtral"])["layers.3.a.count"])
