"""Routing statistics as plain numpy data: per MoE layer and expert, sums over calibration tokens.

No torch here: criteria, plans and the statistics file read them without it; ``capture.py`` collects them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FIELDS = ("count", "gate_mass", "ean", "reap_sum", "soft_mass")


@dataclass
class LayerStats:
    """Sums over calibration tokens for one MoE layer; every array is ``(experts,)`` float64.

    ``count``: top-k selections |R_j|; ``gate_mass``: sum of g_j(t) over R_j; ``ean``: sum of ||f_j(t)||
    over R_j; ``reap_sum``: sum of g_j(t)·||f_j(t)|| over R_j; ``soft_mass``: sum over all t of the
    router's probability for j (softmax or sigmoid of its logits). ``tokens`` counts tokens seen.
    """

    num_experts: int
    tokens: int = 0
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in FIELDS:
            self.arrays.setdefault(name, np.zeros(self.num_experts))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def reap(self) -> np.ndarray:
        """REAP: mean over routed tokens of g·||f||; 0 for an expert never routed (never NaN)."""
        count = self.arrays["count"]
        return np.divide(self.arrays["reap_sum"], count, out=np.zeros_like(count), where=count > 0)


HALVES = ("a", "b")


@dataclass
class Statistics:
    """Per trunk MoE layer and calibration half, the routing statistics; plus reconstruction scores."""

    num_experts: int
    halves: dict[int, dict[str, LayerStats]] = field(default_factory=dict)
    reconstruction: dict[int, np.ndarray] = field(default_factory=dict)  # (experts,) higher = keep first

    def total(self, index: int) -> LayerStats:
        a, b = (self.halves[index][h] for h in HALVES)
        return LayerStats(self.num_experts, a.tokens + b.tokens, {k: a[k] + b[k] for k in a.arrays})

    @property
    def layers(self) -> list[int]:
        return sorted(self.halves)


@dataclass(frozen=True)
class CalibrationMeta:
    """What a calibration measured: ``model`` (name, model_type, num_experts, fingerprint), ``calibration`` (the
    tokens' provenance: data, digest, tokens, samples, seq_len, seed) and ``settings`` (the options, progressive).
    Saved beside the statistics (``stats.json``), recorded in plans, and what identifies a resume boundary; its
    three parts stay plain JSON objects, as written."""

    model: dict
    calibration: dict
    settings: dict

    @property
    def num_experts(self) -> int:
        return int(self.model["num_experts"])

    def same_run(self, other: CalibrationMeta) -> bool:
        """Whether ``other`` used the same data and settings (then its statistics can be resumed)."""
        return self.calibration == other.calibration and self.settings == other.settings

    def to_dict(self) -> dict:
        return {"model": self.model, "calibration": self.calibration, "settings": self.settings}
