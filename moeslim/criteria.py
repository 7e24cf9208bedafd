"""Data-free importance scores per MoE layer and expert (higher means keep first).

Tensors are read one expert slice at a time straight from the shard's bytes (``floats.read_float``), so memory
stays at one slice and scoring needs no torch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from moeslim.calibrate.statistics import LayerStats, Statistics
from moeslim.errors import CheckpointError, PlanError
from moeslim.floats import read_float, read_rows
from moeslim.layout import Layout, MoeLayer, unread_experts
from moeslim.plan import check_finite_scores
from moeslim.quant import READABLE, quantization_config, unreadable
from moeslim.shards import FLOAT_DTYPES
from moeslim.source import Checkpoint

Scores = dict[int, np.ndarray]  # layer index → (experts,) float64


def router_norm(ckpt: Checkpoint, layout: Layout, seed: int | None = None) -> Scores:
    """L2 norm of each routed expert's router row ``||W_router[j]||``: rows on whichever dim the family keeps
    experts, and only the routed experts' (rows after them, LongCat-Flash's zero-computation experts', are kept
    by surgery but not scored)."""
    weight_name = layout.family.router_weight
    out = {}
    for layer in layout.layers:
        name = layer.block + weight_name
        w = _by_expert(layer, name, _read(ckpt, name), layout.num_experts)  # (experts, hidden) float32
        _check_finite_rows(w, layer.index, name)
        norms = np.sqrt(np.sum(np.square(w, dtype=np.float64), axis=1))  # (experts,) summed in float64
        out[layer.index] = norms.astype(np.float32).astype(np.float64)  # float32 norms, as the weights' precision
        check_finite_scores(out[layer.index], layer.index, "router-norm")
    return out


def weight_norm(ckpt: Checkpoint, layout: Layout, seed: int | None = None) -> Scores:
    """L2 norm of all of an expert's weights together (quantised ones dequantised), biases and scales excluded."""
    if quantization_config(ckpt.config):
        return _dequantised_weight_norm(ckpt, layout)
    out = {}
    for layer in layout.layers:
        sq = np.zeros(layout.num_experts)
        for j in range(layout.num_experts):
            for name in _weight_tensors(ckpt, layer, j):
                w = _read(ckpt, name) if layer.per_expert else _expert_slice(ckpt, layer, name, j, layout.num_experts)
                sq[j] += _finite_sq_norm(w, name, (layer.index, j))
        out[layer.index] = np.sqrt(sq)
        check_finite_scores(out[layer.index], layer.index, "weight-norm")
    return out


def _dequantised_weight_norm(ckpt: Checkpoint, layout: Layout) -> Scores:
    """``weight_norm`` of a quantised checkpoint: each expert's weights dequantised as calibration reads them
    (``stream/dequant.py``), one expert at a time."""
    if why := unread_experts(layout, ckpt.config):
        raise PlanError(f"weight-norm cannot score: {why}; use router-norm, or the model's per-expert release")
    method = unreadable(ckpt.config)
    if method:
        raise PlanError(f"weight-norm cannot dequantise {method} expert weights (it reads {READABLE}); use router-norm")
    from moeslim.stream.dequant import Reader, dense_items

    out = {}
    with Reader() as reader:
        for layer in layout.layers:
            sq = np.zeros(layout.num_experts)
            for j in range(layout.num_experts):
                names = layer.per_expert[j] if layer.per_expert else layer.fused
                ckpt.fetch(names)
                items = dense_items(ckpt, names)
                for item in items:
                    if _is_side_tensor(item.name) or _is_vector(layer, item.name, item.shape):
                        continue
                    if layer.per_expert or _regular(layer, item.name):
                        w = reader.dense(item, None if layer.per_expert else j).double().numpy()
                    else:  # experts off dim 0 or in blocks of rows: the whole tensor, then expert j's part
                        w = _by_expert(layer, item.name, reader.dense(item).double().numpy(), layout.num_experts)[j]
                    sq[j] += _finite_sq_norm(w, item.name, (layer.index, j))
            out[layer.index] = np.sqrt(sq)
            check_finite_scores(out[layer.index], layer.index, "weight-norm")
    return out


def random_scores(ckpt: Checkpoint, layout: Layout, seed: int | None = None) -> Scores:
    """Uniform random scores from ``numpy.random.default_rng([seed, layer])``: the baseline."""
    base = 0 if seed is None else seed
    return {i: np.random.default_rng([base, i]).random(layout.num_experts) for i in layout.moe_indices}


DATA_FREE: dict[str, Callable[[Checkpoint, Layout, int | None], Scores]] = {
    "router-norm": router_norm,
    "weight-norm": weight_norm,
    "random": random_scores,
}

# Calibrated criteria: per-layer scores from routing statistics (see moeslim/calibrate/capture.py).
CALIBRATED: dict[str, Callable[[LayerStats], np.ndarray]] = {
    "frequency": lambda s: s["count"],
    "gate-mass": lambda s: s["gate_mass"],
    "soft-mass": lambda s: s["soft_mass"],
    "ean": lambda s: s["ean"],
    "reap": lambda s: s.reap,
}
RECONSTRUCTION = "reconstruction"
AUTO = "auto"  # the candidates' plans measured during calibration, the best kept (calibrate/trials.py)
CRITERIA = [*DATA_FREE, *CALIBRATED, RECONSTRUCTION, AUTO]
# Chosen by the quality study (benchmarks/quality/README.md): no criterion is best at every keep on every trained
# fixture, so the default measures every candidate's plan during calibration and keeps the best;
# tests/test_quality_default.py holds this to the committed results.
DEFAULT_CRITERION = AUTO


