"""Original and pruned models side by side, one decoder layer resident at a time.

Each model has its own ``LayerRunner`` and its own stream of hidden states. For layer i the original's
layer is loaded, run over all batches and unloaded, then the pruned model's, so one decoder layer is in
memory at a time, plus both streams of hidden states (the input embeddings are dropped once the tokens are
embedded). After each MoE layer the relative error ``‖h_pruned − h_original‖ / ‖h_original‖`` of the two streams is
recorded: it is cumulative, since each model runs on its own outputs. At the end both heads (final norm,
``lm_head``) run chunk by chunk over the positions that have a next token, so ``(tokens × vocab)`` logits are
never all in memory. A non-finite result (float16 overflow, say) is an error, never a reported NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from moeslim.errors import CheckpointError, DeviceError
from moeslim.stream.activations import Activations
from moeslim.stream.loop import Observer, Walk, walk
from moeslim.stream.ranks import SINGLE, Ranks
from moeslim.stream.runner import LayerRunner
from moeslim.validate.metrics import RelativeError, TokenMetrics, position_chunks

if TYPE_CHECKING:
    from moeslim.validate.reference import Reference


@dataclass(frozen=True)
class Comparison:
    metrics: dict[str, float]  # kl_mean, kl_p95, top1_agreement, perplexities, scored_tokens
    layer_errors: dict[int, float]  # MoE layer index → cumulative relative error of its output
    per_sequence: dict[str, list[float]]  # kl, nll_original, nll_pruned: each sequence's mean, in order


class Pruned(Observer):
    """The pruned model as an observer of the original's walk: its own stream of hidden states runs each layer
    once the original's layer is unloaded (so one decoder layer is resident at a time), the relative error of
    the two streams is taken after each MoE layer, and both heads score the tokens at the end."""

    def __init__(self, runner: LayerRunner) -> None:
        self.runner = runner
        self.store: Activations | None = None
        self.errors: dict[int, float] = {}
        self.metrics = TokenMetrics()

    def begin(self, walk: Walk) -> None:
        self.store = self.runner.embed(walk.tokens, walk.batch_size, only=walk.mine)
        self.runner.unload_embedding()

    def stop(self, walk: Walk) -> int | None:
        return walk.runner.num_layers

    def unloaded(self, walk: Walk, index: int) -> None:
        assert self.store is not None
        with self.runner.loaded(index) as layer:
            self.runner.forward(index, layer, self.store)
        if index in walk.moe:
            self.errors[index] = relative_error(walk.store, self.store, walk.ranks)
            require_finite({"relative_error": self.errors[index]}, f"after layer {index}", walk.runner.dtype)

    def finish(self, walk: Walk) -> None:
        assert self.store is not None
        walk.runner.load_head()
        self.runner.load_head()
        self.metrics = score(walk.runner, self.runner, walk.tokens, walk.batch_size, walk.store, self.store, walk.mine)


def compare(
    original: LayerRunner, pruned: LayerRunner, tokens: torch.Tensor, batch_size: int, ranks: Ranks = SINGLE
) -> Comparison:
    """Run both models over ``tokens`` ``(samples, seq_len)`` in one walk of the original's layers; see the
    module docstring. With several ``ranks`` each runs its share of the batches, and every rank ends with the
    metrics of all of them."""
    side = Pruned(pruned)
    walk(original, tokens, batch_size, [side], ranks=ranks, desc="validating")
    metrics = TokenMetrics.merge(ranks.gather(side.metrics))
    summary = metrics.summary()
    require_finite(summary, "from the logits", original.dtype)
    return Comparison(summary, side.errors, metrics.per_sequence())


class Against(Observer):
    """The pruned model's walk compared with the source's hidden states that a ``Reference`` kept (computed in
    ``slim``'s calibration pass): the same errors and metrics as ``Pruned`` beside a walk of the source, without
    reading the source again. Both heads are the pruned model's: surgery copies the source's head unchanged."""

    def __init__(self, reference: Reference) -> None:
        self.reference = reference
        self.errors: dict[int, float] = {}
        self.metrics = TokenMetrics()

    def stop(self, walk: Walk) -> int | None:
        return walk.runner.num_layers

    def after(self, walk: Walk, index: int, layer: torch.nn.Module) -> None:
        if index in walk.moe:
            original = self.reference.states(index)
            error = RelativeError()
            for k in range(len(walk.store)):
                error.add(original[k], walk.store[k])
            self.errors[index] = error.value
            require_finite({"relative_error": self.errors[index]}, f"after layer {index}", walk.runner.dtype)

    def finish(self, walk: Walk) -> None:
        runner = walk.runner
        runner.load_head()
        self.metrics = score(runner, runner, walk.tokens, walk.batch_size, self.reference.final, walk.store, walk.mine)


def compare_with(reference: Reference, pruned: LayerRunner) -> Comparison:
    """``compare`` of the source and ``pruned`` over the reference's tokens, in one process, the source's side
    taken from ``reference``."""
    side = Against(reference)
    walk(pruned, reference.tokens, reference.batch_size, [side], desc="validating")
    summary = side.metrics.summary()
    require_finite(summary, "from the logits", pruned.dtype)
    return Comparison(summary, side.errors, side.metrics.per_sequence())


def require_finite(values: dict[str, float], where: str, dtype: torch.dtype) -> None:
    """Raise when a metric is NaN or infinite: the computation overflowed ``dtype``, or the model is broken."""
    bad = {k: v for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
    if not bad:
        return
    what = ", ".join(f"{k} {v}" for k, v in bad.items())
    name = str(dtype).removeprefix("torch.")
    if dtype != torch.float32:
        raise DeviceError(f"validation computed non-finite values ({what}) {where} in {name}: the activations"
                          " overflow that dtype; rerun with --dtype float32")  # fmt: skip
    raise CheckpointError(f"validation computed non-finite values ({what}) {where}, even in float32: the model's"
                          " activations overflow; the checkpoint's weights are probably broken")  # fmt: skip


def relative_error(a: Activations, b: Activations, ranks: Ranks = SINGLE) -> float:
    error = RelativeError()
    for k in range(len(a)):
        error.add(a[k], b[k])
    error.diff, error.norm = (float(x) for x in ranks.sum(np.array([error.diff, error.norm])))
    return error.value


def score(
    original: LayerRunner,
    pruned: LayerRunner,
    tokens: torch.Tensor,
    batch_size: int,
    a: Activations,
    b: Activations,
    batches: list[int],
) -> TokenMetrics:
    """Next-token metrics of every position but the last of each sequence, in the same chunks for both models;
    ``a`` and ``b`` hold the hidden states of ``batches``."""
    metrics = TokenMetrics()
    vocab = int(original.model.config.get_text_config().vocab_size)
    for k, start in enumerate(batch * batch_size for batch in batches):
        ids = tokens[start : start + batch_size]
        rows = torch.arange(start, start + ids.shape[0])
        for positions in position_chunks(ids.shape[1] - 1, ids.shape[0], vocab):
            logits_a = original.logits(a[k], positions)  # (batch, positions, vocab)
            logits_b = pruned.logits(b[k], positions)
            metrics.add(logits_a, logits_b, ids[:, positions + 1], rows)
    return metrics
