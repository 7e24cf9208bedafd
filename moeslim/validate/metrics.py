"""Per-token comparison of two models' next-token distributions, accumulated chunk by chunk.

Everything is computed in float64 from ``log_softmax`` of the logits, so identical logits give exactly
KL 0 and top-1 agreement 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class TokenMetrics:
    """KL(original ‖ pruned), top-1 agreement and both models' negative log-likelihoods, per scored token,
    with the sequence each token belongs to (for per-sequence means)."""

    sequence: list[np.ndarray] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)
    agree: list[np.ndarray] = field(default_factory=list)
    nll_original: list[np.ndarray] = field(default_factory=list)
    nll_pruned: list[np.ndarray] = field(default_factory=list)

    def add(self, original: torch.Tensor, pruned: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> None:
        """Score logits ``(batch, positions, vocab)`` of both models whose next tokens are ``targets``
        ``(batch, positions)``; ``rows`` ``(batch,)`` numbers the sequences of the batch."""
        lo = original.double().log_softmax(-1)  # (batch, positions, vocab)
        lp = pruned.double().log_softmax(-1)
        diff = torch.where(lo == lp, 0.0, lo - lp)  # exact zeros where equal, also for -inf logits
        kl = (lo.exp() * diff).sum(-1).clamp_min(0.0)  # rounding can make a tiny KL negative
        self.sequence.append(rows.cpu().numpy().repeat(kl.shape[1]))  # (batch · positions,)
        self.kl.append(kl.flatten().cpu().numpy())
        self.agree.append((lo.argmax(-1) == lp.argmax(-1)).flatten().cpu().numpy())
        index = targets.to(lo.device).unsqueeze(-1)
        self.nll_original.append(-lo.gather(-1, index).flatten().cpu().numpy())
        self.nll_pruned.append(-lp.gather(-1, index).flatten().cpu().numpy())

    @classmethod
    def merge(cls, parts: list[TokenMetrics]) -> TokenMetrics:
        """The tokens of every part together (metrics of several processes' shares)."""
        if len(parts) == 1:
            return parts[0]
        merged = cls()
        for part in parts:
            for name in ("sequence", "kl", "agree", "nll_original", "nll_pruned"):
                getattr(merged, name).extend(getattr(part, name))
        return merged

    def summary(self) -> dict[str, float]:
        kl = np.concatenate(self.kl)
        return {
            "kl_mean": float(kl.mean()),
            "kl_p95": float(np.percentile(kl, 95)),
            "top1_agreement": float(np.concatenate(self.agree).mean()),
            "perplexity_original": math.exp(float(np.concatenate(self.nll_original).mean())),
            "perplexity_pruned": math.exp(float(np.concatenate(self.nll_pruned).mean())),
            "scored_tokens": int(kl.size),
        }

    def per_sequence(self) -> dict[str, list[float]]:
        """Mean KL and both mean negative log-likelihoods of each sequence, in sequence order: paired values, so
        two pruned models validated on the same tokens can be compared sequence by sequence."""
        seq = np.concatenate(self.sequence)  # sequences are numbered 0..n-1, each with at least one token
        count = np.bincount(seq)
        return {name: (np.bincount(seq, weights=np.concatenate(getattr(self, name))) / count).tolist()
                for name in ("kl", "nll_original", "nll_pruned")}  # fmt: skip


@dataclass
class RelativeError:
    """``‖b − a‖ / ‖a‖`` over all tokens, accumulated batch by batch in float64."""

    diff: float = 0.0
    norm: float = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.diff += float((b.double() - a.double()).square().sum())
        self.norm += float(a.double().square().sum())

    @property
    def value(self) -> float:
        return math.sqrt(self.diff / self.norm) if self.norm else 0.0


def position_chunks(positions: int, batch: int, vocab: int, budget: int = 64 * 2**20) -> list[torch.Tensor]:
    """Positions ``0..positions-1`` in chunks whose float64 logits ``(batch, chunk, vocab)`` fit ``budget`` bytes."""
    size = max(1, budget // (8 * batch * vocab))
    return list(torch.arange(positions).split(size))
