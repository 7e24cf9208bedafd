"""Calibration with 1 process against N processes under torchrun, on the same model and tokens.

    python benchmarks/bench_distributed.py --work /tmp/bench-dist [--model DIR | --synthetic LAYERS] [--nproc 2]
    python benchmarks/bench_distributed.py --device cuda --nproc 8      # N GPUs against one, on a GPU machine

Each configuration runs ``moeslim calibrate`` in fresh processes (best of ``--repeat``) and reports wall time,
tokens per second and the largest peak RSS of its processes (``ru_maxrss`` from ``wait4``); the
statistics of every configuration must equal the single-process ones (checked here, to 1e-5). On the CPU each
process gets ``cores / N`` threads, so 1 process with all cores is the fair baseline; "1 process, 1 thread" is
printed too, for the scaling of the work itself. Default model: ``fixtures/trained/tiny-qwen3-64e``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]


def calibrate(
    model: Path, out: Path, args: argparse.Namespace, procs: int, threads: int, mode: str = "experts"
) -> tuple[float, float, float]:
    """Seconds, CPU seconds and the largest peak RSS (MiB) of the processes of one calibration with ``procs``
    processes (``mode``: ``MOESLIM_PARALLEL``, how they divide the work)."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    launch = [sys.executable, "-m", "moeslim"]
    if procs > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "-m", "moeslim"]
    cmd = [*launch, "calibrate", str(model), "--out", str(out), "--samples", str(args.samples), "--seq-len",
           str(args.seq_len), "--batch-size", str(args.batch_size), "--device", args.device,
           "--reconstruction-tokens", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MOESLIM_PARALLEL": mode}
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # the launcher and every process it waited for
    seconds = time.perf_counter() - start
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text()[-2000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def synthetic(work: Path, layers: int) -> Path:
    """The OLMoE-shaped synthetic checkpoint (random weights), with the Qwen3-style fixture's tokenizer beside it
    (calibration tokenizes its text; ids stay below either vocabulary)."""
    model = work / f"olmoe-{layers}layers"
    if not (model / "config.json").is_file():
        make = ROOT / "benchmarks/make_synthetic.py"
        subprocess.run([sys.executable, str(make), str(model), "--layers", str(layers)], check=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "fixtures/trained/tiny-qwen3-64e" / name, model / name)
    return model


def same_statistics(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "stats.safetensors")), load_file(str(b / "stats.safetensors"))
    return x.keys() == y.keys() and all(np.allclose(x[k], y[k], rtol=1e-5, atol=1e-9) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-distributed"))
    ap.add_argument("--model", type=Path, default=ROOT / "fixtures/trained/tiny-qwen3-64e")
    ap.add_argument("--synthetic", type=int, metavar="LAYERS", help="use make_synthetic.py's OLMoE shapes instead")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    if args.synthetic:
        args.model = synthetic(args.work, args.synthetic)
    cores = os.cpu_count() or 1
    each = max(1, cores // args.nproc)
    configs = [(1, 1, "-"), (1, cores, "-"), (args.nproc, each, "experts"), (args.nproc, each, "batches")]
    if args.device != "cpu":
        configs = [(1, 1, "-"), (args.nproc, 1, "experts"), (args.nproc, 1, "batches")]
    tokens = args.samples * args.seq_len
    print(f"{args.model.name}: {args.samples} × {args.seq_len} = {tokens} tokens, --device {args.device}")
    print("| processes | threads each | divide | seconds | CPU seconds | tokens/s | speed-up | CPU × | peak RSS per"
          " process (MiB) | same stats |")  # fmt: skip
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    base = args.work / "p1t1-"
    first: tuple[float, float] | None = None
    for procs, threads, mode in configs:
        out = args.work / f"p{procs}t{threads}{mode}"
        runs = [calibrate(args.model, out, args, procs, threads, mode if procs > 1 else "experts")
                for _ in range(args.repeat)]  # fmt: skip
        seconds, cpu = min(r[0] for r in runs), min(r[1] for r in runs)
        first = first or (seconds, cpu)
        same = "reference" if out == base else ("yes" if same_statistics(base, out) else "**no**")
        print(f"| {procs} | {threads} | {mode} | {seconds:.1f} | {cpu:.1f} | {tokens / seconds:.0f} |"
              f" {first[0] / seconds:.2f} | {cpu / first[1]:.2f} | {max(r[2] for r in runs):.0f} | {same} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