def is_calibrated(criterion: str) -> bool:
    return criterion in CALIBRATED or criterion in (RECONSTRUCTION, AUTO)


def layer_scores(criterion: str, stats: Statistics, index: int, half: str | None = None) -> np.ndarray | None:
    """Scores of one trunk layer from statistics (one calibration half if given); None where undefined.

    Every score is finite: non-finite weights or corrupt statistics fail here, naming layer and expert.
    """
    if criterion == RECONSTRUCTION:
        scores = None if half else stats.reconstruction.get(index)
    elif index not in stats.halves:
        scores = None
    else:
        layer = stats.total(index) if half is None else stats.halves[index][half]
        scores = np.asarray(CALIBRATED[criterion](layer), dtype=np.float64)
    if scores is not None:
        check_finite_scores(scores, index, criterion)
    return scores


def calibrated_scores(criterion: str, stats: Statistics, ckpt: Checkpoint, layout: Layout) -> Scores:
    """Every MoE layer's scores; MTP layers (not run by transformers) fall back to router-norm."""
    fallback = router_norm(ckpt, layout) if any(layer.mtp for layer in layout.layers) else {}
    out = {}
    for layer in layout.layers:
        scores = None if layer.mtp else layer_scores(criterion, stats, layer.index)
        if scores is None and not layer.mtp:
            raise PlanError(f"the statistics hold no {criterion} scores for layer {layer.index}; recalibrate")
        out[layer.index] = fallback[layer.index] if scores is None else scores
    return out


def _read(ckpt: Checkpoint, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
    """A tensor (or its rows ``start:stop`` along dim 0) as float32; integer tensors are refused."""
    info = ckpt.tensors[name]
    if info.dtype not in FLOAT_DTYPES:
        raise PlanError(f"cannot score from {name}: it is {info.dtype}, not floating point; use --criterion random")
    ckpt.fetch([name])
    return read_float(info) if rows is None else read_rows(info, *rows)


def _by_expert(layer: MoeLayer, name: str, w: np.ndarray, experts: int) -> np.ndarray:
    """A router or fused tensor ``w`` as ``(experts, -1)``: each routed expert's block of rows along the dim that
    indexes experts, flattened; rows after the routed experts' (``MoeLayer.blocks``' extra rows) left out."""
    per, _ = layer.block_of(name)
    return np.moveaxis(w, layer.dim_of(name), 0)[: experts * per].reshape(experts, -1)


def _regular(layer: MoeLayer, name: str) -> bool:
    """Whether expert ``j`` of the fused tensor ``name`` is its row ``j`` along dim 0."""
    return layer.dim_of(name) == 0 and layer.block_of(name) == (1, 0)


def _expert_slice(ckpt: Checkpoint, layer: MoeLayer, name: str, j: int, experts: int) -> np.ndarray:
    """Expert ``j``'s part of the fused tensor ``name``: its block of rows read alone where experts are on dim 0,
    else cut from the whole tensor."""
    if layer.dim_of(name) == 0:
        per, _ = layer.block_of(name)
        return _read(ckpt, name, (j * per, (j + 1) * per))
    return _by_expert(layer, name, _read(ckpt, name), experts)[j]


def _weight_tensors(ckpt: Checkpoint, layer: MoeLayer, j: int) -> list[str]:
    names = layer.per_expert[j] if layer.per_expert else layer.fused
    weights = [n for n in names if not _is_side_tensor(n) and not _is_vector(layer, n, ckpt.tensors[n].shape)]
    for name in weights:
        if ckpt.tensors[name].dtype not in FLOAT_DTYPES:
            raise PlanError(
                f"weight-norm needs floating-point expert weights, but {name} is {ckpt.tensors[name].dtype}"
                " (not floating point); use --criterion router-norm"
            )
    return weights


def _is_vector(layer: MoeLayer, name: str, shape: tuple[int, ...]) -> bool:
    """Whether an expert's part of tensor ``name`` is a vector (a norm's weight, a bias), not a weight matrix: the
    same part whether the experts are stored one tensor each or fused (``[E, H]``), whatever it is named."""
    if layer.per_expert:
        return len(shape) < 2
    return len(shape) < 3 and layer.block_of(name)[0] == 1


def _is_side_tensor(name: str) -> bool:
    """Biases and quantisation scales are not weights for the weight norm."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "bias" or leaf.endswith("_bias") or "scale" in leaf or leaf in {"g_idx", "qzeros", "zeros"}


def _check_finite_rows(w: np.ndarray, index: int, name: str) -> None:
    """Refuse a router weight ``(experts, hidden)`` with a non-finite value, naming the first such expert."""
    rows = np.flatnonzero(~np.isfinite(w).reshape(w.shape[0], -1).all(axis=1))
    if rows.size:
        raise CheckpointError(
            f"layer {index}: the router weight {name} holds non-finite values for expert {rows[0]};"
            " the checkpoint is corrupt, re-download it"
        )


def _finite_sq_norm(w: np.ndarray, name: str, where: tuple[int, int]) -> float:
    """Squared L2 norm of ``w`` (summed in float64), refused when it holds a non-finite value."""
    if not np.isfinite(w).all():
        raise CheckpointError(
            f"layer {where[0]}: expert {where[1]} has non-finite values in {name};"
            " the checkpoint is corrupt, re-download it"
        )
    return float(np.sum(np.square(w, dtype=np.float64)))
