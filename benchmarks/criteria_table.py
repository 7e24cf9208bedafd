"""Held-out perplexity of every criterion's plan on the trained fixture (issue: calibrated criteria).

    python benchmarks/criteria_table.py [--model fixtures/trained/tiny-mixtral-16e] [--keep 8] [--seeds 5]

Calibration text: stdlib files the model was trained on (never the held-out ones); evaluation text: the
held-out files listed in the model folder's heldout_files.json. Each plan is made by `moeslim slim`, the
pruned folder is loaded with transformers and its perplexity measured on the same held-out tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeslim.stream.tokens import load_calibration

CALIBRATED = ["frequency", "gate-mass", "soft-mass", "ean", "reap", "reconstruction"]
DATA_FREE = ["router-norm", "weight-norm"]


PIECE_CHARS = 1500  # documents are cut into pieces so that a sample spans many files, not a few long ones


def write_texts(files: list[Path], out: Path) -> Path:
    with out.open("w") as f:
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            for start in range(0, len(text), PIECE_CHARS):
                f.write(json.dumps({"text": text[start : start + PIECE_CHARS]}) + "\n")
    return out


def split_corpus(model: Path, work: Path) -> tuple[Path, Path]:
    """(calibration .jsonl from training files, evaluation .jsonl from held-out files)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    heldout = {root / p for p in json.loads((model / "heldout_files.json").read_text())["files"]}
    skip = {"site-packages", "test", "tests", "idlelib", "__pycache__"}
    train = sorted(p for p in root.rglob("*.py") if p not in heldout and not skip & set(p.relative_to(root).parts))
    return write_texts(train, work / "calib.jsonl"), write_texts(sorted(heldout), work / "heldout.jsonl")


@torch.no_grad()
def perplexity(folder: Path, tokens: torch.Tensor) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for batch in tokens.split(8):
        out = model(input_ids=batch, labels=batch)
        n = batch.numel() - batch.shape[0]
        total, count = total + float(out.loss) * n, count + n
    return math.exp(total / count)


def slim(model: Path, out: Path, keep: int, criterion: str, extra: list[str]) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "moeslim", "slim", str(model), "--keep", str(keep), "--criterion", criterion,
           "--out", str(out), "--overwrite", "--no-validate", *extra]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path("fixtures/trained/tiny-mixtral-16e"))
    ap.add_argument("--keep", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-samples", type=int, default=256, help="held-out sequences of 128 tokens")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib, heldout = split_corpus(args.model, work)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokens = load_calibration(str(heldout), tokenizer, samples=args.eval_samples, seq_len=128, seed=1).tokens
        base = perplexity(args.model, tokens)
        stats = work / "stats"
        cal = ["--calib", str(calib), "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
        subprocess.run([sys.executable, "-m", "moeslim", "calibrate", str(args.model), "--out", str(stats), *cal],
                       check=True, capture_output=True)  # fmt: skip
        rows = [("original (16 experts)", f"{base:.3f}", "", "")]
        for criterion in DATA_FREE + CALIBRATED:
            extra = ["--stats", str(stats)] if criterion in CALIBRATED else []
            seconds = slim(args.model, work / criterion, args.keep, criterion, extra)
            plan = json.loads((work / criterion / "moeslim_plan.json").read_text())
            stability = plan.get("calibration", {}).get("stability", {})
            mean_j = f"{statistics.mean(stability.values()):.2f}" if stability else ""
            rows.append((criterion, f"{perplexity(work / criterion, tokens):.3f}", mean_j, f"{seconds:.1f}"))
        for criterion in ("reap", "frequency"):
            out = work / f"{criterion}-progressive"
            seconds = slim(args.model, out, args.keep, criterion, [*cal, "--progressive"])
            rows.append((f"{criterion} --progressive", f"{perplexity(out, tokens):.3f}", "", f"{seconds:.1f}"))
        randoms = []
        for seed in range(args.seeds):
            slim(args.model, work / "random", args.keep, "random", ["--seed", str(seed)])
            randoms.append(perplexity(work / "random", tokens))
        spread = f"{statistics.mean(randoms):.3f} ± {statistics.stdev(randoms):.3f} (min {min(randoms):.3f})"
        rows.append((f"random ({args.seeds} seeds)", spread, "", ""))
    print(f"keep {args.keep} of 16, held-out perplexity on {tokens.numel()} tokens\n")
    print("| criterion | held-out perplexity | kept-set stability (mean Jaccard of halves) | slim seconds |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
