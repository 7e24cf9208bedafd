"""``slim``: the whole flow, in order — resolve source → layout → plan → map → write → validate → card → push."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from moeslim.calibrate.statistics import HALVES, Statistics
from moeslim.correct.run import wanted
from moeslim.criteria import (
    AUTO,
    CRITERIA,
    DATA_FREE,
    DEFAULT_CRITERION,
    RECONSTRUCTION,
    calibrated_scores,
    is_calibrated,
    layer_scores,
)
from moeslim.errors import MoeslimError, PlanError
from moeslim.families.table import check_calibratable, text_config
from moeslim.layout import Layout, resolve_layout, routing_of
from moeslim.names import PLAN_NAME
from moeslim.plan import Correction, Plan, check_feasible, check_plan, jaccard, load_plan, select, select_one
from moeslim.publish.facts import write_model_card
from moeslim.publish.push import PushOptions, check_write_access, push_folder
from moeslim.remote.repo import DEFAULT_WINDOW, announce, open_source
from moeslim.shards import TensorInfo
from moeslim.source import Checkpoint
from moeslim.stopping import deferred
from moeslim.stream.options import CalibrationOptions
from moeslim.stream.ranks import SINGLE, Ranks, current
from moeslim.surgery.config import dump_config, rewrite_config
from moeslim.surgery.files import check_space, copy_files, extra_files, foreign_file
from moeslim.surgery.finished import finished_shards
from moeslim.surgery.mapping import plan_outputs
from moeslim.surgery.writer import plan_shards, write_checkpoint
from moeslim.targets import atomic_folder, check_outside, check_target, locked, temp_beside
from moeslim.units import parse_size
from moeslim.validate.report import write_report
from moeslim.validate.run import ValidateOptions, kl_exceeds, validate

if TYPE_CHECKING:
    from moeslim.stream.context import RunContext
    from moeslim.stream.loop import Observer
    from moeslim.validate.reference import Reference


@dataclass(frozen=True)
class SlimOptions:
    source: str | Path  # a local folder, or a Hub repo id when no such folder exists
    keep: int | None = None
    out: Path | None = None
    plan: Path | None = None
    criterion: str = DEFAULT_CRITERION
    seed: int | None = None
    top_k: int | None = None
    max_shard_size: str = "5GB"
    overwrite: bool = False
    stats: Path | None = None  # statistics from `moeslim calibrate`, for calibrated criteria
    calibration: CalibrationOptions = CalibrationOptions()  # used when a calibrated criterion has no --stats
    progressive: bool = False
    revision: str | None = None  # of a Hub source
    cache_window: str = DEFAULT_WINDOW  # a Hub source's bytes on disk at once (remote/repo.py); "full": all, cached
    push_to: str | None = None  # Hub repo id to publish the output to
    private: bool = False  # create push_to private (an existing repo keeps its visibility)
    push_revision: str | None = None  # branch of push_to (default: its default branch)
    create_pr: bool = False  # push as a pull request
    command: str = ""  # the command line that made it, for the model card
    validation: ValidateOptions | None = ValidateOptions(samples=8, seq_len=128, require_data=False)  # None: skip
    max_kl: float | None = None  # a validated mean KL above this is not pushed
    correct: bool | None = None  # refit the kept experts (correct/); None: when the plan used calibration data


@dataclass(frozen=True)
class SlimResult:
    out: Path
    plan: Plan
    bytes_written: int
    shards: int
    skipped: list[Path]
    url: str | None = None  # where it was pushed
    validation: dict | None = None  # the validation report, also saved as validation.json


@dataclass
class Job:
    """The source of one ``slim``, opened once: every pass (calibration, trials, correction, validation) reads it
    through this, and the run context (tokenizer, calibration tokens, ranks, dtype) is built on first need."""

    root: Path
    ckpt: Checkpoint
    layout: Layout
    opts: SlimOptions
    ranks: Ranks = SINGLE  # the processes of a torchrun (joined once)
    out: Path | None = None  # the output, once claimed: hidden states past --max-memory spill beside it
    reference: Reference | None = None  # validation's original side, computed in the calibration pass

    @functools.cached_property
    def context(self) -> RunContext:
        """The run context of this slim's passes. The reconstruction criterion's greedy search (most of a
        calibration's CPU at real widths) runs only when ``--criterion reconstruction`` asks for it."""
        from moeslim.stream.context import RunContext  # torch: only for passes that run the model

        calibration = self.opts.calibration
        if self.opts.criterion != RECONSTRUCTION:
            calibration = dataclasses.replace(calibration, reconstruction_tokens=0)
        return RunContext(self.ckpt, self.layout, calibration, spill_beside=self.out)


def slim(opts: SlimOptions) -> SlimResult:
    """Prune ``opts.source`` into ``opts.out``; the source is only read, the target appears whole or not at all.

    The target is locked from the moment it is known (before scoring, when ``--out`` or ``--keep`` names it) until
    the finished output has been renamed into place, so a second run into the same folder is refused at once.
    """
    shard_limit = _shard_limit(opts.max_shard_size)  # bad options fail before any download or scoring
    push = _push_options(opts)
    if push is not None:
        check_write_access(push)  # before any work: a long prune must not end in a refused token
    beside = opts.out.expanduser().absolute().parent if opts.out else Path.cwd()  # a Hub source's work folder
    check = functools.partial(preflight, opts=opts)
    with open_source(str(opts.source), opts.revision, check, opts.cache_window, beside) as ckpt:
        job = Job(ckpt.root, ckpt, resolve_layout(ckpt), opts, current(opts.calibration.device))
        if ckpt.fetcher is not None:
            announce(ckpt, job.layout, load_plan(opts.plan).keep if opts.plan else opts.keep or 0, beside)
        try:
            return _slim(job, shard_limit, push)
        finally:
            if job.reference is not None:
                job.reference.close()


def _slim(job: Job, shard_limit: int, push: PushOptions | None) -> SlimResult:
    opts, ckpt, root = job.opts, job.ckpt, job.root
    copied, skipped = extra_files(ckpt.root, ckpt.shards)
    if not job.ranks.leader:
        return _follow(job, skipped)
    with contextlib.ExitStack() as held:
        out = opts.out or (default_out(opts.source, opts.keep) if opts.keep is not None else None)
        work = None
        if out is not None:
            held.enter_context(claim_output(root, out, opts.overwrite, copied))
            work, job.out = _work_folder(held, out), out
        plan = make_plan(job, work)
        _retain_output(job, plan)
        if out is None:
            out = default_out(opts.source, plan.keep)
            held.enter_context(claim_output(root, out, opts.overwrite, copied))
            work, job.out = _work_folder(held, out), out
        assert work is not None
        plan, patches = _settle_correction(job, plan, work)
        total, shards, report = _write(job, plan, out, copied, shard_limit, patches)
    url = _push(out, push) if push and not kl_exceeds(report or {}, opts.max_kl) else None
    return SlimResult(out, plan, total, shards, skipped, url, report)


def _follow(job: Job, skipped: list[Path]) -> SlimResult:
    """A rank other than 0 under torchrun: it calibrates and validates its share with rank 0, which alone claims,
    writes and pushes the output; its result holds the same plan and validation, and nothing written."""
    opts = job.opts
    plan = _settle_correction(job, make_plan(job), None)[0]
    out = opts.out or default_out(opts.source, plan.keep)
    report = None
    if opts.validation is not None:
        report = validate(job.root, Path(job.ranks.from_leader(None)), opts.validation, job.ckpt)
    return SlimResult(out, plan, 0, 0, skipped, None, report)


@contextlib.contextmanager
def claim_output(source: Path, out: Path, overwrite: bool, copied: list[Path]) -> Iterator[None]:
    """Hold ``out`` for this run: outside the source, locked, and absent or a replaceable slim output."""
    check_outside(source, out)  # before the lock, whose file lies beside the target
    with locked(out):
        check_target(source, out, overwrite, lambda folder: foreign_file(folder, copied))
        yield


def _work_folder(held: contextlib.ExitStack, out: Path) -> Path:
    """A temporary folder beside ``out`` for the correction's patch files, gone at the end; named as the target's
    temp folders, so a killed run's is cleared by the next run there. A stopping signal waits until ``held`` owns
    its removal (made, not yet registered, it would be left behind)."""
    with deferred():
        return Path(held.enter_context(temp_beside(out)))


def _settle_correction(job: Job, plan: Plan, work: Path | None) -> tuple[Plan, dict[str, TensorInfo]]:
    """The plan with its correction recorded, and the patched tensors surgery takes (``work``: where they are
    written; None on ranks other than 0, which write nothing). ``auto`` may have fitted it in its calibration
    pass already; otherwise, when wanted, it is fitted now in a pass of its own."""
    from moeslim.correct.run import FITTED, patches_in

    opts = job.opts
    fitted = plan.correction if opts.plan is None else Correction()
    if fitted.fitted:
        return plan, patches_in(work / FITTED) if work is not None else {}
    if fitted.skipped is not None:
        return _said(plan, fitted, opts), {}
    if not wanted(plan, is_calibrated(opts.criterion) and opts.plan is None, opts.correct):
        return dataclasses.replace(plan, correction=Correction()), {}
    return _correct(job, plan, work)


def _said(plan: Plan, record: Correction, opts: SlimOptions) -> Plan:
    """A correction that could not be made: refused when ``--correct`` asked for it, else said in one line."""
    if opts.correct:
        raise PlanError(f"cannot correct the experts: {record.skipped}; pass --no-correct")
    print(f"moeslim: note: experts not corrected: {record.skipped}", file=sys.stderr)
    return dataclasses.replace(plan, correction=record)


def _correct(job: Job, plan: Plan, work: Path | None) -> tuple[Plan, dict[str, TensorInfo]]:
    """The plan's correction fitted in a pass of its own (patch files in ``work``) and recorded in it."""
    from moeslim.correct.run import check_redo, run_correction, skip_reason

    reason = skip_reason(job.ckpt, job.layout)  # before the run context loads anything
    record, patches = (Correction(skipped=reason), {}) if reason else run_correction(job.context, plan, work)
    check_redo(plan, record)
    if record.skipped is not None:
        return _said(plan, record, job.opts), {}
    return dataclasses.replace(plan, correction=record), patches


def _write(
    job: Job, plan: Plan, out: Path, copied: list[Path], shard_limit: int, patches: dict[str, TensorInfo]
) -> tuple[int, int, dict | None]:
    """Shards, config, copied files, plan, validation and card into a temp folder renamed to ``out`` at the end.

    Returns (bytes of tensors written, number of shards, validation report or None).
    """
    ckpt, layout, opts = job.ckpt, job.layout, job.opts
    outputs = plan_outputs(ckpt, layout, plan.kept, patches)
    shards = plan_shards(outputs, shard_limit)
    total, metadata = sum(t.nbytes for t in outputs), {**ckpt.metadata, "format": "pt"}
    finished = finished_shards(ckpt, out)  # a killed run's finished shards are adopted, not made again
    reused = finished.reusable(shards, metadata) if finished else 0
    check_space(out, total - reused + sum((ckpt.root / f).stat().st_size for f in copied))  # the window: announce
    config = rewrite_config(ckpt.config, layout.family, plan.keep, plan.top_k)
    with atomic_folder(out) as tmp:
        with tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=None) as bar:
            write_checkpoint(tmp, shards, metadata, bar.update, ckpt.fetch_ahead, finished)
        (tmp / "config.json").write_text(dump_config(config), encoding="utf-8")
        copy_files(ckpt.root, copied, tmp)
        (tmp / PLAN_NAME).write_text(plan.to_json(), encoding="utf-8")
        report = _validate(job, tmp)  # before the card, which shows it
        name = opts.push_to.split("/")[-1] if opts.push_to else out.name
        write_model_card(tmp, ckpt, layout, plan, source=str(opts.source), name=name, command=opts.command)
        if finished is not None:
            finished.close(tmp)
    return total, len(shards), report


