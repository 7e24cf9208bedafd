"""``--criterion auto``: every candidate criterion's plan measured in the calibration stream, the best one kept.

No single criterion is best at every sparsity and on every model (benchmarks/quality), so the default measures.
The last quarter of the calibration batches is *held out*: while the statistics pass runs each decoder layer
over all batches of the original model, the same loaded layer also runs the held-out batches once per candidate
plan, routing only to that plan's kept experts (the candidates' kept sets for a layer are known as soon as its
statistics are). Candidates whose plans agree so far share one stream, so the extra compute is at most the
number of distinct plans × a quarter of the tokens. After the last layer, each stream's logits are compared
with the original's: ``ean``'s plan wins unless another's KL(original ‖ pruned) is lower beyond the noise of the
held-out sequences (``finish``). The same pass can also fit ``ean``'s correction (``correct/fit.py``'s
``Fitter``, another observer), so when ``ean`` wins nothing more is read. Weights are read once, one layer at a
time, as in a plain calibration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch

from moeslim.calibrate.statistics import Statistics
from moeslim.layout import Layout
from moeslim.plan import select_one
from moeslim.stream.loop import Observer, Walk
from moeslim.stream.masking import mask_router
from moeslim.stream.modules import MoeParts

if TYPE_CHECKING:
    from moeslim.stream.runner import LayerRunner

#: The criteria ``auto`` measures, in the order that breaks ties (equal KL means equal plans in practice); the first
#: is the incumbent. ``frequency`` and ``weight-norm`` were measured too until the quality study showed each of them
#: significantly worse than another criterion in all 16 of its cells: two fewer streams to run.
CANDIDATES = ("ean", "reap", "gate-mass", "router-norm")
HELD_OUT = 4  # one batch in HELD_OUT (at least one) is held out, the last ones

Z = 1.96  # the two-sided 95 % normal quantile

LayerScores = Callable[[str, int, Statistics], np.ndarray]  # (criterion, layer index, statistics) → scores


class PlanTrials(Observer):
    """Candidate plans streamed beside a calibration pass: an observer of the layer loop after the ``Collector``
    filling ``stats`` (it needs each layer's statistics once measured)."""

    def __init__(
        self, layout: Layout, keep: int, scores: LayerScores, stats: Statistics,
        candidates: tuple[str, ...] = CANDIDATES,
    ) -> None:  # fmt: skip
        self.layout, self.keep, self.scores, self.stats, self.candidates = layout, keep, scores, stats, candidates
        self.held: list[int] = []
        self.last = -1  # the last trunk MoE layer: past it only the held-out batches run
        self._streams: list[list[torch.Tensor]] = []  # per distinct plan so far: the held-out hidden states
        self._of: dict[str, int] = {}  # candidate → its stream
        self.kept: dict[str, dict[int, tuple[int, ...]]] = {c: {} for c in candidates}
        self.kl: dict[str, float] = {}
        self.per_sequence: dict[str, np.ndarray] = {}  # candidate → mean KL of each held-out sequence
        self.winner: str | None = None

    def held_out(self, batches: int) -> list[int]:
        """The held-out batch positions of ``batches``: the last quarter (at least one, never all)."""
        count = min(max(1, batches // HELD_OUT), batches - 1)
        return list(range(batches - count, batches))

    def begin(self, walk: Walk) -> None:
        """Every candidate starts from the held-out batches' embedded hidden states (one shared stream)."""
        if walk.first or self.stats.halves:
            raise ValueError("plan trials need a fresh one-shot calibration")
        held = set(self.held_out(walk.count))
        self.held = [p for p, b in enumerate(walk.mine) if b in held]  # this rank's held-out batches
        self.last = max(walk.moe)
        self._streams = [[walk.store[b].clone() for b in self.held]]
        self._of = dict.fromkeys(self.candidates, 0)

    def stop(self, walk: Walk) -> int | None:
        return walk.runner.num_layers  # the whole model: the plans are measured on the logits

    def batches(self, walk: Walk, index: int) -> list[int] | None:
        return self.held if index > self.last else None  # the rest of the model, for the held-out batches only

    def after(self, walk: Walk, index: int, layer: torch.nn.Module) -> None:
        """Run decoder layer ``index`` (loaded) over every stream; an MoE layer routes each candidate's stream
        only to the experts that candidate keeps there, splitting streams whose candidates now disagree."""
        runner = walk.runner
        block = runner.parts.get(index)
        if block is None or index not in self.stats.halves:
            self._streams = self._forward(runner, index, layer, [(stream, None) for stream in self._streams])
            return
        groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
        for name in self.candidates:
            kept = select_one(self.layout, self.scores(name, index, self.stats), self.keep, layer=index)
            self.kept[name][index] = kept
            groups.setdefault((self._of[name], kept), []).append(name)
        for s, names in enumerate(groups.values()):
            self._of.update(dict.fromkeys(names, s))
        plans = [(self._streams[old], kept) for old, kept in groups]
        self._streams = self._forward(runner, index, layer, plans, block)

    def finish(self, walk: Walk) -> None:
        """Compare every stream's logits with the original's (the walk's stream after the last layer), over the
        ranks' held-out sequences, and choose the winner.

        The first candidate (``ean``, the best single criterion of the quality study) is kept unless another is
        better on the held-out sequences beyond their noise: its per-sequence KLs lower, paired, with the 95 %
        interval of the mean difference below zero. Among those the lowest mean KL wins. Closer calls are noise:
        at keep 75 % the held-out calibration text ranked plans within 0.003 KL the other way round from the
        held-out evaluation text (benchmarks/quality)."""
        runner, reference, ranks = walk.runner, walk.store, walk.ranks
        runner.load_head()
        totals = np.zeros(len(self._streams))
        per_sequence: list[list[float]] = [[] for _ in self._streams]
        tokens = 0
        for i, b in enumerate(self.held):
            original = reference[b]
            positions = torch.arange(original.shape[1])
            lo = torch.log_softmax(runner.logits(original, positions).float(), dim=-1)
            tokens += lo.shape[0] * lo.shape[1]
            for s, stream in enumerate(self._streams):
                lp = torch.log_softmax(runner.logits(stream[i], positions).float(), dim=-1)
                kl = (lo.exp() * (lo - lp)).sum(-1).clamp_min(0.0).double()  # (batch, seq)
                totals[s] += float(kl.sum())
                per_sequence[s] += kl.mean(-1).tolist()
        summed = ranks.sum(np.append(totals, tokens))
        totals, tokens = summed[:-1], int(summed[-1])
        gathered = ranks.gather(per_sequence)  # every rank's, in rank order: the same order for every stream
        sequences = [np.concatenate([np.asarray(part[s]) for part in gathered]) for s in range(len(self._streams))]
        self.kl = {name: float(totals[self._of[name]] / tokens) for name in self.candidates}
        self.per_sequence = {name: sequences[self._of[name]] for name in self.candidates}
        incumbent = self.candidates[0]
        better = [
            name for name in self.candidates if _below(sequences[self._of[name]] - sequences[self._of[incumbent]])
        ]
        self.winner = min(better, key=lambda name: (self.kl[name], self.candidates.index(name)), default=incumbent)

    def _forward(
        self, runner: LayerRunner, index: int, layer: torch.nn.Module,
        plans: Sequence[tuple[list[torch.Tensor], tuple[int, ...] | None]], block: MoeParts | None = None,
    ) -> list[list[torch.Tensor]]:  # fmt: skip
        """Each ``(stream, kept)`` of ``plans`` after the layer, routing only to ``kept`` (None: every expert), as
        new lists (a stream may feed several plans). Experts streamed from disk are read once for all of them."""

        def routing(kept: tuple[int, ...] | None) -> AbstractContextManager[object]:
            return mask_router(block, kept, self.layout.num_experts) if block is not None and kept else nullcontext()

        inputs = [(lambda h=h: h) for stream, _ in plans for h in stream]
        masks = [kept for stream, kept in plans for _ in stream]
        out = []
        with runner.replaying(index, layer, inputs, lambda k: routing(masks[k])), torch.no_grad():
            for stream, kept in plans:
                with routing(kept):
                    out.append([runner.run(index, layer, hidden).detach().to("cpu") for hidden in stream])
        return out


def _below(differences: np.ndarray) -> bool:
    """Whether the mean of paired ``differences`` is below zero with 95 % confidence (normal interval)."""
    n = len(differences)
    if n < 2:
        return False
    return float(differences.mean() + Z * differences.std(ddof=1) / np.sqrt(n)) < 0.0
