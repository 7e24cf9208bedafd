"""Resuming an interrupted calibration against a fresh one.

    python benchmarks/bench_resume.py [--model fixtures/trained/tiny-mixtral-16e] [--samples 64] [--seq-len 256]
                                      [--repeat 3]

Three timed calibrations of the same model, data and settings, each in its own process (so none profits from
another's warm-up). Reported: the wall time of the whole process (interpreter start-up and imports included),
and the wall and CPU time (all threads) of ``run_calibration`` alone (data loading included), after a warm-up
that imports transformers' model code and builds the meta-device model once, since those fixed costs dwarf a
tiny model's layers. On a machine shared with other work, CPU time is the steadier of the two.

- fresh: all layers;
- resumed: a run stopped after its third MoE layer (``on_layer`` raises once that layer is saved), then resumed
  from the hidden states it saved in ``resume/``;
- resumed without a boundary: the same, with ``resume/`` deleted first, so the finished layers run again to
  rebuild their hidden states (what every resume cost before the boundary was saved).

The resumed statistics are checked equal to the fresh ones, array by array. Each time is the best of
``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MIXTRAL = Path(__file__).resolve().parents[1] / "fixtures" / "trained" / "tiny-mixtral-16e"


class Stop(Exception):
    pass


def child(args: argparse.Namespace) -> None:
    """One calibration into ``args.out``; stops after ``args.stop_after`` MoE layers when given."""
    from moeslim.calibrate.session import run_calibration
    from moeslim.layout import resolve_layout
    from moeslim.source import open_checkpoint
    from moeslim.stream.context import RunContext
    from moeslim.stream.options import CalibrationOptions

    opts = CalibrationOptions(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size)
    calibrated: list[int] = []

    def on_layer(index: int) -> None:
        calibrated.append(index)
        if len(calibrated) == args.stop_after:
            raise Stop

    from moeslim.stream.runner import LayerRunner

    ckpt = open_checkpoint(args.model)
    LayerRunner(ckpt, resolve_layout(ckpt)).close()  # warm-up: imports the model code, builds the model once
    start, cpu = time.perf_counter(), time.process_time()
    with contextlib.suppress(Stop):
        run_calibration(RunContext(ckpt, resolve_layout(ckpt), opts), out=args.out, on_layer=on_layer)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "cpu": time.process_time() - cpu, "calibrated": calibrated}))


def run_child(args: argparse.Namespace, out: Path, stop_after: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", str(args.model), "--out", str(out),
           "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--stop-after", str(stop_after)]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process": time.perf_counter() - started}


def same_statistics(a: Path, b: Path) -> bool:
    from safetensors.numpy import load_file

    x, y = load_file(a / "stats.safetensors"), load_file(b / "stats.safetensors")
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=MIXTRAL)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--stop-after", type=int, default=3, help="MoE layers done before the interruption")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        args.stop_after = args.stop_after or None
        child(args)
        return
    rounds = [measure(args) for _ in range(args.repeat)]
    best = [
        {**runs[0], **{key: min(r[key] for r in runs) for key in ("seconds", "cpu", "process")}}
        for runs in zip(*rounds, strict=True)
    ]
    fresh, cut, resumed, rebuilt = best
    print(f"model {args.model.name}: {len(fresh['calibrated'])} MoE layers, {args.samples}×{args.seq_len} tokens,"
          f" batch {args.batch_size}, interrupted after {len(cut['calibrated'])} MoE layers;"
          f" best of {args.repeat}")  # fmt: skip
    print("| run | layers calibrated | run_calibration wall (s) | its CPU time (s) | whole process wall (s) |")
    print("| --- | --- | --- | --- | --- |")
    for label, r in (("fresh", fresh), ("interrupted run", cut), ("resumed from the saved boundary", resumed),
                     ("resumed without a boundary (finished layers rerun)", rebuilt)):  # fmt: skip
        layers = ", ".join(map(str, r["calibrated"]))
        print(f"| {label} | {layers} | {r['seconds']:.2f} | {r['cpu']:.2f} | {r['process']:.1f} |")


def measure(args: argparse.Namespace) -> tuple[dict, dict, dict, dict]:
    """One round: fresh, interrupted, resumed from its boundary, resumed without it."""
    with tempfile.TemporaryDirectory(prefix="moeslim-bench-resume-") as tmp:
        work = Path(tmp)
        fresh = run_child(args, work / "fresh")
        cut = run_child(args, work / "resumed", args.stop_after)
        shutil.copytree(work / "resumed", work / "rebuilt", ignore=shutil.ignore_patterns("resume"))
        resumed = run_child(args, work / "resumed")
        rebuilt = run_child(args, work / "rebuilt")
        assert same_statistics(work / "fresh", work / "resumed"), "resumed statistics differ from the fresh run"
        assert same_statistics(work / "fresh", work / "rebuilt"), "rebuilt statistics differ from the fresh run"
    return fresh, cut, resumed, rebuilt


if __name__ == "__main__":
    main()
