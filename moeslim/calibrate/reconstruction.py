"""The reconstruction criterion (NAEE): keep the experts whose removal changes the MoE output least.

For a sample of the layer's input tokens, every expert's output is computed once by the experts module;
the output with a set S kept is then the router's own choice among S (dropped experts masked to ``-inf``
before its top-k and normalisation) weighting those outputs. Experts are removed greedily, each time the
one whose removal keeps the output closest to the full one; the removal order is the score.

A greedy step weighs every candidate removal at once (``_Batched``): the router's logits do not depend on the
kept set and are computed once; its own forward (the family's scoring, grouping, top-k, normalisation, scaling)
runs once per group of candidates on their rows stacked, each candidate's rows under its own mask on the logits
and on the selection biases (``masked_rows``). A token whose routing (weights and indices) a removal leaves as it
is keeps its output bit for bit, so only the changed tokens' weighted sums are recomputed. Groups are sized so that
no temporary exceeds ``BUDGET``. The errors, and so the removal order, are those of calling the router once per
candidate (``_Sequential``) bit for bit where every row op is (CPU, float32: tests/test_reconstruction_batched.py).

Batching relies on the router treating rows independently, reading its input only through its logit matmul and
adding each bias to ``(tokens, experts)`` scores; each layer checks that on a few masks against ``mask_router``
before its search, and searches one candidate at a time where it does not hold. Under transformers 5.16 and 5.25
every family the criterion runs on holds (LongCat-Flash's router, which adds its bias as ``bias.unsqueeze(0)``,
would not; the criterion stops before, at its zero-computation experts, as it did before batching).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from moeslim.layout import Routing
from moeslim.stream.chunks import ExpertChunks, Resident
from moeslim.stream.masking import mask_router, masked_rows, router_logits
from moeslim.stream.modules import MoeParts, choice_of
from moeslim.stream.ranks import SINGLE, Ranks

BUDGET = 256 * 2**20  # bytes of the largest temporary one group of candidates makes: its (rows, hidden) tensors
# bytes of the (tokens, hidden) temporaries of one piece of tokens mixed: a few passes over each, which stay in cache
# at this size (at OLMoE's hidden 4096, a token took 1.3 times as long in 16 MB pieces and 3 times in 256 MB ones)
PIECE = 4 * 2**20


class ReconstructionSampler:
    """Keeps up to ``max_tokens`` of an MoE block's input and scores experts by greedy reconstruction."""

    def __init__(self, parts: MoeParts, max_tokens: int, experts: Resident | ExpertChunks) -> None:
        self.parts, self.max_tokens, self.access = parts, max_tokens, experts
        self.router, self.experts = parts.router, parts.experts
        self._inputs: list[torch.Tensor] = []
        self._router_args: tuple = ()
        self._ndim = 2  # of the router's input as its block passes it (AfMoE's takes (batch, tokens, hidden))

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        def on_router(module: torch.nn.Module, args: tuple) -> None:
            hidden = args[0].reshape(-1, args[0].shape[-1])
            room = self.max_tokens - sum(x.shape[0] for x in self._inputs)
            self._inputs.append(hidden[: max(room, 0)].detach().clone())  # one entry per call, maybe empty
            self._router_args = args[1:]  # e.g. MiniMax passes its correction bias: a live buffer
            self._ndim = args[0].ndim

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
        return greedy(search_of(self.parts, x, self._router_args, self._ndim, outputs), routing)

    def _expert_output(self, x: torch.Tensor, j: int) -> torch.Tensor:
        index = torch.full((x.shape[0], 1), j, dtype=torch.long, device=x.device)
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        return type(self.experts).forward(self.experts, x, index, ones).float()


class Search(Protocol):
    """The errors of candidate removals from a kept set: ``||full − output without j||`` averaged over tokens."""

    def errors(self, kept: list[int], candidates: list[int]) -> list[float]: ...

    def keep(self, kept: list[int]) -> None:
        """The search goes on from ``kept`` (the last kept set less one expert)."""


