"""Routing statistics per MoE layer and expert, captured from the model's own routing.

The hook sits where the experts module receives the router's chosen indices and weights
(``experts(hidden (tokens, hidden), index (tokens, k), weight (tokens, k))`` in transformers 5.x), so
the statistics follow exactly what the model routes: sigmoid scores, correction bias, groups and scaling
included. Expert outputs are computed for routed tokens only, through the experts module itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import cast

import numpy as np
import torch

# The numpy data they fill live in statistics.py (no torch); importable from here too, their first home.
from moeslim.calibrate.statistics import FIELDS, HALVES, LayerStats, Statistics  # noqa: F401
from moeslim.stream.chunks import one_expert_each, pair_norms
from moeslim.stream.masking import router_logits
from moeslim.stream.modules import MoeParts, takes_routing


@contextlib.contextmanager
def collect(parts: MoeParts, stats: LayerStats, scoring: str) -> Iterator[None]:
    """While active, every forward of the MoE block of ``parts`` adds its routing statistics to ``stats``."""
    experts, router = parts.experts, parts.router

    def on_experts(module: torch.nn.Module, args: tuple) -> None:
        hidden, index, weight = args[:3]
        hidden = hidden.reshape(-1, hidden.shape[-1])  # DBRX's experts get (batch, seq, hidden) and flatten them
        swept = pair_norms(module)  # experts streamed in chunks: their outputs' norms come from the sweep
        norms = (lambda: swept) if swept is not None else (lambda: _routed_outputs(module, hidden, index))
        _add_routed(stats, index, weight, norms)

    def on_logits(out: torch.Tensor) -> torch.Tensor:
        logits = out.reshape(-1, out.shape[-1]).float()  # (tokens, rows): the router's own logits
        probs = torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, dim=-1)
        stats.arrays["soft_mass"] += probs.sum(0)[: stats.num_experts].double().cpu().numpy()  # not extra rows
        stats.tokens += logits.shape[0]
        return out

    def on_dense_router(module: torch.nn.Module, args: tuple, output: tuple) -> None:
        # Llama-4: the router returns (scores (tokens, experts), logits); experts then run on every token
        # with inputs scaled by the scores, so routing is read here and outputs computed per routed token.
        scores, logits = output
        index = torch.topk(logits, cast(int, module.top_k), dim=-1).indices  # the router's own choice (tokens, k)
        hidden = args[0].reshape(-1, args[0].shape[-1])
        pairs = index.reshape(-1)  # token-major (token, choice) pairs
        rows = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(index.shape[1])
        _add_routed(stats, index, scores.gather(1, index), lambda: _dense_expert(experts, hidden[rows], pairs))

    handles = [
        experts.register_forward_pre_hook(on_experts)
        if takes_routing(experts)
        else router.register_forward_hook(on_dense_router),
    ]
    try:
        with router_logits(parts, on_logits):
            yield
    finally:
        for h in handles:
            h.remove()


def _dense_expert(experts: torch.nn.Module, hidden: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """``(rows,)`` norms ``||f_j(x_t)||`` for expert ``j = choice[t]``, stacked ``(E, H, 2I)`` weights."""
    out = torch.empty_like(hidden)
    gate_up_proj: torch.Tensor = experts.gate_up_proj  # type: ignore[assignment]
    down_proj: torch.Tensor = experts.down_proj  # type: ignore[assignment]
    for j in choice.unique().tolist():
        rows = choice == j
        gate, up = (hidden[rows] @ gate_up_proj[j]).chunk(2, dim=-1)
        out[rows] = (up * cast(Callable, experts.act_fn)(gate)) @ down_proj[j]
    return torch.linalg.vector_norm(out.double(), dim=-1)


PAIRS_PER_CALL = 8192  # (token, expert) pairs per experts call: bounds the (pairs, hidden) buffer


def _routed_outputs(experts: torch.nn.Module, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(tokens·k, hidden)``: each routed (token, expert) pair's unweighted output, token-major, computed by
    the experts module itself with every pair as a token routed to that one expert with weight 1."""
    k = index.shape[1]
    pairs = index.reshape(-1, 1)  # (tokens·k, 1)
    out = []
    for start in range(0, pairs.shape[0], PAIRS_PER_CALL):
        chosen = pairs[start : start + PAIRS_PER_CALL]
        rows = hidden[torch.arange(start, start + chosen.shape[0], device=hidden.device) // k]
        output = one_expert_each(experts, rows, chosen)
        out.append(torch.linalg.vector_norm(output.reshape(-1, output.shape[-1]).double(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def _add_routed(
    stats: LayerStats, index: torch.Tensor, weight: torch.Tensor, routed_norms: Callable[[], torch.Tensor]
) -> None:
    """Add one forward's statistics: ``index``/``weight`` ``(tokens, k)``; ``routed_norms()`` gives
    ``(tokens·k,)`` ``||f_j(t)||`` of each routed pair, token-major like ``index.reshape(-1)``."""
    e = stats.num_experts
    flat_index = index.reshape(-1)
    routed = flat_index < e  # choices beyond the routed experts (zero-computation experts) are not scored
    flat_index = flat_index[routed]
    flat_weight = weight.reshape(-1).double()[routed]
    norms = routed_norms()[routed]
    add = stats.arrays
    add["count"] += torch.bincount(flat_index, minlength=e).double().cpu().numpy()
    add["gate_mass"] += _scatter(flat_index, flat_weight, e)
    add["ean"] += _scatter(flat_index, norms, e)
    add["reap_sum"] += _scatter(flat_index, flat_weight * norms, e)


def _scatter(index: torch.Tensor, values: torch.Tensor, n: int) -> np.ndarray:
    return torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, index, values).cpu().numpy()
