"""Per-token and per-sequence validation metrics, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from moeslim.validate.metrics import TokenMetrics


def test_per_sequence_means_gather_a_sequence_over_position_chunks() -> None:
    """Two sequences, vocabulary 2, scored in two chunks of one position each (as ``position_chunks`` splits)."""
    metrics = TokenMetrics()
    even = torch.zeros(2, 1, 2)  # p = (1/2, 1/2) for both sequences
    skewed = torch.tensor([[[0.0, 0.0]], [[math.log(3), 0.0]]])  # sequence 1: p = (3/4, 1/4), float32 ln 3
    targets = torch.zeros(2, 1, dtype=torch.long)
    rows = torch.tensor([0, 1])
    metrics.add(even, skewed, targets, rows)  # first position
    metrics.add(even, even, targets, rows)  # second position: the models agree
    per = metrics.per_sequence()
    # sequence 1, first position: KL = ½·ln(½ / ¾) + ½·ln(½ / ¼) = ½·ln(4/3); second: 0; mean ¼·ln(4/3)
    assert per["kl"] == pytest.approx([0.0, 0.25 * math.log(4 / 3)], rel=1e-6)
    assert per["nll_original"] == pytest.approx([math.log(2)] * 2, rel=1e-6)
    # pruned NLL of target 0: sequence 1 gives −ln ¾ = ln(4/3) then ln 2
    assert per["nll_pruned"] == pytest.approx([math.log(2), (math.log(4 / 3) + math.log(2)) / 2], rel=1e-6)
    # equal token counts per sequence: the mean of the sequence means is the token mean of the summary
    assert metrics.summary()["kl_mean"] == pytest.approx(sum(per["kl"]) / 2, rel=1e-6)
