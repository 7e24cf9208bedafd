"""The correction step of ``slim``: after the plan is chosen, the kept experts' down projections are refit on the
calibration tokens (``fit.py``) and written to patch files that surgery takes them from (``surgery/patch.py``).
The plan records how, on which tokens, and the sha256 of what was written, so ``--plan`` redoes it and says
whether the bytes came out the same.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeslim.errors import MoeslimError, PlanError
from moeslim.families.table import check_calibratable, text_config
from moeslim.layout import Layout
from moeslim.plan import Correction, Plan
from moeslim.shards import TensorInfo, read_header
from moeslim.source import Checkpoint

if TYPE_CHECKING:
    from moeslim.stream.context import RunContext

METHOD = "least squares on the kept experts' down projections"
FITTED = "fitted"  # the folder, inside slim's work folder, of a correction fitted during auto's calibration


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
        from moeslim.stream.modules import loaded_names, moe_parts
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

    def record(self, calibration: dict) -> Correction:
        """The plan's ``correction``: method, the tokens it was fitted on, experts corrected per layer, sha256."""
        from moeslim.correct.fit import RIDGE  # torch: loaded by the fit already

        return Correction(
            METHOD, RIDGE, calibration.get("data"), calibration.get("digest"), calibration.get("tokens"),
            self.corrected, self._digest.hexdigest(),
        )  # fmt: skip


def run_correction(ctx: RunContext, plan: Plan, folder: Path | None) -> tuple[Correction, dict[str, TensorInfo]]:
    """Fit the correction of ``plan`` on the context's calibration tokens in a pass of its own; returns the plan's
    ``correction`` record and the patched tensors (source name → its bytes in a file under ``folder``, written by
    rank 0 only). A model whose experts cannot be corrected gives a ``skipped`` record and no patches."""
    from moeslim.correct.fit import Fitter
    from moeslim.stream.loop import walk

    if reason := skip_reason(ctx.ckpt, ctx.layout):
        return Correction(skipped=reason), {}
    data = ctx.data()
    runner = ctx.runner()
    writer = PatchWriter(ctx.ckpt, ctx.layout, folder if ctx.ranks.leader else None)
    fitter = Fitter(ctx.layout.family.name, plan.kept.__getitem__, writer)
    try:
        walk(runner, data.tokens, ctx.batch_size, [fitter], ranks=ctx.ranks, store=ctx.activations(),
             desc="correcting")  # fmt: skip
    finally:
        runner.close()
    if fitter.error is not None:
        return Correction(skipped=fitter.error), {}
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
        return plan.correction.fitted
    return criterion_calibrated


def check_redo(plan: Plan, record: Correction) -> None:
    """A ``--plan`` that recorded a correction: the new one must have been fitted on the same tokens; different
    bytes (other hardware or thread counts) are said, not refused."""
    old = plan.correction
    if not old.fitted or not record.fitted:  # a skipped one is said, or refused when asked for, by the caller
        return
    if record.digest != old.digest:
        raise PlanError(
            "the plan's correction was fitted on other calibration tokens; pass the same --calib, --samples,"
            " --seq-len and --seed as when it was made, or --no-correct"
        )
    if record.sha256 != old.sha256:
        print("moeslim: note: the corrected tensors differ from the plan's in their last bits (another machine,"
              " device or thread count)", file=sys.stderr)  # fmt: skip
