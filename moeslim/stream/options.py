"""How to calibrate: plain settings with their defaults, importable without torch (the CLI's option defaults)."""

from __future__ import annotations

from dataclasses import dataclass


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
