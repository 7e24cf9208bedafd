"""One memory plan per pass: whole layers or chunks of routed experts, and the hidden states kept in RAM, within one
budget (``--max-memory``, else what the process may allocate). Decisions at hand-computed budgets; a run whose
``--max-memory`` forces chunks equals the whole-layer run; a run under a real ``ulimit -v`` is refused in one line.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from moeslim.layout import resolve_layout
from moeslim.source import open_checkpoint
from moeslim.stream import memory
from moeslim.stream.context import RunContext
from moeslim.stream.memory import (
    BASE_BYTES,
    Budget,
    LayerSplit,
    MemoryPlan,
    States,
    budget,
    is_out_of_memory,
    plan_memory,
    threads_address_space,
)
from moeslim.stream.options import CalibrationOptions
from tests.budgets import chunking
from tests.conftest import run_cli
from tests.test_memory import _huge_layer

ROOT = Path(__file__).resolve().parents[1]
DEEPSEEK = ROOT / "fixtures" / "trained" / "tiny-deepseek-16e"

# A layer of 200 resident bytes and 8 experts of 100 (whole: 1000); with LOAD_FACTOR 2 in use: 400, 200, 2000.
SPLIT = LayerSplit(index=3, whole=1000, resident=200, per_expert=100, experts=8)
STATES = States(total=300, batch=50)  # working batches: 2 × 50 = 100


@pytest.fixture(autouse=True)
def _no_forced_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOESLIM_EXPERT_CHUNK", raising=False)


@pytest.fixture
def factor2(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hand-computed numbers are worked out with a load factor of 2, whatever the measured one is now."""
    monkeypatch.setattr(memory, "LOAD_FACTOR", 2.0)


@pytest.mark.parametrize(
    ("room", "plan"),
    [
        (2400, MemoryPlan(None, 300)),  # 2000 layer + 100 working + 300 states: whole layers, nothing spills
        (2100, MemoryPlan(None, 0)),  # 2000 + 100: whole layers, every batch spills
        # chunks: 400 resident + 100 working + 2 × 300 recorded = 1100; (2099 - 1100) // 200 = 4 experts
        (2099, MemoryPlan(4, 2099 - 1100 - 4 * 200)),
        (1300, MemoryPlan(1, 0)),  # 1100 + one expert
    ],
)
def test_the_plan_at_hand_computed_budgets(room: int, plan: MemoryPlan, factor2: None) -> None:
    assert plan_memory(SPLIT, STATES, Budget(room), "float32") == plan


def test_a_chunk_is_at_most_chunk_bytes(monkeypatch: pytest.MonkeyPatch, factor2: None) -> None:
    monkeypatch.setattr(memory, "CHUNK_BYTES", 600)  # 600 // 200: 3 experts, though 4 fit in 2099
    assert plan_memory(SPLIT, STATES, Budget(2099), "float32") == MemoryPlan(3, 2099 - 1100 - 3 * 200)


def test_the_embedding_and_head_count_between_the_layers(factor2: None) -> None:
    """An embedding and head of 600 (1200 loaded) beside the chunked layer: 1200 + 100 working + 600 recorded = 1900
    fits 4 experts (400 + 4 × 200 = 1200), no more; under 1900 nothing fits, however few experts a chunk holds."""
    split = replace(SPLIT, outside=600)
    assert plan_memory(split, STATES, Budget(2099), "float32") == MemoryPlan(4, 2099 - 1900)
    assert plan_memory(split, STATES, Budget(1900), "float32") == MemoryPlan(4, 0)
    with pytest.raises(memory.DeviceError, match="^the input embedding or output head needs about 1.9 KB in float32"):
        plan_memory(split, STATES, Budget(1899), "float32")


def test_streams_that_cannot_spill_count_whole(factor2: None) -> None:
    """Validation's two streams stay in RAM: 2000 + 100 + 2 × 300 = 2700 for whole layers; chunked, 400 + 100 +
    600 + 600 recorded = 1700, (2699 - 1700) // 200 = 4 experts. Its plan bounds no store."""
    both = States(total=300, batch=50, streams=2, spill=False)
    assert plan_memory(SPLIT, both, Budget(2700), "float32") == MemoryPlan(None, None)
    assert plan_memory(SPLIT, both, Budget(2699), "float32") == MemoryPlan(4, None)


def test_a_forced_chunk_keeps_working_within_the_budget(monkeypatch: pytest.MonkeyPatch, factor2: None) -> None:
    monkeypatch.setenv("MOESLIM_EXPERT_CHUNK", "2")
    assert plan_memory(SPLIT, STATES, Budget(2400), "float32") == MemoryPlan(2, 2400 - 1100 - 2 * 200)
    assert plan_memory(SPLIT, STATES, Budget(None), "float32") == MemoryPlan(2, None)
    with pytest.raises(memory.DeviceError, match="its routed experts read 2 at a time"):
        plan_memory(SPLIT, STATES, Budget(1499), "float32")  # 1100 + 2 × 200 = 1500


def test_an_unknown_budget_runs_whole_layers_unbounded(factor2: None) -> None:
    assert plan_memory(SPLIT, STATES, Budget(None), "float32") == MemoryPlan(None, None)


