"""``moeslim calibrate``: data → tokens → layer-by-layer statistics, saved and resumable."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moeslim.calibrate.collect import Chooser, calibrate_layers
from moeslim.calibrate.stats import Statistics
from moeslim.calibrate.store import check_stats_fit, fingerprint, load_stats, save_stats
from moeslim.errors import DeviceError, MissingFileError, OutputError, PlanError
from moeslim.families import text_config
from moeslim.layout import Layout
from moeslim.source import Checkpoint
from moeslim.units import parse_size

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CalibrationOptions:
    """How to calibrate; everything here is recorded with the statistics."""

    calib: str | None = None  # text file, folder, .jsonl, Hub dataset id; None: Python's stdlib sources
    samples: int = 64
    seq_len: int = 256
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8
    max_memory: str | None = None  # activations kept in RAM before spilling to disk, e.g. "8GB"
    reconstruction_tokens: int = 256  # tokens per layer sampled for the reconstruction criterion
    calib_split: str = "train"
    calib_column: str | None = None
    trust_remote_code: bool = False


def run_calibration(
    ckpt: Checkpoint, layout: Layout, opts: CalibrationOptions, out: Path | None = None,
    progressive: Chooser | None = None, overwrite: bool = False,
) -> tuple[Statistics, dict]:  # fmt: skip
    """Calibrate ``ckpt``; with ``out``, statistics are saved after every layer and a partial run resumes."""
    if layout.family.name == "llama4" and opts.reconstruction_tokens:
        opts = dataclasses.replace(opts, reconstruction_tokens=0)  # its router returns no top-k weights
    quant = text_config(ckpt.config).get("quantization_config") or ckpt.config.get("quantization_config") or {}
    if quant:
        raise PlanError(
            f"calibration does not run quantised checkpoints yet ({quant.get('quant_method', 'quantised')});"
            " use a data-free --criterion such as router-norm"
        )
    dtype = parse_dtype(opts.dtype)
    from moeslim.calibrate.data import load_calibration  # imports tokenizers only when calibrating

    data = load_calibration(
        opts.calib, load_tokenizer(ckpt), samples=opts.samples, seq_len=opts.seq_len, seed=opts.seed,
        split=opts.calib_split, column=opts.calib_column,
    )  # fmt: skip
    meta = _meta(ckpt, layout, opts, data.source, data.digest, data.tokens.numel(), progressive is not None)
    stats = _resume(out, meta, ckpt, layout, overwrite) or Statistics(layout.num_experts)
    from moeslim.calibrate.runner import LayerRunner  # transformers' model code: imported when used

    runner = LayerRunner(ckpt, layout, opts.device, dtype, opts.trust_remote_code)
    try:
        calibrate_layers(
            runner, data.tokens, min(opts.batch_size, max(1, opts.samples // 2)), stats,
            max_bytes=_size(opts.max_memory), progressive=progressive,
            reconstruction_tokens=opts.reconstruction_tokens,
            on_layer=(lambda i, s: save_stats(out, s, meta)) if out is not None else (lambda i, s: None),
        )  # fmt: skip
    finally:
        runner.close()
    if out is not None:
        save_stats(out, stats, meta)
    return stats, meta


def _meta(
    ckpt: Checkpoint, layout: Layout, opts: CalibrationOptions, source: str, digest: str, tokens: int,
    progressive: bool,
) -> dict:  # fmt: skip
    settings = {k: v for k, v in asdict(opts).items() if k not in ("trust_remote_code", "calib")}
    return {
        "model": {
            "name": ckpt.root.resolve().name,
            "model_type": layout.family.name,
            "num_experts": layout.num_experts,
            "fingerprint": fingerprint(ckpt, layout),
        },
        "calibration": {"data": source, "digest": digest, "tokens": tokens, "samples": opts.samples,
                        "seq_len": opts.seq_len, "seed": opts.seed},
        "settings": {**settings, "progressive": progressive},
    }  # fmt: skip


def _resume(out: Path | None, meta: dict, ckpt: Checkpoint, layout: Layout, overwrite: bool) -> Statistics | None:
    """Statistics already in ``out`` from the same model, data and settings; None to start afresh."""
    if out is None or not (out / "stats.json").exists():
        return None
    previous, old = load_stats(out)
    check_stats_fit(old, ckpt, layout, out)
    same = old.get("calibration") == meta["calibration"] and old.get("settings") == meta["settings"]
    if same:
        return previous
    if not overwrite:
        raise OutputError(f"{out} holds statistics from other data or settings; pass --overwrite or another --out")
    shutil.rmtree(out)
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "spiece.model")


def load_tokenizer(ckpt: Checkpoint) -> Any:
    """The model's own tokenizer. transformers would build an empty one from config.json alone, so the
    vocabulary file must be there."""
    from transformers import AutoTokenizer

    missing = MissingFileError(
        f"no tokenizer in {ckpt.root} (none of {', '.join(TOKENIZER_FILES)}); calibration needs the model's"
        " tokenizer files next to its weights (or use a data-free --criterion such as router-norm)"
    )
    if not any((ckpt.root / name).is_file() for name in TOKENIZER_FILES):
        raise missing
    try:
        return AutoTokenizer.from_pretrained(ckpt.root)
    except (OSError, ValueError, TypeError) as e:
        raise missing from e


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise DeviceError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _size(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as e:
        raise PlanError(f"--max-memory {text!r} is not a size like 8GB or 500MB") from e
