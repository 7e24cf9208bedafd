"""Bytes transferred and peak disk of `moeslim slim REPO_ID` read from the Hub in place, against today's full download.

A synthetic OLMoE-shaped checkpoint (`make_synthetic.py --scale S`, 16 layers of 64 experts, bf16) is served by
the Hub-compatible test server (`tests/hub_server.py`, in this process, on 127.0.0.1), which counts every byte of
file content it sends. For each keep (75 %, 50 %, 25 % of the experts: 48, 32, 16) one run reads it in place
(`--cache-window 3layers`, the default) and one with `--cache-window full` downloads the whole snapshot into the
Hugging Face cache first, as before. Each run is `slim REPO --keep K --criterion router-norm --no-validate`
(a data-free plan: surgery alone) in a fresh interpreter, its own HF_HOME and working folder.

Measured per run: bytes the server sent (small files, headers, weights); the bytes that had to come, computed
from the local copy (the output's source ranges, the router tensors the score reads, each header, the small
files); peak disk, sampled every 2 ms as the blocks of every file under the run's folder (work folder, output
being written, HF cache); the output's size; wall time; peak RSS (`/usr/bin/time -f %M`).

With ``--resume F``, one more run per keep: read in place, killed (SIGKILL) once the server has sent F of the
output's size, then run again; measured is what the rerun downloads (the finished output shards it adopts are
not downloaded again), its CPU seconds and wall time. Its output shards are sized as the source's
(``--max-shard-size`` 5 GB times the scale over 4), so that the output has several, as a real one has.
``--code DIR`` runs the moeslim found in DIR (another checkout, to compare).

Usage: python benchmarks/bench_hub_stream.py [--work DIR] [--scale 0.1] [--keeps 48,32,16] [--resume 0.8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moeslim.inspection import human_bytes  # noqa: E402
from moeslim.layout import resolve_layout  # noqa: E402
from moeslim.plan import load_plan  # noqa: E402
from moeslim.remote.spans import merge  # noqa: E402
from moeslim.source import open_checkpoint  # noqa: E402
from moeslim.surgery.mapping import plan_outputs  # noqa: E402
from tests.hub_server import Fault, HubServer, folder_files  # noqa: E402

REPO = "bench/olmoe"


def disk_use(folder: Path) -> int:
    """Bytes of the disk blocks taken by every regular file under ``folder`` (sparse files count what they hold)."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                total += st.st_blocks * 512 if not os.path.islink(os.path.join(dirpath, name)) else 0
    return total


def hub_env(server: HubServer, folder: Path, code: Path = ROOT) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=server.url, HF_HOME=str(folder / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
               PYTHONPATH=str(code))  # fmt: skip
    return env


