"""Peak memory and time of `moeslim validate` on a synthetic OLMoE-shaped checkpoint (issue #4).

    python benchmarks/bench_validate.py --work /tmp/bench-validate [--layers 2] [--scale 1] [--dtype float32]

Builds the synthetic checkpoint with make_synthetic.py (no tokenizer: the trained fixture's byte-level BPE
tokenizer, vocabulary 2048, is copied in, which is within the synthetic vocabulary), prunes it to 32 of 64
experts with `moeslim slim --criterion router-norm --no-validate`, then runs `moeslim validate` in a child
process and reads its peak RSS from ``os.wait4`` (``ru_maxrss``). Generations are off (``--generations 0``):
they load whole models with ``from_pretrained`` by design, when they fit, and are not the streaming path.

The target is one decoder layer of each model in the compute dtype, plus both streams of hidden states,
plus 0.5 GB; the original's layer counts twice in the stricter "2 layers" figure also printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "fixtures" / "trained" / "tiny-mixtral-16e"
BYTES = {"float32": 4, "bfloat16": 2}


def layer_bytes(model: Path, dtype: str) -> int:
    """Bytes of decoder layer 0 of ``model`` in the compute dtype (elements × element size)."""
    import math

    from moeslim.source import open_checkpoint

    ckpt = open_checkpoint(model)
    return sum(math.prod(t.shape) * BYTES[dtype] for n, t in ckpt.tensors.items() if n.startswith("model.layers.0."))


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, stdout) of ``cmd`` run as a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024, out


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    model = args.work / f"olmoe-{args.layers}layers-scale{args.scale:g}"
    if not (model / "config.json").exists():
        gen = [sys.executable, str(ROOT / "benchmarks" / "make_synthetic.py"), str(model)]
        subprocess.run([*gen, "--layers", str(args.layers), "--scale", str(args.scale)], check=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, model / name)
    pruned = args.work / f"{model.name}-keep32"
    if not (pruned / "config.json").exists():
        subprocess.run([sys.executable, "-m", "moeslim", "slim", str(model), "--keep", "32", "--criterion",
                        "router-norm", "--no-validate", "--out", str(pruned)], check=True)  # fmt: skip
    return model, pruned


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-validate"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=sorted(BYTES))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model, pruned = prepare(args)
    cmd = [sys.executable, "-m", "moeslim", "validate", str(model), str(pruned), "--samples", str(args.samples),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--dtype", args.dtype,
           "--generations", "0"]  # fmt: skip
    seconds, peak, out = run_measured(cmd)
    import json

    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    mib = 2**20
    one, one_pruned = layer_bytes(model, args.dtype), layer_bytes(pruned, args.dtype)
    activations = 2 * args.samples * args.seq_len * hidden * BYTES[args.dtype]
    target = one + one_pruned + activations + 512 * mib
    print(out.rstrip())
    print(f"\n{' '.join(cmd[1:])}")
    print(f"original layer {one / mib:.0f} MiB, pruned layer {one_pruned / mib:.0f} MiB, activations (both streams)"
          f" {activations / mib:.0f} MiB ({args.dtype})")  # fmt: skip
    strict = (2 * one + activations) / mib + 512
    print(f"peak RSS {peak / mib:.0f} MiB; target (1 original + 1 pruned layer + activations + 512 MiB)"
          f" {target / mib:.0f} MiB; 2 original layers + activations + 512 MiB {strict:.0f} MiB;"
          f" time {seconds:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
