"""The correction step of ``slim``: after the plan is chosen, the kept experts' down projections are refit on the
calibration tokens (``calibrate/correct.py``) and written to patch files that surgery takes them from
(``surgery/patch.py``). The plan records how, on which tokens, and the sha256 of what was written, so ``--plan``
redoes it and says whether the bytes came out the same.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

from moeslim.calibrate.options import CalibrationOptions
from moeslim.errors import MoeslimError, PlanError
from moeslim.families import check_calibratable, text_config
from moeslim.layout import Layout
from moeslim.plan import Plan
from moeslim.shards import TensorInfo, read_header
from moeslim.source import Checkpoint

METHOD = "least squares on the kept experts' down projections"
FITTED = "fitted"  # the folder, inside slim's work folder, of a correction fitted during auto's calibration
RIDGE = 1e-2  # λ of calibrate/correct.py (which imports torch), relative to the mean diagonal of G_k


def skip_reason(ckpt: Checkpoint, layout: Layout) -> str | None:
    """Why this checkpoint's experts cannot be corrected before any weight is read, or None."""
    if ckpt.config.get("quantization_config") or text_config(ckpt.config).get("quantization_config"):
        return "its weights are quantised, and corrected experts would need requantising"
    try:
        check_calibratable(layout.family)
    except MoeslimError as e:
        return str(e)
    return None


class PatchWriter:
    """Follows each fitted layer (``on_layer(model, index, kept, deltas, down)``): writes its corrected tensors
    into a patch file under ``folder`` (rank 0 only: ``folder`` None elsewhere) and keeps what the plan records."""

    def __init__(self, ckpt: Checkpoint, layout: Layout, folder: Path | None) -> None:
        self.ckpt, self.layout, self.folder = ckpt, layout, folder
        self.layers = {layer.index: layer for layer in layout.layers}
        self.patches: dict[str, TensorInfo] = {}
        self.corrected: dict[str, int] = {}
        self._experts: dict[int, str] = {}  # MoE layer → its experts module's name in the model, found once
        self._digest = hashlib.sha256()

    def __call__(self, model: Any, index: int, kept: tuple[int, ...], deltas: dict, down: Any) -> None:
        from moeslim.engine.modules import loaded_names, moe_parts
        from moeslim.surgery.patch import layer_patch, save_patch

        self.corrected[str(index)] = len(deltas)
        if self.folder is None or not deltas:
            return
        if not self._experts:  # the model's modules stay the same objects as layers load and unload
            names_of = {id(m): n for n, m in model.named_modules()}
            self._experts = {i: names_of[id(p.experts)] for i, p in moe_parts(model, self.layout).items()}
        layer, module = self.layers[index], self._experts[index]
        names = [*layer.fused, *(n for group in layer.per_expert for n in group)]
        values = layer_patch(
            self.ckpt.tensors, layer, kept, deltas, loaded_names(model, names), f"{module}.{down.attr}",
            down.transposed,
        )  # fmt: skip
        path = self.folder / f"layer{index}.safetensors"
        self.patches.update(save_patch(values, path))
        self._digest.update(path.read_bytes())

    def record(self, calibration: dict) -> dict:
        """The plan's ``correction``: method, the tokens it was fitted on, experts corrected per layer, sha256."""
        return {
            "method": METHOD, "ridge": RIDGE, "data": calibration.get("data"), "digest": calibration.get("digest"),
            "tokens": calibration.get("tokens"), "experts": self.corrected, "sha256": self._digest.hexdigest(),
        }  # fmt: skip


def run_correction(
    ckpt: Checkpoint, layout: Layout, opts: CalibrationOptions, plan: Plan, folder: Path | None
) -> tuple[dict, dict[str, TensorInfo]]:
    """Fit the correction of ``plan`` on ``opts``' tokens in its own pass; returns the plan's ``correction``
    record and the patched tensors (source name → its bytes in a file under ``folder``, written by rank 0 only). A
    model whose experts cannot be corrected gives ``{"skipped": why}`` and no patches."""
    from moeslim.calibrate.correct import Unsupported, correct_layers
    from moeslim.calibrate.data import load_calibration
    from moeslim.calibrate.ranks import current, rank_device
    from moeslim.calibrate.runner import LayerRunner
    from moeslim.calibrate.session import _size, load_tokenizer, parse_dtype
    from moeslim.surgery.patch import PatchError

    if reason := skip_reason(ckpt, layout):
        return {"skipped": reason}, {}
    data = load_calibration(
        opts.calib, load_tokenizer(ckpt), samples=opts.samples, seq_len=opts.seq_len, seed=opts.seed,
        split=opts.calib_split, column=opts.calib_column,
    )  # fmt: skip
    ranks = current(opts.device)
    runner = LayerRunner(ckpt, layout, rank_device(opts.device), parse_dtype(opts.dtype), opts.trust_remote_code)
    writer = PatchWriter(ckpt, layout, folder if ranks.leader else None)
    batch_size = min(opts.batch_size, max(1, opts.samples // 2))
    try:
        correct_layers(
            runner, data.tokens, batch_size, plan.kept,
            lambda *fitted: writer(runner.model, *fitted), max_bytes=_size(opts.max_memory), ranks=ranks,
        )  # fmt: skip
    except (Unsupported, PatchError) as e:
        return {"skipped": f"{layout.family.name}: {e}"}, {}
    finally:
        runner.close()
    record = writer.record({"data": data.source, "digest": data.digest, "tokens": data.tokens.numel()})
    return record, writer.patches


def patches_in(folder: Path) -> dict[str, TensorInfo]:
    """The patched tensors written into ``folder`` by a ``PatchWriter``."""
    return {
        name: info for path in sorted(folder.glob("layer*.safetensors")) for name, info in read_header(path)[0].items()
    }


def wanted(plan: Plan, criterion_calibrated: bool, asked: bool | None) -> bool:
    """Whether to correct: as asked, else when the plan came with a correction or its criterion used data."""
    if asked is not None:
        return asked
    if plan.correction:
        return "method" in plan.correction
    return criterion_calibrated


def check_redo(plan: Plan, record: dict) -> None:
    """A ``--plan`` that recorded a correction: the new one must have been fitted on the same tokens; different
    bytes (other hardware or thread counts) are said, not refused."""
    old = plan.correction
    if "method" not in old:
        return
    if "skipped" in record:  # said, or refused when asked for, by the caller
        return
    if record["digest"] != old.get("digest"):
        raise PlanError(
            "the plan's correction was fitted on other calibration tokens; pass the same --calib, --samples,"
            " --seq-len and --seed as when it was made, or --no-correct"
        )
    if record["sha256"] != old.get("sha256"):
        print("moeslim: note: the corrected tensors differ from the plan's in their last bits (another machine,"
              " device or thread count)", file=sys.stderr)  # fmt: skip
