"""``moeslim calibrate``: data → tokens → layer-by-layer statistics, saved and resumable."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moeslim.calibrate.collect import Chooser, OnLayer, calibrate_layers
from moeslim.calibrate.folder import claim_stats_folder, clear_stats
from moeslim.calibrate.options import CalibrationOptions
from moeslim.calibrate.ranks import Ranks, current, rank_device
from moeslim.calibrate.resume import Boundary, drop_boundary, load_boundary, note, save_boundary
from moeslim.calibrate.stats import Statistics
from moeslim.calibrate.store import check_stats_fit, fingerprint, load_stats, save_stats
from moeslim.errors import DeviceError, MissingFileError, OutputError, PlanError
from moeslim.families import check_calibratable
from moeslim.layout import Layout
from moeslim.quant import READABLE, unreadable
from moeslim.source import Checkpoint
from moeslim.units import parse_size

if TYPE_CHECKING:
    from moeslim.calibrate.runner import Activations
    from moeslim.calibrate.trials import PlanTrials

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_calibration(
    ckpt: Checkpoint, layout: Layout, opts: CalibrationOptions, out: Path | None = None,
    progressive: Chooser | None = None, overwrite: bool = False,
    on_layer: Callable[[int], None] = lambda index: None, trials: PlanTrials | None = None,
) -> tuple[Statistics, dict]:  # fmt: skip
    """Calibrate ``ckpt``. With ``out``, the statistics and the hidden states reached are saved after every
    calibrated layer, and a partial run resumes after its last calibrated layer (``resume.py``). ``on_layer(index)``
    follows each calibrated layer, once saved; an exception it raises stops the run there."""
    check_runnable(ckpt, layout)
    dtype, max_bytes = parse_dtype(opts.dtype), _size(opts.max_memory)
    ranks = current(opts.device)  # several under torchrun: each runs a share of the batches, rank 0 writes
    claim = out is not None and ranks.leader
    with claim_stats_folder(ckpt.root, out) if claim and out is not None else contextlib.nullcontext():
        return _calibrate(ckpt, layout, opts, out, progressive, overwrite, on_layer, dtype, max_bytes, trials, ranks)


def check_runnable(ckpt: Checkpoint, layout: Layout) -> None:
    """Refuse, in one line, a checkpoint that calibration cannot run (its family, or quantised weights)."""
    check_calibratable(layout.family)
    method = unreadable(ckpt.config)
    if method:
        raise PlanError(
            f"calibration cannot dequantise {method} checkpoints yet (it reads {READABLE});"
            " use a data-free --criterion such as router-norm"
        )


def _calibrate(
    ckpt: Checkpoint, layout: Layout, opts: CalibrationOptions, out: Path | None, progressive: Chooser | None,
    overwrite: bool, on_layer: Callable[[int], None], dtype: torch.dtype, max_bytes: int | None,
    trials: PlanTrials | None = None, ranks: Ranks | None = None,
) -> tuple[Statistics, dict]:  # fmt: skip
    """``run_calibration`` once ``out`` (if any) is held by this run."""
    from moeslim.calibrate.data import load_calibration  # imports tokenizers only when calibrating

    data = load_calibration(
        opts.calib, load_tokenizer(ckpt), samples=opts.samples, seq_len=opts.seq_len, seed=opts.seed,
        split=opts.calib_split, column=opts.calib_column,
    )  # fmt: skip
    meta = _meta(ckpt, layout, opts, data.source, data.digest, data.tokens.numel(), progressive is not None)
    ranks = ranks or Ranks()
    resumed = _resume(out, meta, ckpt, layout, overwrite) if ranks.leader else None  # rank 0 owns the folder
    stats = ranks.from_leader(resumed) or Statistics(layout.num_experts)
    batch_size = min(opts.batch_size, max(1, opts.samples // 2))
    batches = data.tokens.split(batch_size)
    if len(batches) < ranks.world:
        raise PlanError(f"{ranks.world} processes need at least {ranks.world} calibration batches, and there are"
                        f" {len(batches)}; raise --samples or lower --batch-size")  # fmt: skip
    start = _start(out, meta, stats, layout, [batches[b] for b in ranks.share(len(batches))], dtype, max_bytes, ranks)
    from moeslim.calibrate.runner import LayerRunner  # transformers' model code: imported when used

    runner = LayerRunner(ckpt, layout, rank_device(opts.device), dtype, opts.trust_remote_code)
    try:
        calibrate_layers(
            runner, data.tokens, batch_size, stats, max_bytes=max_bytes, progressive=progressive,
            reconstruction_tokens=opts.reconstruction_tokens, start=start,
            on_layer=_saver(out, meta, layout, on_layer, ranks), trials=trials, ranks=ranks,
        )  # fmt: skip
    finally:
        runner.close()
    if out is not None:
        ranks.barrier()  # every rank is past its last boundary
        if ranks.leader:
            save_stats(out, stats, meta)
            drop_boundary(out)  # every process's, also those of a run with another number of processes
    return stats, meta


def _start(
    out: Path | None, meta: dict, stats: Statistics, layout: Layout, batches: list[torch.Tensor],
    dtype: torch.dtype, max_bytes: int | None, ranks: Ranks,
) -> Boundary | None:  # fmt: skip
    """Where a resumed run starts (said on stderr): the saved boundary of this rank's ``batches``, or None to run
    from the embedding. Ranks resume from their boundaries only when every rank has one at the same layer."""
    trunk = _trunk(layout)
    pending = [i for i in trunk if i not in stats.halves]
    if out is None or not stats.layers or not pending:
        return None
    shapes = [(ids.shape[0], ids.shape[1]) for ids in batches]
    start = load_boundary(out, meta, pending, shapes, dtype, max_bytes, ranks.tag)
    layers = set(ranks.gather(None if start is None else start.next_layer))
    say = note if ranks.leader else (lambda text: None)
    if start is None or len(layers) > 1:
        say(f"resuming calibration of {out}: {len(trunk) - len(pending)} of {len(trunk)} MoE layers done, the layers"
            f" before layer {pending[0]} run again to rebuild their hidden states")  # fmt: skip
        return None
    n = start.next_layer
    done = "layer 0 done" if n == 1 else f"layers 0-{n - 1} done"
    say(f"resuming calibration of {out} at layer {n} of {layout.num_hidden_layers} ({done})")
    return start


def _saver(out: Path | None, meta: dict, layout: Layout, on_layer: Callable[[int], None], ranks: Ranks) -> OnLayer:
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


def _meta(
    ckpt: Checkpoint, layout: Layout, opts: CalibrationOptions, source: str, digest: str, tokens: int,
    progressive: bool,
) -> dict:  # fmt: skip
    settings = {k: v for k, v in asdict(opts).items() if k not in ("trust_remote_code", "calib")}
    return {
        "model": {
            "name": ckpt.root.resolve().name,
            "model_type": layout.family.name,
            "num_experts": layout.num_experts,
            "fingerprint": fingerprint(ckpt, layout),
        },
        "calibration": {"data": source, "digest": digest, "tokens": tokens, "samples": opts.samples,
                        "seq_len": opts.seq_len, "seed": opts.seed},
        "settings": {**settings, "progressive": progressive},
    }  # fmt: skip


def _resume(out: Path | None, meta: dict, ckpt: Checkpoint, layout: Layout, overwrite: bool) -> Statistics | None:
    """Statistics already in ``out`` from the same model, data and settings; None to start afresh."""
    if out is None or not (out / "stats.json").exists():
        return None
    previous, old = load_stats(out)
    check_stats_fit(old, ckpt, layout, out)
    same = old.get("calibration") == meta["calibration"] and old.get("settings") == meta["settings"]
    if same:
        return previous
    if not overwrite:
        raise OutputError(f"{out} holds statistics from other data or settings; pass --overwrite or another --out")
    clear_stats(out)  # moeslim's own files only: the folder and anything else in it stay
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "spiece.model")


def load_tokenizer(ckpt: Checkpoint) -> Any:
    """The model's own tokenizer. transformers would build an empty one from config.json alone, so the
    vocabulary file must be there."""
    from transformers import AutoTokenizer

    missing = MissingFileError(
        f"no tokenizer in {ckpt.root} (none of {', '.join(TOKENIZER_FILES)}); calibration needs the model's"
        " tokenizer files next to its weights (or use a data-free --criterion such as router-norm)"
    )
    if not any((ckpt.root / name).is_file() for name in TOKENIZER_FILES):
        raise missing
    try:
        return AutoTokenizer.from_pretrained(ckpt.root)
    except (OSError, ValueError, TypeError) as e:
        raise missing from e


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise DeviceError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _size(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as e:
        raise PlanError(f"--max-memory {text!r} is not a size like 8GB or 500MB") from e
