"""The reconstruction criterion (NAEE): keep the experts whose removal changes the MoE output least.

For a sample of the layer's input tokens, every expert's output is computed once by the experts module;
the output with a set S kept is then the router's own choice among S (dropped experts masked to ``-inf``
before its top-k and normalisation) weighting those outputs. Experts are removed greedily, each time the
one whose removal keeps the output closest to the full one; the removal order is the score.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from moeslim.layout import Routing
from moeslim.stream.chunks import ExpertChunks, Resident
from moeslim.stream.masking import mask_router
from moeslim.stream.modules import MoeParts, choice_of
from moeslim.stream.ranks import SINGLE, Ranks


class ReconstructionSampler:
    """Keeps up to ``max_tokens`` of an MoE block's input and scores experts by greedy reconstruction."""

    def __init__(self, parts: MoeParts, max_tokens: int, experts: Resident | ExpertChunks) -> None:
        self.parts, self.max_tokens, self.access = parts, max_tokens, experts
        self.router, self.experts = parts.router, parts.experts
        self._inputs: list[torch.Tensor] = []
        self._router_args: tuple = ()

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        def on_router(module: torch.nn.Module, args: tuple) -> None:
            hidden = args[0].reshape(-1, args[0].shape[-1])
            room = self.max_tokens - sum(x.shape[0] for x in self._inputs)
            self._inputs.append(hidden[: max(room, 0)].detach().clone())  # one entry per call, maybe empty
            self._router_args = args[1:]  # e.g. MiniMax passes its correction bias: a live buffer

        handle = self.router.register_forward_pre_hook(on_router)
        try:
            yield
        finally:
            handle.remove()

    def share(self, batches: list[int], ranks: Ranks) -> None:
        """Under several ``ranks``, where each ran ``batches`` (global indices, one router call each, in order):
        the sample becomes the first ``max_tokens`` of all ranks' batches in global order, as one process takes."""
        if ranks.world == 1:
            return
        gathered = ranks.gather(list(zip(batches, self._inputs, strict=True)))
        inputs = sorted((pair for part in gathered for pair in part), key=lambda pair: pair[0])
        self._inputs = []
        for _, x in inputs:
            room = self.max_tokens - sum(t.shape[0] for t in self._inputs)
            self._inputs.append(x[: max(room, 0)])

    @torch.no_grad()
    def scores(self, routing: Routing, ranks: Ranks = SINGLE) -> np.ndarray | None:
        """``(experts,)``: the later an expert is removed by greedy elimination, the higher its score; computed by
        rank 0 (None elsewhere), from every expert's outputs (under expert parallel, each rank's own, gathered)."""
        if not (ranks.leader or self.access.parallel):
            return None
        x = torch.cat(self._inputs)  # (tokens, hidden)
        e = routing.num_experts
        outputs = torch.empty(e, *x.shape, device=x.device)  # (experts, tokens, hidden)
        own = {}
        for chunk in self.access.chunks(range(e)):  # experts streamed from disk are read a chunk at a time
            for j in chunk.experts:
                outputs[j] = own[j] = self._expert_output(x, chunk.local(j))
        if self.access.parallel:
            for part in ranks.gather(own if not ranks.leader else {}):
                for j, output in part.items():
                    outputs[j] = output
            if not ranks.leader:
                return None
        full = self._output(x, outputs, tuple(range(e)), e)
        kept, score = list(range(e)), np.zeros(e)
        for step in range(e - routing.top_k):
            errors = {j: self._error(x, outputs, full, kept, j) for j in kept if self._removable(kept, j, routing)}
            if not errors:
                break
            worst = min(errors, key=lambda j: (errors[j], j))
            kept.remove(worst)
            score[worst] = step
        for j in kept:  # never removed: rank the survivors by the error their removal would cause
            score[j] = e + self._error(x, outputs, full, kept, j)
        return score

    def _expert_output(self, x: torch.Tensor, j: int) -> torch.Tensor:
        index = torch.full((x.shape[0], 1), j, dtype=torch.long, device=x.device)
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        return type(self.experts).forward(self.experts, x, index, ones).float()

    def _output(self, x: torch.Tensor, outputs: torch.Tensor, kept: tuple[int, ...], experts: int) -> torch.Tensor:
        """Routed MoE output ``(tokens, hidden)`` when only ``kept`` of the ``experts`` can be chosen."""
        with mask_router(self.parts, kept, experts):
            weight, index = choice_of(self.router(x, *self._router_args))  # (tokens, k) each
        rows = torch.arange(x.shape[0], device=x.device)
        return sum(weight[:, p, None].float() * outputs[index[:, p], rows] for p in range(index.shape[1]))

    def _error(self, x: torch.Tensor, outputs: torch.Tensor, full: torch.Tensor, kept: list[int], j: int) -> float:
        without = tuple(i for i in kept if i != j)
        error = full - self._output(x, outputs, without, outputs.shape[0])
        return float(torch.linalg.vector_norm(error, dim=-1).mean())

    @staticmethod
    def _removable(kept: list[int], j: int, routing: Routing) -> bool:
        """Grouped routers need ``min_per_group`` experts left in every group."""
        if routing.n_group == 1:
            return True
        size = routing.num_experts // routing.n_group
        left = sum(1 for i in kept if i // size == j // size)
        return left > routing.family.min_per_group
