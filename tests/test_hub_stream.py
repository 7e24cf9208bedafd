"""Hub sources read in place (moeslim/remote/), against the Hub-compatible server (tests/hub_server.py), which
answers range requests as the Hub does and counts every byte of file content it sends.

What is asserted is what the server sent, range by range: a data-free prune receives exactly the small files,
each shard's header and the bytes the output is made of (plus the router rows a router-norm score reads), each
byte once, also through dropped connections and 429/5xx answers; a calibrated one receives each byte at most
once; and the work folder's disk use, sampled while the run goes, stays within the window.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from moeslim.inspection import human_bytes
from moeslim.layout import resolve_layout
from moeslim.plan import load_plan
from moeslim.remote.spans import merge
from moeslim.source import open_checkpoint
from moeslim.surgery.mapping import plan_outputs
from moeslim.validate.run import METRICS
from tests.conftest import run_cli
from tests.hub_server import Account, Fault, HubServer, folder_files
from tests.test_hub import WRITE, Run, _env, _moeslim

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 4096  # the work folder's file system block (ext4, tmpfs); checked in the fixture
Spans = dict[str, list[tuple[int, int]]]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OLMoE-shaped checkpoint (benchmarks/make_synthetic.py): 6 layers of 64 experts, 6 shards, 119 MB."""
    out = tmp_path_factory.mktemp("synthetic") / "olmoe"
    args = [sys.executable, str(ROOT / "benchmarks" / "make_synthetic.py"), str(out), "--scale", "0.02", "--layers",
            "6", "--shard-bytes", "20000000"]  # fmt: skip
    subprocess.run(args, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def hub(built: Callable[[str], Path], synthetic: Path) -> Iterator[HubServer]:
    server = HubServer().start()
    server.state.tokens[WRITE] = Account("alice", orgs=("org",))
    sharded = folder_files(built("qwen3_moe_multishard"))
    for name in (
        "inspected",
        "sharded",
        "router",
        "random2",
        "plan",
        "drops",
        "busy",
        "moved",
        "edited",
        "killed",
        "cached",
    ):
        server.state.add_repo(f"org/{name}", sharded)
    server.state.add_repo("org/tiny", folder_files(built("qwen3_moe")))
    server.state.add_repo("org/synth", folder_files(synthetic))
    assert os.statvfs(ROOT).f_bsize == BLOCK
    yield server
    server.stop()


def _sent(hub: HubServer, repo_id: str, since: int = 0) -> Spans:
    """Byte ranges of each shard the server sent for ``repo_id``, merged; asserts that none was sent twice."""
    spans: Spans = {}
    with hub.state.lock:
        sent = [s for s in hub.state.sent[since:] if s.repo_id == repo_id and s.path.endswith(".safetensors")]
    for s in sent:
        spans.setdefault(s.path, []).append((s.start, s.start + s.count))
    for path, ranges in spans.items():
        assert sum(e - s for s, e in ranges) == sum(e - s for s, e in merge(ranges)), f"bytes of {path} sent twice"
    return {path: merge(ranges) for path, ranges in spans.items()}


def _headers(folder: Path) -> Spans:
    """Each shard's header: the 8-byte length and the JSON it gives the length of."""
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    return {name: [(0, 8 + int.from_bytes((folder / name).read_bytes()[:8], "little"))] for name in shards}


def _output_spans(folder: Path, plan_file: Path, *, router: bool = False) -> Spans:
    """The source ranges the output of ``plan_file`` is made of (the surgery map of the local copy), plus every
    router tensor whole when a router-norm score reads them, plus the headers: all that must be downloaded."""
    ckpt = open_checkpoint(folder)
    layout = resolve_layout(ckpt)
    spans = _headers(folder)
    for tensor in plan_outputs(ckpt, layout, load_plan(plan_file).kept):
        for file, start, end in tensor.pieces:
            spans[file.name].append((start, end))
    if router:
        for layer in layout.layers:
            info = ckpt.tensors[layer.block + layout.family.router_weight]
            spans[info.file.name].append((info.start, info.end))
    return {name: merge(ranges) for name, ranges in spans.items()}


def _same_weights(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.suffix == ".safetensors" or p.name.endswith("index.json"))
    assert names and names == sorted(p.name for p in b.iterdir() if p.name in names)
    for name in [*names, "config.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _local_twin(folder: Path, plan_file: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    code, _, err = run_cli(["slim", str(folder), "--plan", str(plan_file), "--out", str(out), "--no-validate"], capsys)
    assert code == 0, err
    return out


@pytest.mark.hub
def test_inspect_reads_only_the_headers(hub: HubServer, built: Callable[[str], Path], tmp_path: Path, capsys) -> None:
    since = len(hub.state.sent)
    run = _moeslim(["inspect", "org/inspected", "--keep", "4", "--json"], _env(hub, tmp_path / "hf"), tmp_path)
    assert run.code == 0, run.err
    assert _sent(hub, "org/inspected", since) == _headers(built("qwen3_moe_multishard"))
    ranges = [s for s in hub.state.sent[since:] if s.repo_id == "org/inspected" and s.path.endswith(".safetensors")]
    assert len(ranges) == 2 * 7  # the length, then the header: two requests per shard
    code, local, err = run_cli(["inspect", str(built("qwen3_moe_multishard")), "--keep", "4", "--json"], capsys)
    assert code == 0 and json.loads(local) == json.loads(run.out)  # the exact pruned size, before any weight moved
    assert list(tmp_path.iterdir()) == [tmp_path / "hf"]  # nothing left behind


# Data-free runs: (repo, extra arguments, whether the score reads every router tensor whole)
DATA_FREE = {
    "router-norm keep 4": ("org/router", ["--keep", "4", "--criterion", "router-norm"], True),
    "random keep 6": ("org/sharded", ["--keep", "6", "--criterion", "random", "--seed", "1"], False),
    "random keep 2": ("org/random2", ["--keep", "2", "--criterion", "random", "--seed", "2"], False),
    "dropped connections": ("org/drops", ["--keep", "4", "--criterion", "random", "--seed", "3"], False),
    "429 and 503": ("org/busy", ["--keep", "4", "--criterion", "random", "--seed", "4"], False),
}


@pytest.fixture(scope="module")
def data_free(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Run, Path]]:
    """Every data-free case at once (each run is a fresh interpreter), with its faults armed."""
    counts = {"org/drops": 0, "org/busy": 0}

    def faults(repo_id: str, path: str, start: int, end: int) -> Fault | None:
        if repo_id not in counts or start == 0:  # headers pass
            return None
        counts[repo_id] += 1
        if repo_id == "org/drops" and counts[repo_id] % 3 == 1 and end > start:
            return Fault(cut_after=(end - start + 1) // 2)  # half the range, then the connection drops
        if repo_id == "org/busy" and counts[repo_id] % 4 in (1, 2):
            return Fault(status=429 if counts[repo_id] % 4 == 1 else 503)
        return None

    hub.state.faults.append(faults)

    def run(case: str) -> tuple[Run, Path]:
        repo_id, args, _ = DATA_FREE[case]
        cwd = tmp_path_factory.mktemp("data-free")
        return _moeslim(["slim", repo_id, *args, "--out", "o", "--no-validate"], _env(hub, cwd / "hf"), cwd), cwd

    with ThreadPoolExecutor(len(DATA_FREE)) as pool:
        done = dict(zip(DATA_FREE, pool.map(run, DATA_FREE), strict=True))
    hub.state.faults.remove(faults)
    assert counts["org/drops"] > 3 and counts["org/busy"] > 3  # the faults did happen
    return done


@pytest.mark.hub
@pytest.mark.parametrize("case", DATA_FREE)
def test_data_free_downloads_exactly_the_kept_bytes(
    case: str, data_free: dict, hub: HubServer, built: Callable[[str], Path], capsys
) -> None:
    run, cwd = data_free[case]
    assert run.code == 0, run.err
    repo_id, _, router = DATA_FREE[case]
    folder = built("qwen3_moe_multishard")
    assert _sent(hub, repo_id) == _output_spans(folder, cwd / "o" / "moeslim_plan.json", router=router)
    small = {p for p in hub.state.files(repo_id) if not p.endswith(".safetensors") and p != ".gitattributes"}
    assert sorted(hub.state.downloads(repo_id)) == sorted(small)  # the small files whole, once
    assert [p.name for p in cwd.iterdir() if p.name != "hf"] == ["o"]  # the work folder is gone
    _same_weights(cwd / "o", _local_twin(folder, cwd / "o" / "moeslim_plan.json", cwd / "local", capsys))


@pytest.mark.hub
def test_a_plan_downloads_the_kept_bytes_once(hub: HubServer, built: Callable[[str], Path], tmp_path, capsys) -> None:
    folder = built("qwen3_moe_multishard")
    plan_file = _local_twin(folder, _plan(folder, tmp_path, capsys), tmp_path / "local", capsys) / "moeslim_plan.json"
    run = _moeslim(["slim", "org/plan", "--plan", str(plan_file), "--out", "o", "--no-validate"],
                   _env(hub, tmp_path / "hf"), tmp_path)  # fmt: skip
    assert run.code == 0, run.err
    assert _sent(hub, "org/plan") == _output_spans(folder, plan_file)
    _same_weights(tmp_path / "o", tmp_path / "local")


def _plan(folder: Path, tmp_path: Path, capsys) -> Path:
    """A weight-norm plan keeping 3, made locally: a plan no data-free criterion run above chose."""
    code, _, err = run_cli(["slim", str(folder), "--keep", "3", "--criterion", "weight-norm", "--out",
                            str(tmp_path / "planned"), "--no-validate"], capsys)  # fmt: skip
    assert code == 0, err
    return tmp_path / "planned" / "moeslim_plan.json"


@pytest.mark.hub
@pytest.mark.parametrize(
    "how",
    [
        ["--criterion", "ean", "--no-correct", "--no-validate"],  # the calibration alone
        ["--criterion", "ean"],  # its correction and validation too: both take the source from the same pass
        [],  # the default (auto's trials, the correction, validation)
    ],
)
def test_calibrated_run_downloads_each_byte_at_most_once(
    how: list[str], hub: HubServer, built, tmp_path: Path, capsys
) -> None:
    args = ["slim", "org/tiny", "--keep", "4", *how, "--out", "o", "--cache-window", "2layers"]
    with hub.state.lock:
        since = len(hub.state.sent)  # the server serves org/tiny to every case of this module
    run = _moeslim(args, _env(hub, tmp_path / "hf"), tmp_path)
    assert run.code == 0, run.err
    folder = built("qwen3_moe")
    whole = {p.name: [(0, p.stat().st_size)] for p in folder.glob("*.safetensors")}
    assert _window(folder, 2) < whole["model.safetensors"][0][1]  # the window alone could not hold the source
    assert _sent(hub, "org/tiny", since) == whole  # every byte read by calibration, none twice (checked in _sent)
    code, _, err = run_cli(["slim", str(folder), "--keep", "4", *how, "--out", str(tmp_path / "local")], capsys)
    assert code == 0, err
    _same_weights(tmp_path / "o", tmp_path / "local")
    if "--no-validate" not in how:  # the same validation as from the folder
        a, b = (json.loads((tmp_path / f / "validation.json").read_text()) for f in ("o", "local"))
        assert "kl_mean" in a, a["summary"]
        assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}


def _window(folder: Path, layers: int) -> int:
    """``layers`` times the disk taken by the largest decoder layer or by all tensors outside the layers together,
    in whole blocks (what --cache-window Nlayers means)."""
    ckpt = open_checkpoint(folder)
    blocks: dict[str, set[tuple[str, int]]] = {}  # layer → the (file, block number) its tensors touch
    for name, info in ckpt.tensors.items():
        parts = name.split(".")
        key = ".".join(parts[: parts.index("layers") + 2]) if "layers" in parts else ""
        touched = range(info.start // BLOCK, (info.end - 1) // BLOCK + 1) if info.end > info.start else ()
        blocks.setdefault(key, set()).update((info.file.name, b) for b in touched)
    return layers * BLOCK * max(len(b) for b in blocks.values())


@pytest.mark.hub
def test_disk_use_stays_within_the_window(hub: HubServer, synthetic: Path, tmp_path: Path) -> None:
    """Sampled every millisecond and at every range request: the blocks the work folder's shards take."""
    work = tmp_path / ".org--synth.moeslim-source"
    peak = [0]

    def measure(*_: object) -> None:
        used = sum(p.stat().st_blocks * 512 for p in work.rglob("*.safetensors") if p.is_file() and not p.is_symlink())
        peak[0] = max(peak[0], used)

    def sample() -> None:
        while not stopped.is_set():
            with contextlib.suppress(OSError):  # a file appearing or the folder going away under the walk
                measure()
            stopped.wait(0.001)

    stopped = threading.Event()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    hub.state.faults.append(lambda *a: measure() or None)
    try:
        args = ["slim", "org/synth", "--keep", "16", "--criterion", "router-norm", "--no-validate", "--out", "o",
                "--cache-window", "2layers"]  # fmt: skip
        run = _moeslim(args, _env(hub, tmp_path / "hf"), tmp_path)
    finally:
        stopped.set()
        sampler.join()
        hub.state.faults.pop()
    assert run.code == 0, run.err
    headers = sum(-(-end // BLOCK) * BLOCK for spans in _headers(synthetic).values() for _, end in spans)
    window = _window(synthetic, 2)
    assert 0 < peak[0] <= window + headers, (peak[0], window, headers)
    assert f"plus at most {human_bytes(window)} of source at a time" in run.out.splitlines()[0]  # said up front
    total = sum(p.stat().st_size for p in synthetic.glob("*.safetensors"))
    assert window < total / 2  # the bound means something: under half the source
    plan_file = tmp_path / "o" / "moeslim_plan.json"
    assert _sent(hub, "org/synth") == _output_spans(synthetic, plan_file, router=True)


def refused_as_changed_during_the_run(hub: HubServer, repo_id: str, how: str, env: dict[str, str], cwd: Path) -> None:
    """Change ``repo_id`` on ``hub`` mid-run (at its third range request past the headers, after some weights):
    force-push a new commit, or edit a file's bytes under the same commit, which only the ETag tells. The run
    must refuse in one line and leave nothing in ``cwd`` but the Hub cache ``hf``."""
    files = dict(hub.state.files(repo_id))
    calls = [0]

    def change(repo: str, path: str, start: int, end: int) -> None:
        if repo != repo_id or start == 0:
            return
        calls[0] += 1
        if calls[0] != 3:
            return
        if how == "force-pushed":
            hub.state.force_push(repo_id, {**files, "README.md": b"rewritten history\n"})
        else:
            data = bytearray(files[path])
            data[start] ^= 0xFF
            hub.state.files(repo_id)[path] = bytes(data)

    hub.state.faults.append(lambda *a: change(*a))  # type: ignore[func-returns-value]
    try:
        run = _moeslim(["slim", repo_id, "--keep", "4", "--criterion", "random", "--out", "o", "--no-validate"],
                       env, cwd)  # fmt: skip
    finally:
        hub.state.faults.pop()
    assert calls[0] >= 3
    assert run.code == 2, run
    assert (
        run.err.startswith(f"moeslim: error: {repo_id} changed on the Hub during the run") and run.err.count("\n") == 1
    ), run.err
    assert [p.name for p in cwd.iterdir()] == ["hf"]  # no output, no work folder


@pytest.mark.hub
@pytest.mark.parametrize("how", ["force-pushed", "file edited"])
def test_a_source_changed_during_the_run_is_refused(how: str, hub: HubServer, tmp_path: Path) -> None:
    repo_id = "org/moved" if how == "force-pushed" else "org/edited"
    refused_as_changed_during_the_run(hub, repo_id, how, _env(hub, tmp_path / "hf"), tmp_path)


@pytest.mark.hub
def test_a_killed_run_resumes_without_downloading_again(hub: HubServer, built, tmp_path: Path, capsys) -> None:
    """SIGKILL mid-surgery; the rerun downloads none of the bytes the work folder's journal held at the kill."""
    args = ["slim", "org/killed", "--keep", "6", "--criterion", "random", "--seed", "5", "--out", "o",
            "--no-validate", "--cache-window", "2layers"]  # fmt: skip
    env = _env(hub, tmp_path / "hf")
    proc = subprocess.Popen([sys.executable, "-m", "moeslim", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def kill(repo: str, path: str, start: int, end: int) -> Fault | None:
        header = 8 + int.from_bytes(hub.state.files(repo)[path][:8], "little") if repo == "org/killed" else 0
        if path != "model-00007-of-00007.safetensors" or start < header:  # surgery has copied shards 1 to 6
            return None
        os.kill(proc.pid, signal.SIGKILL)
        return Fault(status=503)

    hub.state.faults.append(kill)
    try:
        proc.communicate(timeout=300)
    finally:
        hub.state.faults.remove(kill)
    assert proc.returncode == -signal.SIGKILL
    journal = json.loads((tmp_path / ".org--killed.moeslim-source" / "ranges.json").read_text())
    weights = {name: [(s, e) for s, e in spans] for name, spans in journal["have"].items()}
    assert sum(e - s for spans in weights.values() for s, e in spans) > 0, journal  # weights were held at the kill
    held = {name: merge([(0, journal["headers"][name]), *spans]) for name, spans in weights.items()}
    since = len(hub.state.sent)
    run = _moeslim(args, env, tmp_path)
    assert run.code == 0, run.err
    for name, spans in _sent(hub, "org/killed", since).items():
        for start, end in spans:
            assert not [(s, e) for s, e in held.get(name, []) if s < end and start < e], (name, start, end)
    assert [p.name for p in tmp_path.iterdir() if p.name != "hf"] == ["o"]  # the killed run's leftovers are gone
    _same_weights(
        tmp_path / "o",
        _local_twin(
            built("qwen3_moe_multishard"),
            tmp_path / "o" / "moeslim_plan.json",
            tmp_path.parent / f"{tmp_path.name}-local",
            capsys,
        ),
    )


@pytest.mark.hub
def test_shards_in_the_cache_are_read_from_it(hub: HubServer, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    first = ["slim", "org/cached", "--keep", "4", "--criterion", "random", "--out", "a", "--no-validate",
             "--cache-window", "full"]  # fmt: skip
    assert _moeslim(first, _env(hub, home), tmp_path).code == 0
    since = len(hub.state.sent)
    run = _moeslim(["slim", "org/cached", "--keep", "4", "--criterion", "random", "--out", "b", "--no-validate"],
                   _env(hub, home), tmp_path)  # fmt: skip
    assert run.code == 0, run.err
    assert _sent(hub, "org/cached", since) == {}  # not one range request
    _same_weights(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("window", ["bogus", "0.5layers", "0", "-1GB"])
def test_bad_cache_window_is_one_line(window: str, built, tmp_path: Path, capsys) -> None:
    args = ["slim", str(built("qwen3_moe")), "--keep", "4", "--out", str(tmp_path / "o"), "--cache-window", window]
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    hint = "pass a number of layers (3layers), a size (40GB) or full"
    assert err == f"moeslim: error: --cache-window {window!r} is not a window: {hint}\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.hub
def test_a_window_under_two_layers_is_refused_before_weights_move(hub: HubServer, built, tmp_path: Path) -> None:
    since = len(hub.state.sent)
    run = _moeslim(["slim", "org/tiny", "--keep", "4", "--out", "o", "--cache-window", "1layers"],
                   _env(hub, tmp_path / "hf", WRITE), tmp_path)  # fmt: skip
    assert run.code == 2 and "--cache-window 1layers holds less than the 2 layers read at once" in run.err, run
    assert run.err.count("\n") == 1
    assert _sent(hub, "org/tiny", since) == _headers(built("qwen3_moe"))  # the headers alone
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no work folder left: nothing to resume


@pytest.mark.hub
def test_calibrate_and_validate_read_in_place_as_from_a_folder(
    hub: HubServer, built: Callable[[str], Path], tmp_path: Path, capsys
) -> None:
    """The statistics (its model fingerprint hashes the router bytes) and the validation metrics of a Hub source
    read in place are those of the same checkpoint in a folder."""
    folder, env = built("qwen3_moe"), _env(hub, tmp_path / "hf")
    calibrate = ["--samples", "8", "--seq-len", "32", "--cache-window", "2layers"]
    assert _moeslim(["calibrate", "org/tiny", "--out", "hub-stats", *calibrate], env, tmp_path).code == 0
    code, _, err = run_cli(["calibrate", str(folder), "--out", str(tmp_path / "local-stats"), *calibrate[:4]], capsys)
    assert code == 0, err
    hub_stats, local_stats = tmp_path / "hub-stats", tmp_path / "local-stats"
    assert (hub_stats / "stats.safetensors").read_bytes() == (local_stats / "stats.safetensors").read_bytes()
    meta = [json.loads((f / "stats.json").read_text())["model"] for f in (hub_stats, local_stats)]
    assert meta[0]["fingerprint"] == meta[1]["fingerprint"]

    pruned = tmp_path / "pruned"
    code, _, err = run_cli(["slim", str(folder), "--keep", "4", "--criterion", "random", "--out", str(pruned),
                            "--no-validate"], capsys)  # fmt: skip
    assert code == 0, err
    check = ["--samples", "4", "--seq-len", "32", "--generations", "0"]
    run = _moeslim(["validate", "org/tiny", str(pruned), *check, "--json", "hub.json"], env, tmp_path)
    assert run.code == 0, run.err
    code, _, err = run_cli(["validate", str(folder), str(pruned), *check, "--json", str(tmp_path / "local.json")],
                           capsys)  # fmt: skip
    assert code == 0, err
    reports = [json.loads((tmp_path / name).read_text()) for name in ("hub.json", "local.json")]
    assert reports[0]["original"] == "org/tiny"
    assert {k: v for k, v in reports[0].items() if k != "original"} == {
        k: v for k, v in reports[1].items() if k != "original"
    }
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no work folder left
