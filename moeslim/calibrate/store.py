"""The statistics file: ``stats.safetensors`` (float64 arrays) and ``stats.json`` (identity, provenance).

Written after every calibrated layer (atomically), so an interrupted calibration resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from moeslim.calibrate.stats import FIELDS, HALVES, LayerStats, Statistics
from moeslim.errors import MissingFileError, PlanError
from moeslim.layout import Layout
from moeslim.source import Checkpoint

STATS_FORMAT = "moeslim.stats"
STATS_VERSION = 1


def fingerprint(ckpt: Checkpoint, layout: Layout) -> str:
    """Identity of a model for statistics: its config and the bytes of every router weight."""
    digest = hashlib.sha256(json.dumps(ckpt.config, sort_keys=True).encode())
    for layer in layout.layers:
        info = ckpt.tensors[layer.block + layout.family.router_weight]
        with open(info.file, "rb") as f:
            f.seek(info.start)
            digest.update(f.read(info.nbytes))
    return digest.hexdigest()


def save_stats(folder: Path, stats: Statistics, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for index, parts in stats.halves.items():
        for half in HALVES:
            arrays.update({f"layers.{index}.{half}.{k}": v for k, v in parts[half].arrays.items()})
            arrays[f"layers.{index}.{half}.tokens"] = np.array([parts[half].tokens], dtype=np.float64)
    arrays.update({f"layers.{i}.reconstruction": v for i, v in stats.reconstruction.items()})
    _atomic(folder / "stats.safetensors", lambda p: save_file(arrays, p))
    doc = {"format": STATS_FORMAT, "version": STATS_VERSION, **meta, "layers_done": stats.layers}
    _atomic(folder / "stats.json", lambda p: p.write_text(json.dumps(doc, indent=2) + "\n"))


def load_stats(folder: Path) -> tuple[Statistics, dict]:
    """Read a statistics folder written by ``save_stats``; its fit to a model is checked by the caller."""
    if not (folder / "stats.json").is_file() or not (folder / "stats.safetensors").is_file():
        raise MissingFileError(f"{folder} is not a moeslim statistics folder (stats.json, stats.safetensors)")
    meta = json.loads((folder / "stats.json").read_text())
    if meta.get("format") != STATS_FORMAT or meta.get("version") != STATS_VERSION:
        raise PlanError(f"{folder} holds statistics in an unknown format; recalibrate with this moeslim")
    arrays = load_file(folder / "stats.safetensors")
    stats = Statistics(int(meta["model"]["num_experts"]))
    for index in meta["layers_done"]:
        stats.halves[index] = {
            half: LayerStats(
                stats.num_experts,
                int(arrays[f"layers.{index}.{half}.tokens"][0]),
                {k: arrays[f"layers.{index}.{half}.{k}"] for k in FIELDS},
            )
            for half in HALVES
        }
        if (key := f"layers.{index}.reconstruction") in arrays:
            stats.reconstruction[index] = arrays[key]
    return stats, meta


def check_stats_fit(meta: dict, ckpt: Checkpoint, layout: Layout, where: Path) -> None:
    if meta["model"]["fingerprint"] != fingerprint(ckpt, layout):
        raise PlanError(
            f"statistics in {where} were collected on another model ({meta['model'].get('name', '?')});"
            " calibrate this model, or pass the statistics made for it"
        )


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