def greedy(search: Search, routing: Routing) -> np.ndarray:
    """``(experts,)``: experts removed one at a time, each time the removable one of least error (the lower index
    on a tie); an expert's score is the step it is removed at, a survivor's the experts' count plus its error."""
    e = routing.num_experts
    kept, score = list(range(e)), np.zeros(e)
    for step in range(e - routing.top_k):
        removable = [j for j in kept if _removable(kept, j, routing)]
        if not removable:
            break
        _, worst = min(zip(search.errors(kept, removable), removable, strict=True))
        kept.remove(worst)
        search.keep(kept)
        score[worst] = step
    score[kept] = e + np.asarray(search.errors(kept, kept))
    return score


def _removable(kept: list[int], j: int, routing: Routing) -> bool:
    """Grouped routers need ``min_per_group`` experts left in every group."""
    if routing.n_group == 1:
        return True
    size = routing.num_experts // routing.n_group
    left = sum(1 for i in kept if i // size == j // size)
    return left > routing.family.min_per_group


def search_of(parts: MoeParts, x: torch.Tensor, args: tuple, ndim: int, outputs: torch.Tensor) -> Search:
    """The batched search over tokens ``x`` ``(tokens, hidden)`` with every expert's ``outputs`` ``(experts,
    tokens, hidden)``, where it routes as the router called once per kept set does; the sequential one elsewhere.
    The router is called with ``args`` after the tokens, and the tokens as ``ndim`` dims (the block's way)."""
    e = outputs.shape[0]
    logits: list[torch.Tensor] = []

    def record(out: torch.Tensor) -> torch.Tensor:
        logits.append(out)
        return out

    with mask_router(parts, tuple(range(e)), e), router_logits(parts, record):  # records before masking
        weight, index = route(parts, x, args, ndim)
    full = mixture(weight, index, outputs, torch.arange(x.shape[0], device=x.device))
    sequential = _Sequential(parts, x, (args, ndim), outputs, full)
    batched = _Batched(parts, x[:1], (args, ndim), outputs, full, logits[-1], (weight, index))
    return batched if _routes_alike(batched, sequential, e) else sequential


def _routes_alike(batched: _Batched, sequential: _Sequential, e: int) -> bool:
    """Whether the batched router gives the routing of one call per kept set, bit for bit, with no expert, the
    first and the last dropped (a router that reshapes or indexes its biases otherwise fails or differs here)."""
    masks = torch.zeros(3, e, device=batched.full.device)
    masks[1, 0] = masks[2, e - 1] = float("-inf")
    try:
        weight, index = batched.route(masks)
    except Exception:  # noqa: BLE001 - a router whose code cannot take per-row biases fails in its own way
        return False
    for c, dropped in enumerate(((), (0,), (e - 1,))):
        w, i = sequential.route(tuple(j for j in range(e) if j not in dropped))
        if not (torch.equal(weight[c], w) and torch.equal(index[c], i)):
            return False
    return True


def route(parts: MoeParts, rows: torch.Tensor, args: tuple, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, index)`` ``(rows, k)``: the router's choice for ``rows`` ``(rows, hidden)``, passed as ``ndim``
    dims, then ``args``."""
    lead = (1,) * (ndim - 2)
    weight, index = choice_of(parts.router(rows.reshape(*lead, *rows.shape), *args))
    return weight.reshape(rows.shape[0], -1), index.reshape(rows.shape[0], -1)


def mixture(weight: torch.Tensor, index: torch.Tensor, outputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``(R, hidden)``: the MoE output of tokens ``rows`` routed to ``index`` with ``weight`` ``(R, k)``: each
    choice's product, summed in choice order (the same float operations for a token whichever tokens are computed
    with it). In place on the gathered rows: the old ``sum`` of products, bit for bit, in half the time or less."""
    flat = outputs.view(-1, outputs.shape[-1])  # (experts · tokens, hidden): a view, never a copy
    at = index * outputs.shape[1] + rows[:, None]  # (R, k) rows of flat
    out = flat.index_select(0, at[:, 0]).mul_(weight[:, 0, None].float())
    for p in range(1, index.shape[1]):
        out.add_(flat.index_select(0, at[:, p]).mul_(weight[:, p, None].float()))
    return out


def distances(
    full: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, outputs: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """``(R,)``: ``||full − output||`` of tokens ``rows`` routed to ``index`` with ``weight`` ``(R, k)``, computed
    ``PIECE`` bytes of rows at a time."""
    out = torch.empty(len(rows), device=full.device)
    for piece in torch.arange(len(rows), device=rows.device).split(max(1, PIECE // (full.shape[-1] * 4))):
        mixed = mixture(weight[piece], index[piece], outputs, rows[piece])  # (piece, hidden)
        out[piece] = torch.linalg.vector_norm(full[rows[piece]] - mixed, dim=-1)
    return out


class _Sequential:
    """One router call per candidate: the reference, and the search where batching is not exact."""

    def __init__(self, parts: MoeParts, x: torch.Tensor, call: tuple[tuple, int], outputs: torch.Tensor,
                 full: torch.Tensor) -> None:  # fmt: skip
        self.parts, self.x, self.call, self.outputs, self.full = parts, x, call, outputs, full

    def route(self, kept: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, index)`` ``(tokens, k)`` when only ``kept`` can be chosen."""
        with mask_router(self.parts, kept, self.outputs.shape[0]):
            return route(self.parts, self.x, *self.call)

    def errors(self, kept: list[int], candidates: list[int]) -> list[float]:
        return [self._error(tuple(i for i in kept if i != j)) for j in candidates]

    def keep(self, kept: list[int]) -> None:
        pass

    def _error(self, without: tuple[int, ...]) -> float:
        weight, index = self.route(without)
        rows = torch.arange(self.x.shape[0], device=self.x.device)
        return float(distances(self.full, weight, index, self.outputs, rows).mean())


class _Batched:
    """Every candidate of a step in one router forward per group; only the tokens whose routing changes are mixed.

    Holds the current kept set's routing ``(tokens, k)`` and each token's error ``(tokens,)`` against the full
    output, which a candidate that leaves a token's routing as it is shares."""

    def __init__(
        self, parts: MoeParts, row: torch.Tensor, call: tuple[tuple, int], outputs: torch.Tensor,
        full: torch.Tensor, logits: torch.Tensor, routing: tuple[torch.Tensor, torch.Tensor],
    ) -> None:  # fmt: skip
        self.parts, self.row, self.outputs, self.full, self.logits = parts, row, outputs, full, logits
        self.args, self.ndim = call
        self.weight, self.index = routing
        tokens, hidden = full.shape
        self.norms = torch.zeros(tokens, device=full.device)
        self.group = max(1, BUDGET // (max(tokens, 1) * max(hidden, logits.shape[-1]) * 4))  # float32 rows

    def route(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, index)`` ``(C, tokens, k)`` under each of the ``C`` masks ``(C, experts)`` (0 or -inf)."""
        c, tokens = masks.shape[0], self.logits.shape[0]
        stand_in = self.row.expand(c * tokens, -1)  # rows of the right shape: masked_rows does not read them
        with masked_rows(self.parts, self.logits, masks, self.args) as args:
            weight, index = route(self.parts, stand_in, args, self.ndim)
        return weight.reshape(c, tokens, -1), index.reshape(c, tokens, -1)

    def errors(self, kept: list[int], candidates: list[int]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(candidates), self.group):
            group = candidates[start : start + self.group]
            masks = self._mask(kept).repeat(len(group), 1)
            masks[range(len(group)), group] = float("-inf")
            out += [float(norms.mean()) for norms in self._norms(masks)[2]]
        return out

    def keep(self, kept: list[int]) -> None:
        weight, index, norms = self._norms(self._mask(kept)[None])
        self.weight, self.index, self.norms = weight[0], index[0], norms[0]

    def _mask(self, kept: list[int]) -> torch.Tensor:
        """``(experts,)``: 0 for the ``kept``, -inf for the others."""
        mask = torch.full((self.outputs.shape[0],), float("-inf"), device=self.full.device)
        mask[kept] = 0
        return mask

    def _norms(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routing ``(C, tokens, k)`` under ``masks`` and each token's ``||full − output||`` ``(C, tokens)``."""
        weight, index = self.route(masks)
        changed = ((weight != self.weight) | (index != self.index)).any(dim=-1)  # (C, tokens)
        norms = self.norms.expand_as(changed).clone()
        c, t = changed.nonzero(as_tuple=True)
        norms[c, t] = distances(self.full, weight[c, t], index[c, t], self.outputs, t)
        return weight, index, norms