def run_slim(server: HubServer, folder: Path, args: list[str], *, fresh: bool = True, code: Path = ROOT) -> dict:
    """One slim in a fresh interpreter under ``folder`` (emptied first when ``fresh``); what it took."""
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    env = hub_env(server, folder, code)
    sent_before = len(server.state.sent)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], disk_use(folder))
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    rss = folder / "rss.txt"  # /usr/bin/time: this process's own size (the served repo) is not carried into it
    command = ["/usr/bin/time", "-f", "%M %U %S", "-o", str(rss), sys.executable, "-m", "moeslim", "slim", REPO, *args]
    proc = subprocess.Popen([*command, "--out", "out"], env=env, cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    _, status, _ = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()  # type: ignore[union-attr]
    if status != 0:
        raise SystemExit(f"slim failed ({status}): {err}")
    with server.state.lock:
        sent_now = [s for s in server.state.sent[sent_before:] if s.repo_id == REPO]
    sent = sum(s.count for s in sent_now)
    by_file: dict[str, list[tuple[int, int]]] = {}
    for s in sent_now:
        by_file.setdefault(s.path, []).append((s.start, s.start + s.count))
    twice = sent - sum(e - s for spans in by_file.values() for s, e in merge(spans))
    output = sum(p.stat().st_size for p in (folder / "out").iterdir() if p.is_file())
    kib, user, system = rss.read_text().split()[-3:]
    return {"sent": sent, "sent_twice": twice, "peak_disk": peak[0], "output": output, "seconds": seconds,
            "cpu_s": float(user) + float(system), "rss_mib": int(kib) / 1024, "note": out.splitlines()[0],
            "reused": [line for line in err.splitlines() if "reused" in line]}  # fmt: skip


def run_killed_then_again(server: HubServer, folder: Path, args: list[str], kill_at: int, code: Path) -> dict:
    """A slim killed (SIGKILL) once the server has sent ``kill_at`` bytes of the repo's shards, then the same
    command again in the same folder: what the rerun took."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    before = len(server.state.sent)
    proc = subprocess.Popen([sys.executable, "-m", "moeslim", "slim", REPO, *args, "--out", "out"],
                            env=hub_env(server, folder, code), cwd=folder, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip

    def kill(repo: str, path: str, start: int, end: int) -> Fault | None:  # under the state's lock
        if repo != REPO or sum(s.count for s in server.state.sent[before:] if s.repo_id == REPO) < kill_at:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        return Fault(status=503)

    server.state.faults.append(kill)
    try:
        proc.wait()
    finally:
        server.state.faults.remove(kill)
    first = server.state.served(REPO, before)
    result = run_slim(server, folder, args, fresh=False, code=code)
    return {**result, "killed_after": first}


def expected_bytes(source: Path, plan_file: Path, small: int) -> int:
    """What a data-free in-place run must download: output ranges, router tensors whole, headers, small files."""
    ckpt = open_checkpoint(source)
    layout = resolve_layout(ckpt)
    spans: dict[str, list[tuple[int, int]]] = {}
    for shard in ckpt.shards:
        spans[shard] = [(0, 8 + int.from_bytes((source / shard).read_bytes()[:8], "little"))]
    for tensor in plan_outputs(ckpt, layout, load_plan(plan_file).kept):
        for file, start, end in tensor.pieces:
            spans[file.name].append((start, end))
    for layer in layout.layers:
        info = ckpt.tensors[layer.block + layout.family.router_weight]
        spans[info.file.name].append((info.start, info.end))
    return small + sum(e - s for ranges in spans.values() for s, e in merge(ranges))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-hub-stream"))
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--keeps", default="48,32,16")
    parser.add_argument("--resume", type=float, default=None, help="also kill a run at this fraction and rerun it")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose moeslim runs")
    parser.add_argument("--windows", default="3layers,full")
    a = parser.parse_args()
    source = a.work / f"src-{a.scale}"
    if not (source / ".synthetic-complete").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_synthetic.py"), str(source), "--scale",
                        str(a.scale), "--shard-bytes", str(int(5e9 * a.scale / 4))], check=True)  # fmt: skip
    files = {k: v for k, v in folder_files(source).items() if not k.startswith(".")}
    small = sum(len(v) for k, v in files.items() if not k.endswith(".safetensors"))
    total = sum(len(v) for v in files.values())
    server = HubServer().start()
    server.state.add_repo(REPO, files)
    rows: list[dict] = []
    resumed: list[dict] = []
    try:
        for keep in [int(k) for k in a.keeps.split(",")]:
            args = ["--keep", str(keep), "--criterion", "router-norm", "--no-validate"]
            for window in a.windows.split(","):
                result = run_slim(server, a.work / f"run-{keep}-{window}", [*args, "--cache-window", window],
                                  code=a.code)  # fmt: skip
                plan_file = a.work / f"run-{keep}-{window}" / "out" / "moeslim_plan.json"
                result.update(keep=keep, window=window, expected=expected_bytes(source, plan_file, small))
                rows.append(result)
                print(json.dumps(result), flush=True)
            if a.resume is not None:
                output, shard = rows[-1]["output"], str(int(5e9 * a.scale / 4))  # output shards sized as the source's
                again = run_killed_then_again(server, a.work / f"run-{keep}-killed", [*args, "--max-shard-size", shard],
                                              int(a.resume * output), a.code)  # fmt: skip
                again.update(keep=keep, window="3layers, rerun after a kill", expected=0)
                print(json.dumps(again), flush=True)
                resumed.append(again)
    finally:
        server.stop()
    print(f"\nsource: {human_bytes(total)} in {len(files) - 1} files; 64 experts per layer\n")
    print("| keep | --cache-window | bytes sent | of which needed | peak disk | output | wall | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['keep']} ({r['keep'] * 100 // 64} %) | {r['window']} | {human_bytes(r['sent'])}"
              f" ({r['sent'] / total:.1%}) | {human_bytes(r['expected'])} | {human_bytes(r['peak_disk'])}"
              f" | {human_bytes(r['output'])} | {r['seconds']:.1f} s | {r['rss_mib']:.0f} MiB |")  # fmt: skip
    if resumed:
        print("\n| keep | killed after | rerun sent | rerun wall | rerun CPU | peak RSS |\n|---|---|---|---|---|---|")
    for r in resumed:
        print(f"| {r['keep']} ({r['keep'] * 100 // 64} %) | {human_bytes(r['killed_after'])} | {human_bytes(r['sent'])}"
              f" | {r['seconds']:.1f} s | {r['cpu_s']:.1f} s | {r['rss_mib']:.0f} MiB |")  # fmt: skip
    (a.work / "results.json").write_text(json.dumps(rows + resumed, indent=2))


if __name__ == "__main__":
    main()
