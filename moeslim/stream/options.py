"""How to calibrate: plain settings with their defaults, importable without torch (the CLI's option defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from moeslim.errors import UsageError


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
    max_memory: str | None = None  # weights and hidden states in RAM, e.g. "8GB" (memory.py); None: what is free
    reconstruction_tokens: int = 256  # tokens per layer sampled for the reconstruction criterion
    calib_split: str = "train"
    calib_column: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        """Refuse, before any work, values calibration cannot use."""
        at_least("--samples", self.samples, 2, "calibration needs 2 sequences or more (its statistics have two halves)")
        at_least("--seq-len", self.seq_len, 2, "a sequence needs 2 tokens or more")
        at_least("--batch-size", self.batch_size, 1, "a batch holds 1 sequence or more")
        at_least("--seed", self.seed, 0, "seeds are 0 or more")
        at_least("--reconstruction-tokens", self.reconstruction_tokens, 0, "0 skips the reconstruction criterion")


def at_least(option: str, value: int, low: int, why: str) -> None:
    """Refuse ``option value`` below ``low``, in one line that says why and what to pass."""
    if value < low:
        raise UsageError(f"{option} {value} is too small: {why}; pass {option} {low} or more")
