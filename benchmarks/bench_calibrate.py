"""Streaming calibration against an in-memory transformers forward of the same model over the same tokens.

    python benchmarks/bench_calibrate.py --work /tmp/bench-cal [--layers 4] [--samples 16] [--seq-len 256]

Both sides collect the same routing statistics with the same hooks (moeslim/calibrate/capture.py), so the
comparison measures what streaming costs: the in-memory side loads the whole model with
``from_pretrained`` and runs it; the streaming side loads one decoder layer at a time. Each side runs in its
own process, whose peak RSS (``ru_maxrss``) is reported. Tokens are random ids (the synthetic checkpoint has
no tokenizer); the timed span includes loading weights from disk on both sides. A plain in-memory forward
without statistics is timed too, for scale.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tokens(args: argparse.Namespace, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))


def stream(args: argparse.Namespace) -> dict:
    from moeslim.calibrate.collect import Statistics, calibrate_layers
    from moeslim.layout import resolve_layout
    from moeslim.source import open_checkpoint
    from moeslim.stream.runner import LayerRunner

    start = time.perf_counter()
    ckpt = open_checkpoint(args.model)
    layout = resolve_layout(ckpt)
    ids = tokens(args, ckpt.config["vocab_size"])
    runner = LayerRunner(ckpt, layout, args.device, DTYPES[args.dtype])
    stats = calibrate_layers(runner, ids, args.batch_size, Statistics(layout.num_experts))
    runner.close()
    return {
        "seconds": time.perf_counter() - start,
        "checksum": float(sum(stats.total(i)["ean"].sum() for i in stats.layers)),
    }


def in_memory(args: argparse.Namespace, hooks: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from moeslim.calibrate.capture import LayerStats, collect, moe_block
    from moeslim.stream.runner import decoder_of

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(args.device).eval()
    ids = tokens(args, model.config.vocab_size)
    stats = []
    with contextlib.ExitStack() as stack, torch.no_grad():
        if hooks:
            for layer in decoder_of(model).layers:
                stats.append(LayerStats(model.config.num_experts))
                stack.enter_context(collect(moe_block(layer), stats[-1], "softmax"))
        for batch in ids.split(args.batch_size):
            decoder_of(model)(input_ids=batch.to(args.device))
    return {"seconds": time.perf_counter() - start, "checksum": float(sum(s["ean"].sum() for s in stats))}


def child(args: argparse.Namespace) -> None:
    result = stream(args) if args.child == "stream" else in_memory(args, args.child == "memory")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def run_child(mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model", str(args.model), "--samples", str(args.samples),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--device", args.device,
           "--dtype", args.dtype]  # fmt: skip
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def layer_bytes(model: Path, dtype: str) -> int:
    from moeslim.source import open_checkpoint

    ckpt = open_checkpoint(model)
    per = torch.finfo(DTYPES[dtype]).bits // 8
    return sum(t.nbytes // 2 * per for n, t in ckpt.tensors.items() if n.startswith("model.layers.0."))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-calibrate"))
    ap.add_argument("--model", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child", choices=["stream", "memory", "plain"])
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    args.model = args.model or args.work / f"olmoe-{args.layers}layers"
    if not (args.model / "config.json").exists():
        gen = Path(__file__).with_name("make_synthetic.py")
        subprocess.run([sys.executable, str(gen), str(args.model), "--layers", str(args.layers)], check=True)
    results = {mode: [run_child(mode, args) for _ in range(args.repeat)] for mode in ("stream", "memory", "plain")}
    best = {mode: min(r["seconds"] for r in rs) for mode, rs in results.items()}
    rss = {mode: max(r["peak_rss_mb"] for r in rs) for mode, rs in results.items()}
    assert abs(results["stream"][0]["checksum"] - results["memory"][0]["checksum"]) <= 1e-4 * abs(
        results["memory"][0]["checksum"]
    ), "streaming and in-memory statistics differ"
    one_layer = layer_bytes(args.model, args.dtype) / 2**20
    activations = args.samples * args.seq_len * 2048 * 4 / 2**20
    print(
        f"model {args.model} ({args.layers} layers), {args.samples}×{args.seq_len} tokens, {args.device} {args.dtype}"
    )
    print(f"| run | best of {args.repeat} (s) | peak RSS (MiB) |")
    print("| --- | --- | --- |")
    for mode, label in (("stream", "moeslim streaming calibration"), ("memory", "in-memory, same statistics"),
                        ("plain", "in-memory forward, no statistics")):  # fmt: skip
        print(f"| {label} | {best[mode]:.1f} | {rss[mode]:.0f} |")
    print(f"\ntime ratio streaming / in-memory: {best['stream'] / best['memory']:.2f} (target <= 1.1)")
    budget = 1.5 * one_layer + activations
    print(f"one layer {one_layer:.0f} MiB, activations {activations:.0f} MiB:"
          f" 1.5 × layer + activations = {budget:.0f} MiB; streaming peak {rss['stream']:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
