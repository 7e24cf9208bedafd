"""The boundary of a calibration run: the hidden states after its last calibrated layer, kept in ``DIR/resume/``.

After each newly calibrated MoE layer the statistics are saved (``stats.json``), then the boundary: one
safetensors file per calibration batch holding its hidden states ``(batch, seq, hidden)`` after that layer, and
``boundary.json`` with the next layer to run and the layers whose statistics it follows. It is written into
``resume.tmp/`` (``boundary.json`` last) and renamed to ``resume/``, so a folder of that name is complete.
Since the statistics are saved first, a run killed between the two writes resumes from the previous boundary:
the layers between, already in the statistics, are only run, never counted twice. A boundary that cannot be
read, or does not fit the statistics or the settings, is set aside with a note and the finished layers are
computed again.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from moeslim import jsonio
from moeslim.errors import MoeslimError
from moeslim.safefs import remove_path, write_text_atomic
from moeslim.tensorfile import save_tensors

if TYPE_CHECKING:
    from moeslim.calibrate.statistics import CalibrationMeta
    from moeslim.stream.activations import Activations

RESUME, PARTIAL = "resume", "resume.tmp"
BOUNDARY_FORMAT = "moeslim.resume"
BOUNDARY_VERSION = 1


@dataclass(frozen=True)
class Boundary:
    """Where a run resumes: ``store`` holds each batch's hidden states entering decoder layer ``next_layer``."""

    next_layer: int
    store: Activations


def save_boundary(out: Path, boundary: Boundary, layers_done: list[int], meta: CalibrationMeta, tag: str = "") -> None:
    """Save ``boundary`` in ``out/resume/`` (``resume.rank0of2/`` and alike, one per process, under torchrun),
    replacing the previous one; ``layers_done``: those in stats.json."""
    partial, final = out / f"{RESUME}{tag}.tmp", out / f"{RESUME}{tag}"
    remove_path(partial)
    try:
        partial.mkdir(parents=True)  # never through a link: mkdir fails on any name already there
        for b in range(len(boundary.store)):  # a spilled store is read back one batch at a time
            save_tensors(partial / f"{b}.safetensors", {"hidden": boundary.store[b]})
        doc = {
            "format": BOUNDARY_FORMAT, "version": BOUNDARY_VERSION, "identity": identity(meta),
            "next_layer": boundary.next_layer, "layers_done": layers_done, "batches": len(boundary.store),
        }  # fmt: skip
        write_text_atomic(partial / "boundary.json", jsonio.dumps(doc) + "\n")  # last: the folder is complete
        remove_path(final)  # a kill just here leaves no boundary: the next run recomputes
        os.replace(partial, final)
    except BaseException:  # a full disk or a signal: no half-written boundary left to take up space
        remove_path(partial)
        raise


def load_boundary(
    out: Path, meta: CalibrationMeta, pending: list[int], batches: list[tuple[int, int]], dtype: torch.dtype,
    store: Activations, tag: str = "",
) -> Boundary | None:  # fmt: skip
    """The boundary saved in ``out`` for the calibration ``meta``, or None (absent, or unusable: noted on stderr).

    ``pending``: the MoE layers whose statistics are still missing (none may lie before the boundary);
    ``batches``: ``(rows, seq)`` of each batch, whose hidden states must be ``dtype``; they are read into the empty
    ``store`` (kept in memory up to its bound, then spilled to disk, as calibration keeps them), which is closed
    when None is returned.
    """
    folder = out / f"{RESUME}{tag}"
    if not folder.exists():
        return None
    try:
        next_layer = _check(jsonio.loads((folder / "boundary.json").read_text(encoding="utf-8")), meta, pending)
        for b, shape in enumerate(batches):
            store.append(_hidden(folder / f"{b}.safetensors", shape, dtype))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, SafetensorError) as e:
        store.close()
        if isinstance(e, MoeslimError):  # no room to spill them: not a fault of the boundary
            raise
        note(f"note: the saved hidden states in {folder} are unusable ({e}); computing the finished layers again")
        return None
    return Boundary(next_layer, store)


def drop_boundary(out: Path) -> None:
    """Remove the boundaries (one per process of a torchrun) once calibration is complete."""
    for path in [out / PARTIAL, out / RESUME, *out.glob(f"{RESUME}.rank*")]:
        remove_path(path)


def identity(meta: CalibrationMeta) -> str:
    """The calibration a boundary belongs to: model fingerprint, data and settings."""
    return hashlib.sha256(jsonio.dumps(meta.to_dict(), indent=None, sort_keys=True).encode()).hexdigest()


def note(text: str) -> None:
    print(f"moeslim: {text}", file=sys.stderr)


def _check(doc: dict, meta: CalibrationMeta, pending: list[int]) -> int:
    """The next layer of the boundary ``doc``, after checking it belongs to ``meta`` and fits the statistics."""
    if not isinstance(doc, dict) or doc.get("format") != BOUNDARY_FORMAT or doc.get("version") != BOUNDARY_VERSION:
        raise ValueError("unknown format")
    if doc["identity"] != identity(meta):
        raise ValueError("saved by a calibration with other data or settings")
    next_layer, done = int(doc["next_layer"]), {int(i) for i in doc["layers_done"]}
    if ahead := sorted(done & set(pending)):
        raise ValueError(f"they follow layer {ahead[0]}, which has no statistics in stats.json")
    if pending and pending[0] < next_layer:
        raise ValueError(f"they lie after layer {pending[0]}, which has no statistics in stats.json")
    return next_layer


def _hidden(path: Path, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The hidden states ``(rows, seq, hidden)`` saved in ``path``."""
    hidden = load_file(path)["hidden"]
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != shape or hidden.dtype != dtype:
        raise ValueError(f"{path.name} holds {hidden.dtype} {list(hidden.shape)}, not {dtype} {[*shape, 'hidden']}")
    return hidden
