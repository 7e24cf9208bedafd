"""Which differences between pruning criteria are real: paired bootstrap intervals, and the rule for the default.

Every plan of a fixture is validated on the same held-out sequences, so two plans are compared sequence by
sequence. A criterion may have several replicates (calibration seeds; random's seeds), each a vector of
per-sequence values. One bootstrap draw resamples the sequences (the same draw for both plans: paired) and,
independently for each plan, its replicates; the statistic is the plan's held-out perplexity (``exp`` of the
mean NLL) or its mean KL(original ‖ pruned). A difference is significant when its 95 % interval excludes 0.

The rule for the default: at the deciding keep ratio, a candidate *loses* a cell (fixture × metric) when some
other criterion is significantly better there. The default is a candidate that loses the fewest cells; among
those the incumbent stays (differences within noise do not move the default), else the best mean rank.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

METRICS = ("perplexity", "kl")
DRAWS = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Runs:
    """Replicates of one plan-making criterion on one fixture: ``kl`` and ``nll`` are ``(replicates, sequences)``."""

    kl: np.ndarray
    nll: np.ndarray

    @classmethod
    def of(cls, per_sequence: Sequence[Mapping[str, Sequence[float]]]) -> Runs:
        """From the ``per_sequence`` records of each replicate (``kl`` and ``nll`` lists, in sequence order)."""
        return cls(np.array([r["kl"] for r in per_sequence]), np.array([r["nll"] for r in per_sequence]))

    def value(self, metric: str, replicate_w: np.ndarray, sequence_w: np.ndarray) -> np.ndarray:
        """The metric under weights ``(draws, replicates)`` and ``(draws, sequences)``, each row summing to 1."""
        values = self.kl if metric == "kl" else self.nll
        mean = np.einsum("dr,rs,ds->d", replicate_w, values, sequence_w)
        return mean if metric == "kl" else np.exp(mean)

    def point(self, metric: str) -> float:
        r, s = self.kl.shape
        return float(self.value(metric, np.full((1, r), 1 / r), np.full((1, s), 1 / s))[0])


def weights(rng: np.random.Generator, n: int, draws: int) -> np.ndarray:
    """Bootstrap weights ``(draws, n)``: how often each of ``n`` items is drawn, over ``n``."""
    return rng.multinomial(n, np.full(n, 1 / n), size=draws) / n


@dataclass(frozen=True)
class Difference:
    """``b − a`` of one metric: the point estimate and its bootstrap interval."""

    point: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """``'lower'`` when b is significantly below a, ``'higher'`` when above, else ``'same'``."""
        return "lower" if self.high < 0 else "higher" if self.low > 0 else "same"


@functools.cache
def _draws(seed: int, sequences: int, b_replicates: int, a_replicates: int) -> tuple[np.ndarray, ...]:
    """The bootstrap weights of one ``difference``: sequences (one draw for both plans: paired), then ``b``'s and
    ``a``'s replicates, from one generator seeded ``seed``. They depend on nothing else, so every comparison of the
    same shapes reuses them: the same numbers, drawn once (drawing was 88 % of choosing the default)."""
    rng = np.random.default_rng(seed)
    out = (weights(rng, sequences, DRAWS), weights(rng, b_replicates, DRAWS), weights(rng, a_replicates, DRAWS))
    for w in out:
        w.setflags(write=False)
    return out


def difference(a: Runs, b: Runs, metric: str, seed: int = 0) -> Difference:
    """``metric(b) − metric(a)`` with its paired bootstrap interval (deterministic for a given ``seed``)."""
    if b.kl.shape[1] != a.kl.shape[1]:
        raise ValueError("the two plans were not validated on the same held-out sequences")
    sequences, b_w, a_w = _draws(seed, a.kl.shape[1], len(b.kl), len(a.kl))
    draws = b.value(metric, b_w, sequences) - a.value(metric, a_w, sequences)
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Difference(b.point(metric) - a.point(metric), float(low), float(high))


def losses(fixtures: Mapping[str, Mapping[str, Runs]], candidate: str) -> list[tuple[str, str, str]]:
    """``(fixture, metric, better)`` for each criterion significantly better than ``candidate``."""
    out = []
    for name, plans in fixtures.items():
        mine = plans[candidate]
        for metric in METRICS:
            out += [(name, metric, other) for other, runs in plans.items()
                    if other != candidate and difference(mine, runs, metric).verdict == "lower"]  # fmt: skip
    return out


def mean_rank(fixtures: Mapping[str, Mapping[str, Runs]], candidate: str, candidates: Sequence[str]) -> float:
    """The candidate's rank (1 = lowest point estimate) among ``candidates``, averaged over fixtures × metrics."""
    ranks = []
    for plans in fixtures.values():
        for metric in METRICS:
            points = {c: plans[c].point(metric) for c in candidates}
            ranks.append(1 + sum(points[c] < points[candidate] for c in candidates))
    return float(np.mean(ranks))


def choose_default(
    fixtures: Mapping[str, Mapping[str, Runs]], candidates: Sequence[str], incumbent: str
) -> tuple[str, dict[str, list[tuple[str, str, str]]]]:
    """The default by the rule in the module docstring, and every candidate's losses.

    ``fixtures`` maps a fixture to its plans (label → replicates); plans that are not candidates (random, say)
    still count as criteria a candidate can lose to."""
    lost = {c: losses(fixtures, c) for c in candidates}
    cells = {c: len({(f, m) for f, m, _ in lost[c]}) for c in candidates}
    fewest = [c for c in candidates if cells[c] == min(cells.values())]
    if incumbent in fewest:
        return incumbent, lost
    return min(fewest, key=lambda c: (mean_rank(fixtures, c, candidates), candidates.index(c))), lost