def _validate(job: Job, tmp: Path) -> dict | None:
    """Validate the written output against its source (opened once, by ``job``) and save ``validation.json`` in it
    (None: skipped).

    The report names the source as given and the pruned model as ``.`` (the folder holding the report), so that
    the same plan gives the same files, wherever they are written.
    """
    opts = job.opts
    if opts.validation is None:
        return None
    job.ranks.from_leader(str(tmp))  # the other ranks of a torchrun validate with us
    report = {**validate(job.root, tmp, opts.validation, job.ckpt, job.reference), "original": str(opts.source),
              "pruned": "."}  # fmt: skip
    write_report(report, tmp)
    return report


def _shard_limit(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise PlanError(f"--max-shard-size {text!r} is not a size like 5GB or 500MB") from e


def preflight(config: dict, opts: SlimOptions) -> None:
    """What ``config.json`` alone can refuse (family, --keep against routing), before weights are downloaded."""
    routing = routing_of(config)
    if opts.plan is None and opts.keep is None:
        raise PlanError("say how many experts to keep per layer: pass --keep N (or --plan FILE)")
    if opts.plan is None and opts.keep is not None:
        check_feasible(routing, opts.keep, routing.top_k if opts.top_k is None else opts.top_k)
    if opts.plan is None and opts.stats is None and is_calibrated(opts.criterion):
        check_calibratable(routing.family)


def _push(out: Path, push: PushOptions) -> str:
    """Push the finished output; when that fails, say the output is safe and how to push it again."""
    try:
        return push_folder(out, push)
    except MoeslimError as e:
        again = shlex.join(["moeslim", "push", str(out), push.repo_id])
        raise type(e)(f"{e}; the pruned model is complete in {out}: push it later with `{again}`") from e


def _push_options(opts: SlimOptions) -> PushOptions | None:
    if opts.push_to is None:
        return None
    return PushOptions(opts.push_to, opts.private, opts.push_revision, opts.create_pr)


def make_plan(job: Job, work: Path | None = None) -> Plan:
    """The plan from ``--plan``, or scored by a criterion; feasibility is checked before any scoring. ``auto``
    fits the correction of its first candidate in the same pass, into ``work`` (``correct/run.py``'s ``FITTED``); the
    plan records it when that candidate wins."""
    ckpt, layout, opts = job.ckpt, job.layout, job.opts
    if opts.plan is not None:
        plan = load_plan(opts.plan)
        if opts.keep is not None and opts.keep != plan.keep:
            raise PlanError(f"--keep {opts.keep} disagrees with the plan, which keeps {plan.keep}; drop one")
        if opts.top_k is not None:
            plan = dataclasses.replace(plan, top_k=opts.top_k)
        check_plan(plan, layout)
        return plan
    if opts.keep is None:
        raise PlanError("say how many experts to keep per layer: pass --keep N (or --plan FILE)")
    if opts.criterion not in CRITERIA:
        raise PlanError(f"unknown --criterion {opts.criterion!r}; choose one of {', '.join(CRITERIA)}")
    if opts.progressive and (opts.criterion == AUTO or not is_calibrated(opts.criterion)):
        raise PlanError(f"--progressive needs one calibrated criterion such as ean, not {opts.criterion}")
    top_k = layout.top_k if opts.top_k is None else opts.top_k
    check_feasible(layout, opts.keep, top_k)
    calibration: dict = {}
    correction = Correction()
    criterion = opts.criterion
    if criterion == AUTO and opts.stats is None:
        criterion, scores, calibration, correction = _auto(job, opts.keep, work)
    elif is_calibrated(criterion):
        if criterion == AUTO:
            criterion = "ean"
            print("moeslim: note: --stats given, and auto measures candidate plans while it calibrates; using the"
                  " statistics' ean scores (pass --criterion to choose another)", file=sys.stderr)  # fmt: skip
        scores, calibration, correction = _calibrated(job, criterion, opts.keep, work)
    else:
        scores = DATA_FREE[criterion](ckpt, layout, opts.seed)
    return Plan(
        model_type=str(text_config(ckpt.config)["model_type"]),
        num_experts=layout.num_experts,
        top_k=top_k,
        kept=select(layout, scores, opts.keep),
        criterion=criterion,
        seed=opts.seed if criterion == "random" else None,
        scores={i: tuple(float(x) for x in s) for i, s in scores.items()},
        calibration=calibration,
        correction=correction,
    )


def _calibrated(job: Job, criterion: str, keep: int, work: Path | None) -> tuple[dict, dict, Correction]:
    """Scores from statistics (``--stats`` or calibrated now), the provenance with per-layer stability, and the
    correction when it was fitted in the same pass (a one-shot calibration: each layer's kept set is known once
    its statistics are)."""
    from moeslim.calibrate.session import run_calibration  # torch and transformers: only for calibrated criteria
    from moeslim.calibrate.stats_file import check_stats_fit, load_stats

    ckpt, layout, opts = job.ckpt, job.layout, job.opts

    def choose(index: int, stats: Statistics) -> tuple[int, ...]:
        return select_one(layout, _require(layer_scores(criterion, stats, index), criterion, index), keep)

    progressive = choose if opts.progressive else None
    correction_of: Callable[[dict, bool], Correction] = lambda calibration, used: Correction()  # noqa: E731
    if opts.stats is not None:
        stats, meta = load_stats(opts.stats)
        check_stats_fit(meta, ckpt, layout, opts.stats)
        if opts.progressive != bool(meta.settings.get("progressive")):
            raise PlanError("--progressive and the statistics disagree: calibrate again with the same --progressive")
    else:
        stats = Statistics(layout.num_experts)
        fit: list[Observer] = []
        if progressive is None:  # progressive: a pass of its own fits on the unmasked model's inputs, as before
            fit, correction_of = _correction_in_pass(job, work, lambda index: choose(index, stats))
        retain = _retain(job, keep, lambda index: _chosen(layout, layer_scores(criterion, stats, index), keep))
        observers = [*_reference(job), *fit, *retain]
        stats, meta = run_calibration(job.context, progressive=progressive, stats=stats, observers=observers)
    info = {**meta.calibration, "progressive": opts.progressive,
            "stability": _stability(criterion, stats, layout, keep)}  # fmt: skip
    return calibrated_scores(criterion, stats, ckpt, layout), info, correction_of(meta.calibration, True)


def _chosen(layout: Layout, scores: np.ndarray | None, keep: int) -> tuple[int, ...] | None:
    return None if scores is None else select_one(layout, scores, keep)


def _retain_output(job: Job, plan: Plan) -> None:
    """For a Hub source read in place: what scoring left on disk that the output is made of (the routers a
    data-free score read) stays until surgery copies it, so it is downloaded once."""
    from moeslim.remote.store import Store

    if isinstance(job.ckpt.fetcher, Store):
        job.ckpt.fetcher.retain(p for t in plan_outputs(job.ckpt, job.layout, plan.kept) for p in t.pieces)


def _retain(job: Job, keep: int, choose: Callable[[int], tuple[int, ...] | None]) -> list[Observer]:
    """For a Hub source read in place: the observer that keeps each calibrated layer's output bytes on disk for
    surgery, so that they are downloaded once (``remote/retain.py``); none for a local folder."""
    if job.ckpt.fetcher is None:
        return []
    from moeslim.remote.retain import Retain

    return [Retain(job.ckpt, job.layout, keep, choose)]


def _reference(job: Job) -> list[Observer]:
    """The observer that runs validation's original side in this calibration pass (``validate/reference.py``), so
    the source is read once: where validation will run, in one process, in the calibration's dtype on its device,
    with the held-out tokens validation will take (from the documents this calibration does not read); none
    otherwise (no tokenizer, too little held-out text: validation says why). Progressive masking moves only the
    calibration's own stream: the reference runs unmasked."""
    from moeslim.calibrate.session import calibration_record
    from moeslim.errors import CalibrationDataError
    from moeslim.stream.context import TOKENIZER_FILES, load_tokenizer
    from moeslim.validate.heldout import load_heldout
    from moeslim.validate.reference import Reference

    check, ctx = job.opts.validation, job.context
    if (
        check is None
        or ctx.ranks.world > 1
        or (check.device, check.dtype) != (ctx.opts.device, ctx.opts.dtype)
        or not any((job.ckpt.root / name).is_file() for name in TOKENIZER_FILES)
    ):
        return []
    tokenizer = load_tokenizer(job.ckpt, check.trust_remote_code)
    try:
        held = load_heldout(check.calib, tokenizer, calibration_record(ctx), samples=check.samples,
                            seq_len=check.seq_len, seed=check.seed)  # fmt: skip
    except CalibrationDataError:
        return []
    job.reference = Reference(held.tokens, check.batch_size, job.out)
    return [job.reference]


def _stability(criterion: str, stats: Statistics, layout: Layout, keep: int) -> dict[str, float]:
    """Per layer, the agreement (Jaccard) of the kept sets chosen from the two calibration halves."""
    stability = {}
    for index in stats.layers:
        a, b = (layer_scores(criterion, stats, index, half) for half in HALVES)
        if a is not None and b is not None:
            stability[str(index)] = round(jaccard(select_one(layout, a, keep), select_one(layout, b, keep)), 4)
    return stability


def _auto(job: Job, keep: int, work: Path | None) -> tuple[str, dict, dict, Correction]:
    """Calibrate once with every candidate criterion's plan measured on held-out calibration batches
    (``calibrate/trials.py``); the winner's scores, with every candidate's measured KL in the provenance, and the
    correction fitted in the same pass when wanted and the first candidate won (else empty)."""
    from moeslim.calibrate.session import check_runnable, run_calibration
    from moeslim.calibrate.trials import CANDIDATES, PlanTrials

    ckpt, layout = job.ckpt, job.layout
    check_runnable(ckpt, layout)  # before the data-free candidates read any weight
    fixed = {name: DATA_FREE[name](ckpt, layout, None) for name in CANDIDATES if name in DATA_FREE}

    def scores_of(name: str, index: int, stats: Statistics) -> np.ndarray:
        return fixed[name][index] if name in fixed else _require(layer_scores(name, stats, index), name, index)

    stats = Statistics(layout.num_experts)
    trials = PlanTrials(layout, keep, scores_of, stats)
    fit, correction_of = _correction_in_pass(job, work, lambda index: trials.kept[CANDIDATES[0]][index])
    observers: list[Observer] = [*_reference(job), trials, *fit]  # the fit after the trials, which choose its sets
    observers += _retain(job, keep, lambda index: trials.kept[CANDIDATES[0]].get(index))  # the likely winner's
    stats, meta = run_calibration(job.context, stats=stats, observers=observers)
    winner = trials.winner or CANDIDATES[0]
    scores = fixed[winner] if winner in fixed else calibrated_scores(winner, stats, ckpt, layout)
    stability = {} if winner in fixed else _stability(winner, stats, layout, keep)
    info = {**meta.calibration, "progressive": False, "stability": stability,
            "auto": {"chose": winner, "held_out_batches": len(trials.held), "kl": trials.kl}}  # fmt: skip
    return winner, scores, info, correction_of(meta.calibration, winner == CANDIDATES[0])


def _correction_in_pass(
    job: Job, work: Path | None, kept: Callable[[int], tuple[int, ...]]
) -> tuple[list[Observer], Callable[[dict, bool], Correction]]:
    """The correction of the experts ``kept(index)`` keeps, fitted in the calibration pass (into ``work``'s
    ``FITTED`` folder), so that no pass of its own reads the source again: the observer that fits it (none where
    it is not wanted or cannot be made: ``_settle_correction`` says why), and what the plan records of it, given
    the pass's calibration record and whether the plan keeps those sets (else nothing: a pass of its own fits the
    plan's)."""
    from moeslim.correct.fit import Fitter
    from moeslim.correct.run import FITTED, PatchWriter, skip_reason

    if job.opts.correct is False or skip_reason(job.ckpt, job.layout) is not None:
        return [], lambda calibration, used: Correction()
    folder = work / FITTED if work is not None and job.context.ranks.leader else None
    if folder is not None:
        folder.mkdir()
    writer = PatchWriter(job.ckpt, job.layout, folder)
    fitter = Fitter(job.layout.family.name, kept, writer)

    def record(calibration: dict, used: bool) -> Correction:
        if fitter.error is not None:
            return Correction(skipped=fitter.error)
        return writer.record(calibration) if used else Correction()

    return [fitter], record


def _require(scores: np.ndarray | None, criterion: str, index: int) -> np.ndarray:
    if scores is None:
        raise PlanError(f"no {criterion} scores for layer {index}; recalibrate")
    return scores


def default_out(source: str | Path, keep: int) -> Path:
    """``./<source name>-keep<N>`` in the working directory."""
    return Path.cwd() / f"{Path(source).resolve().name}-keep{keep}"
