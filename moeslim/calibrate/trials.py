"""``--criterion auto``: every candidate criterion's plan measured in the calibration stream, the best one kept.

No single criterion is best at every sparsity and on every model (benchmarks/quality), so the default measures.
The last quarter of the calibration batches is *held out*: while the statistics pass runs each decoder layer
over all batches of the original model, the same loaded layer also runs the held-out batches once per candidate
plan, routing only to that plan's kept experts (the candidates' kept sets for a layer are known as soon as its
statistics are). Candidates whose plans agree so far share one stream, so the extra compute is at most the
number of distinct plans × a quarter of the tokens. After the last layer, each stream's logits are compared
with the original's: the plan with the lowest mean KL(original ‖ pruned) per token wins. Weights are read
once, one layer at a time, as in a plain calibration.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch

from moeslim.calibrate.masking import mask_router
from moeslim.calibrate.ranks import SINGLE, Ranks
from moeslim.calibrate.statistics import Statistics
from moeslim.engine.modules import MoeParts
from moeslim.layout import Layout
from moeslim.plan import select_one

if TYPE_CHECKING:
    from moeslim.calibrate.runner import Activations, LayerRunner

#: The criteria ``auto`` measures, in the order that breaks ties (equal KL means equal plans in practice).
CANDIDATES = ("ean", "reap", "gate-mass", "frequency", "router-norm", "weight-norm")
HELD_OUT = 4  # one batch in HELD_OUT (at least one) is held out, the last ones

LayerScores = Callable[[str, int, Statistics], np.ndarray]  # (criterion, layer index, statistics) → scores


class PlanTrials:
    """Candidate plans streamed beside a calibration pass (``collect.calibrate_layers(trials=...)``)."""

    def __init__(self, layout: Layout, keep: int, scores: LayerScores, candidates: tuple[str, ...] = CANDIDATES):
        self.layout, self.keep, self.scores, self.candidates = layout, keep, scores, candidates
        self.held: list[int] = []
        self._streams: list[list[torch.Tensor]] = []  # per distinct plan so far: the held-out hidden states
        self._of: dict[str, int] = {}  # candidate → its stream
        self.kept: dict[str, dict[int, tuple[int, ...]]] = {c: {} for c in candidates}
        self.kl: dict[str, float] = {}
        self.winner: str | None = None

    def held_out(self, batches: int) -> list[int]:
        """The held-out batch positions of ``batches``: the last quarter (at least one, never all)."""
        count = min(max(1, batches // HELD_OUT), batches - 1)
        return list(range(batches - count, batches))

    def start(self, store: Activations, held: list[int]) -> None:
        """Every candidate starts from the held-out batches' embedded hidden states (one shared stream); ``held``:
        their positions in ``store`` (this rank's held-out batches)."""
        self.held = held
        self._streams = [[store[b].clone() for b in self.held]]
        self._of = dict.fromkeys(self.candidates, 0)

    def advance(self, runner: LayerRunner, index: int, layer: torch.nn.Module, stats: Statistics) -> None:
        """Run decoder layer ``index`` (loaded) over every stream; an MoE layer routes each candidate's stream
        only to the experts that candidate keeps there, splitting streams whose candidates now disagree."""
        block = runner.parts.get(index)
        if block is None or index not in stats.halves:
            self._streams = [self._forward(runner, index, layer, stream) for stream in self._streams]
            return
        groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
        for name in self.candidates:
            kept = select_one(self.layout, self.scores(name, index, stats), self.keep, layer=index)
            self.kept[name][index] = kept
            groups.setdefault((self._of[name], kept), []).append(name)
        streams: list[list[torch.Tensor]] = []
        for (old, kept), names in groups.items():
            self._of.update(dict.fromkeys(names, len(streams)))
            streams.append(self._forward(runner, index, layer, self._streams[old], block, kept))
        self._streams = streams

    def finish(self, runner: LayerRunner, reference: Activations, ranks: Ranks = SINGLE) -> str:
        """Compare every stream's logits with the original's (``reference``: the original model's hidden states
        after the last layer), summed over the ranks; returns the winning candidate."""
        runner.load_head()
        totals = np.zeros(len(self._streams))
        tokens = 0
        for i, b in enumerate(self.held):
            original = reference[b]
            positions = torch.arange(original.shape[1])
            lo = torch.log_softmax(runner.logits(original, positions).float(), dim=-1)
            tokens += lo.shape[0] * lo.shape[1]
            for s, stream in enumerate(self._streams):
                lp = torch.log_softmax(runner.logits(stream[i], positions).float(), dim=-1)
                totals[s] += float((lo.exp() * (lo - lp)).sum(-1).clamp_min(0.0).double().sum())
        summed = ranks.sum(np.append(totals, tokens))
        totals, tokens = summed[:-1], int(summed[-1])
        self.kl = {name: float(totals[self._of[name]] / tokens) for name in self.candidates}
        self.winner = min(self.candidates, key=lambda name: (self.kl[name], self.candidates.index(name)))
        return self.winner

    def _forward(
        self, runner: LayerRunner, index: int, layer: torch.nn.Module, stream: list[torch.Tensor],
        block: MoeParts | None = None, kept: tuple[int, ...] | None = None,
    ) -> list[torch.Tensor]:  # fmt: skip
        """``stream`` after the layer (a new list: ``stream`` itself may feed other plans too)."""
        routing = mask_router(block, kept, self.layout.num_experts) if block is not None and kept else nullcontext()
        out = []
        with routing, torch.no_grad():
            for hidden in stream:
                result = layer(hidden.to(runner.device), **runner.layer_kwargs(hidden.shape[0], index))
                out.append((result[0] if isinstance(result, tuple) else result).detach().to("cpu"))
        return out