def test_a_pass_that_cannot_fit_one_expert_is_refused_with_what_to_pass(factor2: None) -> None:
    """1100 + one expert's 200 = 1300 bytes, and the imports: --max-memory 0.42GB (BASE_BYTES is 419,430,400)."""
    with pytest.raises(memory.DeviceError) as caught:
        plan_memory(SPLIT, STATES, Budget(1299, 1299 + BASE_BYTES), "bfloat16")
    line = str(caught.value)
    assert "\n" not in line
    assert line.startswith("decoder layer 3 needs about 419.4 MB in bfloat16 (its routed experts read one at a"
                           " time: 600 B of weights, 700 B of hidden states"), line  # fmt: skip
    assert line.endswith("--max-memory is 419.4 MB; pass --max-memory 0.42GB or more"), line


def test_max_memory_is_the_whole_process_and_no_more_than_there_is(capsys: pytest.CaptureFixture[str]) -> None:
    assert budget(BASE_BYTES + 5000) == Budget(5000, BASE_BYTES + 5000)
    assert budget(1000) == Budget(0, 1000)  # less than the imports: nothing for the pass
    assert capsys.readouterr().err == ""
    free = memory.available_bytes()
    if free is None:
        pytest.skip("this machine reports no available memory")
    clamped = budget(10**18)
    assert clamped.room is not None and clamped.room <= free  # lowered to what is there, said in one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moeslim: note: --max-memory 1000000.0 TB is more than"), err


@pytest.mark.slow
def test_a_max_memory_that_forces_chunks_gives_the_whole_layer_statistics(tmp_path: Path, capsys) -> None:
    """A bound of 12 of the 16 experts and 1 kB of hidden states (the rest spill) over tiny-deepseek-16e (its
    embedding and head outweigh fewer experts beside the resident part): the plan chunks, and the statistics equal
    the unbounded run's up to the rounding of products over other row counts (1e-5, as in test_expert_chunks.py);
    counts exactly."""
    opts = CalibrationOptions(samples=4, seq_len=16, batch_size=2)
    bound = chunking(DEEPSEEK, opts, 12, 1000)
    ckpt = open_checkpoint(DEEPSEEK)
    assert RunContext(ckpt, resolve_layout(ckpt), replace(opts, max_memory=bound)).plan() == MemoryPlan(12, 1000)
    data = ["--samples", "4", "--seq-len", "16", "--batch-size", "2"]
    runs = {}
    for name, extra in (("whole", []), ("chunked", ["--max-memory", bound])):
        code, _, err = run_cli(["calibrate", str(DEEPSEEK), "--out", str(tmp_path / name), *data, *extra], capsys)
        assert code == 0, err
        runs[name] = load_file(str(tmp_path / name / "stats.safetensors"))
    whole, chunked = runs["whole"], runs["chunked"]
    assert whole.keys() == chunked.keys()
    for key, value in whole.items():
        if value.dtype.kind in "iub":
            assert np.array_equal(value, chunked[key]), key
        else:
            np.testing.assert_allclose(chunked[key], value, rtol=1e-5, atol=1e-9, err_msg=key)


def _import_address_space() -> int:
    """The address space a fresh moeslim process holds once torch and transformers are imported."""
    probe = "import moeslim.cli, moeslim.stream.runner; print(open('/proc/self/statm').read().split()[0])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return int(out) * os.sysconf("SC_PAGE_SIZE")


def _limited(args: list[str], limit: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MOESLIM_EXPERT_CHUNK", None)
    cmd = [sys.executable, "-m", "moeslim", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, preexec_fn=preexec, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_layer_over_a_real_ulimit_is_refused_in_one_line(tmp_path: Path) -> None:
    """Under ``ulimit -v`` of the imports, the threads' reservations and 512 MiB, a layer with one 3 GB expert
    (sparse: no disk used; 3.9 GB once loaded) is refused by the plan in one line before a weight is read: what
    the process may still allocate, as reported, is under the 512 MiB the limit leaves (the machine's free memory
    is not what bound it)."""
    model = _huge_layer(ROOT / "fixtures" / "trained" / "tiny-mixtral-16e", tmp_path / "huge", gigabytes=3)
    limit = _import_address_space() + threads_address_space() + 512 * 2**20
    done = _limited(["calibrate", str(model), "--out", "stats", "--samples", "4", "--seq-len", "16"], limit, tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    m = re.match(r"moeslim: error: decoder layer 0 needs about 3\.\d GB in float32 .* this process may allocate"
                 r" ([\d.]+) (MB|KB|B) more", done.stderr)  # fmt: skip
    assert m, done.stderr
    assert not (tmp_path / "stats" / "stats.json").exists()


@pytest.mark.slow
def test_imports_that_run_out_of_address_space_are_one_line(tmp_path: Path) -> None:
    """Under ``ulimit -v`` of about half what the imports take, torch's libraries cannot be mapped (ImportError)
    or Python cannot allocate (MemoryError): one line, exit code 2, either way."""
    limit = _import_address_space() // 2
    done = _limited(
        ["calibrate", str(DEEPSEEK), "--out", "stats", "--samples", "4", "--seq-len", "16"], limit, tmp_path
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("moeslim: error: out of memory;"), done.stderr


def test_what_fails_under_an_address_space_limit_is_out_of_memory() -> None:
    assert is_out_of_memory(ImportError("libtorch_cpu.so: failed to map segment from shared object"))
    assert is_out_of_memory(RuntimeError("can't start new thread"))
    assert not is_out_of_memory(ImportError("No module named 'torch'"))
