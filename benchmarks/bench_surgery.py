"""Time `moeslim slim` against a plain copy of the same bytes, and record its peak RSS.

For each size (a `make_synthetic.py --scale` factor) the synthetic OLMoE checkpoint is generated
under WORK (once; reused later), then, `--repeat` times, alternately:

1. `moeslim slim SRC --keep 32 --criterion router-norm --out OUT --overwrite`  (timed, peak RSS)
2. `cp -r OUT COPY`: the exact bytes slim wrote, copied on the same disk         (timed)

Before each timed run the dirty pages are flushed (`os.sync()`) and the page cache is dropped when
`/proc/sys/vm/drop_caches` is writable (root); otherwise the caches stay warm and the output says so.
After the drop and before a timed slim, an untimed warm-up slim of a tiny separate checkpoint reads the
interpreter, torch and the rest of slim's code back into the cache (`--cold-code` skips it): the data
is read cold, the code warm, as for `cp`, whose binary is tiny.
A run's time is wall-clock from spawn to exit plus the `os.sync()` that follows (so both tools pay
for getting their bytes to disk); the time to exit alone is reported too. Peak RSS is the child's
`ru_maxrss` from `os.wait4` (KiB on Linux); Linux carries the pre-exec high-water mark over exec, so
it includes this (numpy-free, ~17 MB) script's RSS at spawn time: `cp`'s figure shows that floor.
Medians are reported, as a markdown table on stdout and as JSON in `WORK-results.json` next to WORK.
OUT and COPY are deleted after each repeat.

Usage: python benchmarks/bench_surgery.py [--work DIR] [--sizes 0.01,0.1,1] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMPLETE_MARKER = ".synthetic-complete"  # written last by make_synthetic.py (not imported: no numpy here)
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
WARMUP_SCALE = 0.001  # its own folder, so no measured source is warmed by it


@dataclass
class Run:
    seconds: float  # spawn -> exit -> os.sync() done
    exit_seconds: float  # spawn -> exit
    max_rss_kib: int
    cold_cache: bool
    cached_mib_before: int
    busy_before: float  # share of all CPUs busy in the 2 s before the run: others' work skews timings


@dataclass
class SizeResult:
    scale: float
    source_bytes: int
    written_bytes: int = 0
    slim: list[Run] = field(default_factory=list)
    copy: list[Run] = field(default_factory=list)

    def median(self, runs: list[Run], attr: str) -> float:
        return float(statistics.median(getattr(run, attr) for run in runs))

    def summary(self) -> dict[str, float]:
        slim_s, copy_s = self.median(self.slim, "seconds"), self.median(self.copy, "seconds")
        return {
            "source_gb": self.source_bytes / 1e9,
            "written_bytes": self.written_bytes,
            "slim_s": slim_s,
            "copy_s": copy_s,
            "ratio": slim_s / copy_s,
            "slim_exit_s": self.median(self.slim, "exit_seconds"),
            "copy_exit_s": self.median(self.copy, "exit_seconds"),
            "slim_peak_rss_mb": max(run.max_rss_kib for run in self.slim) * 1024 / 1e6,
            "copy_peak_rss_mb": max(run.max_rss_kib for run in self.copy) * 1024 / 1e6,
        }


def cached_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) // 1024
    return -1


def drop_caches() -> bool:
    """Flush dirty pages and try to empty the page cache; True if the cache was dropped."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def spawn_and_wait(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """Run cmd with stdout+stderr to log; return (exit status, seconds to exit, child's ru_maxrss KiB)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    actions = [(os.POSIX_SPAWN_OPEN, 1, str(log), flags, 0o644), (os.POSIX_SPAWN_DUP2, 1, 2)]
    start = time.perf_counter()
    pid = os.posix_spawnp(cmd[0], cmd, dict(os.environ), file_actions=actions)
    _, status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss


def sync_seconds() -> float:
    start = time.perf_counter()
    os.sync()
    return time.perf_counter() - start


def run_checked(cmd: list[str], log: Path) -> tuple[float, int]:
    code, seconds, rss = spawn_and_wait(cmd, log)
    if code != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"command failed ({code}): {shlex.join(cmd)}\n{tail}")
    return seconds, rss


def timed(cmd: list[str], log: Path, args: argparse.Namespace, warmup: list[str] | None = None) -> Run:
    """Flush, maybe drop the page cache, run the untimed warm-up, then time cmd (+ the sync after it)."""
    busy = wait_quiet(args.quiet_cpu, args.quiet_timeout)
    drop = not args.warm
    sync_seconds()
    cold = drop_caches() if drop else False
    if warmup:
        run_checked(warmup, log.with_suffix(".warmup.log"))
    cached = cached_mib()
    exit_seconds, rss = run_checked(cmd, log)
    return Run(exit_seconds + sync_seconds(), exit_seconds, rss, cold, cached, busy)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def moeslim_cmd(spec: str | None) -> list[str]:
    if spec:
        return shlex.split(spec)
    exe = shutil.which("moeslim")
    return [exe] if exe else [sys.executable, "-m", "moeslim"]


def ensure_source(work: Path, scale: float, name: str = "") -> Path:
    src = work / (name or f"src-{scale:g}")
    if not (src / COMPLETE_MARKER).exists():
        print(f"generating {src} (scale {scale:g}) ...", flush=True)
        cmd = [sys.executable, str(HERE / "make_synthetic.py"), str(src), "--scale", str(scale)]
        code, seconds, _ = spawn_and_wait(cmd, work / f"generate-{scale:g}.log")
        if code != 0:
            raise SystemExit(f"generation failed: {shlex.join(cmd)} (see {work})")
        print(f"  generated in {seconds:.1f} s", flush=True)
    return src


