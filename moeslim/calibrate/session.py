"""``moeslim calibrate``: data → tokens → layer-by-layer statistics, saved and resumable."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moeslim.calibrate.capture import Statistics
from moeslim.calibrate.collect import Chooser, Collector, OnLayer, calibrate_layers
from moeslim.calibrate.folder import claim_stats_folder, clear_stats
from moeslim.calibrate.statistics import CalibrationMeta
from moeslim.calibrate.stats_file import check_stats_fit, fingerprint, load_stats, save_stats
from moeslim.errors import OutputError, PlanError
from moeslim.families.table import check_calibratable
from moeslim.layout import Layout, unread_experts
from moeslim.names import STATS_JSON
from moeslim.quant import READABLE, unreadable
from moeslim.source import Checkpoint
from moeslim.stream.context import RunContext
from moeslim.stream.loop import Observer
from moeslim.stream.ranks import Ranks
from moeslim.stream.resume import Boundary, drop_boundary, load_boundary, note, save_boundary

if TYPE_CHECKING:
    from moeslim.stream.activations import Activations


def run_calibration(
    ctx: RunContext, out: Path | None = None, *, progressive: Chooser | None = None, overwrite: bool = False,
    on_layer: Callable[[int], None] = lambda index: None, stats: Statistics | None = None,
    observers: Sequence[Observer] = (),
) -> tuple[Statistics, CalibrationMeta]:  # fmt: skip
    """Calibrate ``ctx``'s checkpoint into ``stats`` (new statistics by default), with other ``observers`` of the
    same pass (``auto``'s trials, the correction fit). With ``out``, the statistics and the hidden states reached
    are saved after every calibrated layer, and a partial run resumes after its last calibrated layer
    (``resume.py``). ``on_layer(index)`` follows each calibrated layer, once saved; an exception it raises stops
    the run there."""
    check_runnable(ctx.ckpt, ctx.layout)
    claim = out is not None and ctx.ranks.leader  # rank 0 writes
    with claim_stats_folder(ctx.ckpt.root, out) if claim and out is not None else contextlib.nullcontext():
        return _calibrate(ctx, out, progressive, overwrite, on_layer, stats, observers)


def check_runnable(ckpt: Checkpoint, layout: Layout) -> None:
    """Refuse, in one line, a checkpoint that calibration cannot run (its family, or quantised weights)."""
    check_calibratable(layout.family)
    if why := unread_experts(layout, ckpt.config):
        raise PlanError(f"calibration cannot run: {why}; use a data-free --criterion such as router-norm, or the"
                        " model's per-expert release")  # fmt: skip
    method = unreadable(ckpt.config)
    if method:
        raise PlanError(
            f"calibration cannot dequantise {method} checkpoints yet (it reads {READABLE});"
            " use a data-free --criterion such as router-norm"
        )


def _calibrate(
    ctx: RunContext, out: Path | None, progressive: Chooser | None, overwrite: bool,
    on_layer: Callable[[int], None], stats: Statistics | None, observers: Sequence[Observer],
) -> tuple[Statistics, CalibrationMeta]:  # fmt: skip
    """``run_calibration`` once ``out`` (if any) is held by this run."""
    ckpt, layout, opts, ranks = ctx.ckpt, ctx.layout, ctx.opts, ctx.ranks
    data = ctx.data()
    meta = _meta(ctx, progressive is not None)
    resumed = _resume(out, meta, ckpt, layout, overwrite) if ranks.leader else None  # rank 0 owns the folder
    stats = ranks.from_leader(resumed) or stats or Statistics(layout.num_experts)
    batches = data.tokens.split(ctx.batch_size)
    if len(batches) < ranks.world:
        raise PlanError(f"{ranks.world} processes need at least {ranks.world} calibration batches, and there are"
                        f" {len(batches)}; raise --samples or lower --batch-size")  # fmt: skip
    mine = [batches[b] for b in ranks.share(len(batches))]
    start = _start(ctx, out, meta, stats, mine)
    collector = Collector(
        stats, reconstruction_tokens=opts.reconstruction_tokens, progressive=progressive,
        on_layer=_saver(out, meta, layout, on_layer, ranks),
    )  # fmt: skip
    runner = ctx.runner()
    try:
        calibrate_layers(runner, data.tokens, ctx.batch_size, collector, *observers, ranks=ranks,
                         store=ctx.activations(), start=start)  # fmt: skip
    finally:
        runner.close()
    if out is not None:
        ranks.barrier()  # every rank is past its last boundary
        if ranks.leader:
            save_stats(out, stats, meta)
            drop_boundary(out)  # every process's, also those of a run with another number of processes
    return stats, meta


def _start(
    ctx: RunContext, out: Path | None, meta: CalibrationMeta, stats: Statistics, batches: list[torch.Tensor]
) -> Boundary | None:
    """Where a resumed run starts (said on stderr): the saved boundary of this rank's ``batches``, or None to run
    from the embedding. Ranks resume from their boundaries only when every rank has one at the same layer."""
    layout, ranks = ctx.layout, ctx.ranks
    trunk = _trunk(layout)
    pending = [i for i in trunk if i not in stats.halves]
    if out is None or not stats.layers or not pending:
        return None
    shapes = [(ids.shape[0], ids.shape[1]) for ids in batches]
    start = load_boundary(out, meta, pending, shapes, ctx.dtype, ctx.activations(), ranks.tag)
    layers = set(ranks.gather(None if start is None else start.next_layer))
    say = note if ranks.leader else (lambda text: None)
    if start is None or len(layers) > 1:
        if start is not None:
            start.store.close()
        say(f"resuming calibration of {out}: {len(trunk) - len(pending)} of {len(trunk)} MoE layers done, the layers"
            f" before layer {pending[0]} run again to rebuild their hidden states")  # fmt: skip
        return None
    n = start.next_layer
    done = "layer 0 done" if n == 1 else f"layers 0-{n - 1} done"
    say(f"resuming calibration of {out} at layer {n} of {layout.num_hidden_layers} ({done})")
    return start


def _saver(
    out: Path | None, meta: CalibrationMeta, layout: Layout, on_layer: Callable[[int], None], ranks: Ranks
) -> OnLayer:
    """What follows each calibrated layer: with ``out``, rank 0 saves the statistics, then (unless it was the last
    MoE layer) every rank the boundary of its own batches after the layer."""
    trunk = set(_trunk(layout))

    def saved(index: int, stats: Statistics, store: Activations) -> None:
        if out is not None:
            if ranks.leader:
                save_stats(out, stats, meta)  # first: a boundary never runs ahead of stats.json
            ranks.barrier()
            if trunk - set(stats.halves):
                save_boundary(out, Boundary(index + 1, store), stats.layers, meta, ranks.tag)
        on_layer(index)

    return saved


def _trunk(layout: Layout) -> list[int]:
    """The MoE layers calibration covers: those of the trunk (not the MTP layers, which transformers does not run)."""
    return [layer.index for layer in layout.layers if not layer.mtp]


def _meta(ctx: RunContext, progressive: bool) -> CalibrationMeta:
    ckpt, layout, opts = ctx.ckpt, ctx.layout, ctx.opts
    settings = {k: v for k, v in asdict(opts).items() if k not in ("trust_remote_code", "calib")}
    return CalibrationMeta(
        model={
            "name": ckpt.root.resolve().name,
            "model_type": layout.family.name,
            "num_experts": layout.num_experts,
            "fingerprint": fingerprint(ckpt, layout),
        },
        calibration=calibration_record(ctx),
        settings={**settings, "progressive": progressive},
    )


def calibration_record(ctx: RunContext) -> dict:
    """What a calibration of ``ctx`` read (text, token digest, shape), as its statistics and the plan record it:
    validation keeps its held-out text clear of those documents (``validate/heldout.py``)."""
    opts, data = ctx.opts, ctx.data()
    return {"data": data.source, "digest": data.digest, "tokens": data.tokens.numel(), "samples": opts.samples,
            "seq_len": opts.seq_len, "seed": opts.seed}  # fmt: skip


def _resume(
    out: Path | None, meta: CalibrationMeta, ckpt: Checkpoint, layout: Layout, overwrite: bool
) -> Statistics | None:
    """Statistics already in ``out`` from the same model, data and settings; None to start afresh."""
    if out is None or not (out / STATS_JSON).exists():
        return None
    previous, old = load_stats(out)
    check_stats_fit(old, ckpt, layout, out)
    if old.same_run(meta):
        return previous
    if not overwrite:
        raise OutputError(f"{out} holds statistics from other data or settings; pass --overwrite or another --out")
    clear_stats(out)  # moeslim's own files only: the folder and anything else in it stay
    return None
