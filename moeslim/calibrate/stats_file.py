"""The statistics file: ``stats.safetensors`` (float64 arrays) and ``stats.json`` (identity, provenance).

Written after every calibrated layer (atomically), so an interrupted calibration resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from moeslim import jsonio
from moeslim.calibrate.capture import FIELDS, HALVES, LayerStats, Statistics
from moeslim.calibrate.statistics import CalibrationMeta
from moeslim.errors import CheckpointError, MissingFileError, PlanError
from moeslim.layout import Layout
from moeslim.names import STATS_ARRAYS, STATS_JSON
from moeslim.safefs import write_atomic, write_text_atomic
from moeslim.shards import read_header
from moeslim.source import Checkpoint

STATS_FORMAT = "moeslim.stats"
STATS_VERSION = 1


def fingerprint(ckpt: Checkpoint, layout: Layout) -> str:
    """Identity of a model for statistics: its config and the bytes of every router weight."""
    digest = hashlib.sha256(json.dumps(ckpt.config, sort_keys=True).encode())
    routers = [layer.block + layout.family.router_weight for layer in layout.layers]
    ckpt.fetch(routers, again=True)  # a Hub source read in place: kept on disk for the layers, which read them too
    for layer in layout.layers:
        info = ckpt.tensors[layer.block + layout.family.router_weight]
        with open(info.file, "rb") as f:
            f.seek(info.start)
            digest.update(f.read(info.nbytes))
    return digest.hexdigest()


def save_stats(folder: Path, stats: Statistics, meta: CalibrationMeta) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for index, parts in stats.halves.items():
        for half in HALVES:
            arrays.update({f"layers.{index}.{half}.{k}": v for k, v in parts[half].arrays.items()})
            arrays[f"layers.{index}.{half}.tokens"] = np.array([parts[half].tokens], dtype=np.float64)
    arrays.update({f"layers.{i}.reconstruction": v for i, v in stats.reconstruction.items()})
    write_atomic(folder / STATS_ARRAYS, save(arrays))  # E numbers a layer: small
    doc = {"format": STATS_FORMAT, "version": STATS_VERSION, **meta.to_dict(), "layers_done": stats.layers}
    write_text_atomic(folder / STATS_JSON, jsonio.dumps(doc, indent=2) + "\n")


def load_stats(folder: Path) -> tuple[Statistics, CalibrationMeta]:
    """Read a statistics folder written by ``save_stats``, checking it whole; its fit to a model is checked by
    ``check_stats_fit``."""
    if not (folder / STATS_JSON).is_file() or not (folder / STATS_ARRAYS).is_file():
        raise MissingFileError(f"{folder} is not a moeslim statistics folder (stats.json, stats.safetensors)")
    try:
        meta = _read_meta(folder / STATS_JSON)
        arrays = _read_arrays(folder / STATS_ARRAYS)
        return _statistics(meta, arrays), CalibrationMeta(meta["model"], meta["calibration"], meta["settings"])
    except (_Corrupt, CheckpointError) as e:
        raise PlanError(f"{e}; recalibrate (delete {folder}) or pass another --stats") from e


class _Corrupt(ValueError):
    """What is wrong in a statistics folder; ``load_stats`` adds what to do."""


def _read_meta(path: Path) -> dict:
    try:
        meta = jsonio.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError covers bad UTF-8, bad JSON, NaN/Infinity
        raise _Corrupt(f"{path} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT or meta.get("version") != STATS_VERSION:
        raise _Corrupt(f"{path} holds statistics in an unknown format (not {STATS_FORMAT} version {STATS_VERSION})")
    model, layers = meta.get("model"), meta.get("layers_done")
    if not isinstance(model, dict) or not jsonio.is_whole(model.get("num_experts")) or model["num_experts"] < 2:
        raise _Corrupt(f"{path}: model.num_experts is missing or not a whole number ≥ 2")
    if not isinstance(model.get("fingerprint"), str):
        raise _Corrupt(f"{path}: model.fingerprint is missing or not a string")
    if not isinstance(layers, list) or not all(jsonio.is_whole(i) for i in layers) or len(set(layers)) != len(layers):
        raise _Corrupt(f"{path}: layers_done must list distinct layer numbers")
    for key in ("calibration", "settings"):
        if not isinstance(meta.get(key), dict):
            raise _Corrupt(f"{path}: {key} is missing or not an object")
    return meta


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of ``stats.safetensors``: float64, as ``save_stats`` writes them (header checked first)."""
    tensors, _ = read_header(path)
    if odd := [t for t in tensors.values() if t.dtype != "F64"]:
        raise _Corrupt(f"{path}: {odd[0].name} is {odd[0].dtype}, not F64")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise _Corrupt(f"{path} cannot be read ({e})") from e


def _statistics(meta: dict, arrays: dict[str, np.ndarray]) -> Statistics:
    stats = Statistics(meta["model"]["num_experts"])
    for index in meta["layers_done"]:
        stats.halves[index] = {
            half: _layer_half(arrays, stats.num_experts, f"layers.{index}.{half}") for half in HALVES
        }
        if (key := f"layers.{index}.reconstruction") in arrays:
            stats.reconstruction[index] = _array(arrays, key, (stats.num_experts,))
    return stats


def _layer_half(arrays: dict[str, np.ndarray], num_experts: int, prefix: str) -> LayerStats:
    tokens = _array(arrays, f"{prefix}.tokens", (1,))[0]
    if not (np.isfinite(tokens) and tokens >= 0 and tokens == int(tokens)):
        raise _Corrupt(f"stats.safetensors: {prefix}.tokens is {tokens}, not a token count")
    fields = {k: _array(arrays, f"{prefix}.{k}", (num_experts,)) for k in FIELDS}
    return LayerStats(num_experts, int(tokens), fields)


def _array(arrays: dict[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in arrays:
        raise _Corrupt(f"stats.json lists layer {key.split('.')[1]} as done, but stats.safetensors has no {key}")
    if arrays[key].shape != shape:
        raise _Corrupt(f"stats.safetensors: {key} has shape {list(arrays[key].shape)}, expected {list(shape)}")
    return arrays[key]


def check_stats_fit(meta: CalibrationMeta, ckpt: Checkpoint, layout: Layout, where: Path) -> None:
    """Statistics (checked by ``load_stats``) must come from this very model: same config and router weights."""
    model = meta.model
    if model["fingerprint"] != fingerprint(ckpt, layout) or model["num_experts"] != layout.num_experts:
        raise PlanError(
            f"statistics in {where} were collected on another model ({model.get('name', '?')});"
            " calibrate this model, or pass the statistics made for it"
        )
