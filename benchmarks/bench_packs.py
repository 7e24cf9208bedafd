"""Dequantising one routed-expert projection of DeepSeek-V3 width (2048 × 7168) from each pack format that
``moeslim/stream/packs.py`` reads, against the FP8 block dequantisation of the same weight: time and peak RSS.

    python benchmarks/bench_packs.py [--repeat 3]

Calibration dequantises a layer's experts one weight at a time, so a weight's time × 3 × 256 is a DeepSeek-V3-size
layer's dequantisation, and its transient memory is what a weight adds to the one dense layer held.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from moeslim.stream.dequant import fp8_dense
from moeslim.stream.packs import AWQ, GPTQ, NVFP4, pack_dense

OUT, IN, GROUP = 2048, 7168, 128


def _inputs(method: str) -> tuple[dict[str, torch.Tensor], tuple[int, int, int]]:
    words = torch.iinfo(torch.int32)
    if method == NVFP4:
        return {
            "codes": torch.randint(0, 256, (OUT, IN // 2), dtype=torch.uint8),
            "scales": torch.rand(OUT, IN // 16).to(torch.float8_e4m3fn),
            "global": torch.tensor(0.01),
        }, (4, 16, 0)
    codes = (IN // 8, OUT) if method == GPTQ else (IN, OUT // 8)
    read = {
        "codes": torch.randint(words.min, words.max, codes, dtype=torch.int32),
        "zeros": torch.randint(words.min, words.max, (IN // GROUP, OUT // 8), dtype=torch.int32),
        "scales": torch.rand(IN // GROUP, OUT).half(),
    }
    if method == GPTQ:
        read["groups"] = (torch.arange(IN) // GROUP).int()
    return read, (4, GROUP, 1 if method == GPTQ else 0)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"| format | ms per {OUT}×{IN} weight | peak RSS after (MB) |")
    print("| --- | --- | --- |")
    codes, scale = torch.randn(OUT, IN).to(torch.float8_e4m3fn), torch.rand(OUT // 128, IN // 128)
    start = time.perf_counter()
    for _ in range(args.repeat):
        fp8_dense(codes, scale, (128, 128))
    baseline = (time.perf_counter() - start) / args.repeat
    print(f"| fp8 block 128×128 (baseline) | {baseline * 1000:.0f} | {_peak_mb():.0f} |")
    del codes, scale
    for method in (NVFP4, GPTQ, AWQ):
        read, block = _inputs(method)
        start = time.perf_counter()
        for _ in range(args.repeat):
            pack_dense(method, (OUT, IN), block, read, "w")
        seconds = (time.perf_counter() - start) / args.repeat
        print(f"| {method} | {seconds * 1000:.0f} | {_peak_mb():.0f} |")


if __name__ == "__main__":
    main()