def remove(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def slim_cmd(args: argparse.Namespace, src: Path, out: Path) -> list[str]:
    cmd = [*moeslim_cmd(args.moeslim), "slim", str(src), "--keep", str(args.keep), "--no-validate"]
    return [*cmd, "--criterion", args.criterion, "--out", str(out), "--overwrite"]


def warmup_cmd(work: Path, args: argparse.Namespace) -> list[str] | None:
    """Slim the smallest checkpoint, untimed, after the cache drop: the interpreter, torch and every module
    slim imports are read back into the page cache, so the timed run pays for cold data, not cold code."""
    if args.cold_code:
        return None
    return slim_cmd(args, ensure_source(work, WARMUP_SCALE, "src-warmup"), work / "out-warmup")


def bench_size(work: Path, scale: float, args: argparse.Namespace) -> SizeResult:
    src = ensure_source(work, scale)
    out, copy = work / f"out-{scale:g}", work / f"copy-{scale:g}"
    slim, warmup = slim_cmd(args, src, out), warmup_cmd(work, args)
    result = SizeResult(scale, tree_bytes(src))
    print(f"[{scale:g}] {shlex.join(slim)}", flush=True)
    for i in range(args.repeat):
        remove(out, copy)
        result.slim.append(timed(slim, work / "slim.log", args, warmup))
        result.written_bytes = tree_bytes(out)
        result.copy.append(timed(["cp", "-r", str(out), str(copy)], work / "cp.log", args))
        print(f"  repeat {i + 1}: slim {result.slim[-1]}\n            copy {result.copy[-1]}", flush=True)
        remove(out, copy)
    remove(work / "out-warmup")
    if args.clean_sources:
        remove(src)
    return result


def markdown(results: list[SizeResult]) -> str:
    lines = [
        "| size (GB source) | bytes written | slim s | copy s | ratio | peak RSS (MB) "
        "| slim s to exit | copy s to exit |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r.summary()
        lines.append(
            f"| {s['source_gb']:.3f} | {r.written_bytes:,} | {s['slim_s']:.2f} | {s['copy_s']:.2f} "
            f"| {s['ratio']:.2f} | {s['slim_peak_rss_mb']:.0f} "
            f"| {s['slim_exit_s']:.2f} | {s['copy_exit_s']:.2f} |"
        )
    return "\n".join(lines)


def cache_note(results: list[SizeResult]) -> str:
    runs = [run for r in results for run in r.slim + r.copy]
    busy = max((r.busy_before for r in runs), default=0.0)
    load = f"busiest CPU share (all cores) in the 2 s before a run: {busy:.0%}"
    if runs and all(run.cold_cache for run in runs):
        return f"page cache: dropped before every timed run (cold reads); {load}"
    return f"page cache: NOT dropped (drop_caches not writable, or --warm): reads may be warm; {load}"


def cpu_busy(seconds: float = 2.0) -> float:
    """Share of all CPUs' time spent busy (not idle or iowait) over the next ``seconds``."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(max_busy: float | None, timeout: float) -> float:
    """Wait (up to timeout) until less than ``max_busy`` of the CPUs is busy; return the last share."""
    deadline = time.monotonic() + timeout
    busy = cpu_busy()
    while max_busy is not None and busy > max_busy and time.monotonic() < deadline:
        busy = cpu_busy(5.0)
    return busy


def machine() -> dict[str, object]:
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def moeslim_revision() -> str:
    """The repository's HEAD, with ``+dirty`` when moeslim/ has uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(HERE.parent), *args], capture_output=True, text=True).stdout

    try:
        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "moeslim")
    except OSError:
        return "unknown"
    return (head.strip() or "unknown") + ("+dirty" if dirty.strip() else "")


def write_json(work: Path, results: list[SizeResult], note: str, code_warmup: bool) -> Path:
    path = work.with_name(work.name + "-results.json")
    data = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "moeslim_revision": moeslim_revision(),
        "cache": note,
        "code_warmup": code_warmup,
        "results": [{**r.summary(), **asdict(r)} for r in results],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "moeslim-bench")
    parser.add_argument("--sizes", default="0.01,0.1,1", help="make_synthetic --scale factors")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", type=int, default=32)
    parser.add_argument("--criterion", default="router-norm")
    parser.add_argument("--moeslim", default=None, help="command to run moeslim (default: moeslim on PATH)")
    parser.add_argument("--warm", action="store_true", help="do not try to drop the page cache")
    parser.add_argument("--cold-code", action="store_true", help="no warm-up run: slim also reads its own code cold")
    parser.add_argument(
        "--quiet-cpu",
        type=float,
        default=None,
        help="before each run wait until the CPUs are busy less than this share (e.g. 0.1)",
    )
    parser.add_argument("--quiet-timeout", type=float, default=120.0, help="longest such wait, seconds")
    parser.add_argument("--clean-sources", action="store_true", help="delete each source after measuring")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    results = [bench_size(args.work, scale, args) for scale in sizes]
    note = cache_note(results)
    warmup = "code warmed by an untimed slim" if not args.cold_code else "code read cold (--cold-code)"
    print(f"\n{markdown(results)}\n\n{note}; {warmup}; machine: {machine()}")
    print(f"results: {write_json(args.work, results, note, not args.cold_code)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
