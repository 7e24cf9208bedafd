"""Thin typer commands. Usage errors get typer's short usage message and exit code 2; moeslim's own errors
become one line on stderr and exit code 2 (``MOESLIM_DEBUG=1`` shows the traceback); a failed ``--max-kl``
check exits with code 1, Ctrl-C with 130, SIGTERM and SIGHUP with 128 + the signal's number."""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, overload

import typer

from moeslim import __version__, jsonio
from moeslim.criteria import CRITERIA, DEFAULT_CRITERION
from moeslim.errors import MoeslimError, UsageError, os_error_line
from moeslim.hub import is_hub_source, redact, resolve_source
from moeslim.inspection import format_report as format_inspect
from moeslim.inspection import inspect_report
from moeslim.layout import Routing, resolve_layout, routing_of
from moeslim.names import CARD_NAME, IMAGE_NAME, PLAN_NAME, VALIDATION_NAME
from moeslim.plan import check_feasible
from moeslim.publish.push import PushOptions, check_write_access, push_folder, upload_list
from moeslim.remote.repo import DEFAULT_WINDOW, open_source
from moeslim.stopping import Stopped, stopping_signals_raise
from moeslim.stream.memory import is_out_of_memory, out_of_memory
from moeslim.stream.options import CalibrationOptions
from moeslim.units import human_bytes
from moeslim.validate.report import format_report, kl_gate, write_report
from moeslim.validate.run import ValidateOptions, validate

if TYPE_CHECKING:
    from moeslim.pipeline import SlimResult

INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)
OUTPUT_FILES = {"plan": PLAN_NAME, "validation": VALIDATION_NAME, "model card": CARD_NAME, "expert map": IMAGE_NAME}

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """Prune experts out of Mixture-of-Experts checkpoints, straight in the safetensors files."""


# Calibration options, shared by `calibrate` and `slim` (calibrated criteria).
Calib = Annotated[
    str | None,
    typer.Option(help="Calibration text: file, folder, .jsonl (text or chat), Hub dataset id; default: stdlib."),
]
Samples = Annotated[int, typer.Option(help="Calibration sequences.")]
SeqLen = Annotated[int, typer.Option(help="Tokens per calibration sequence.")]
Device = Annotated[str, typer.Option(help="Compute device: cpu, cuda or cuda:N.")]
Dtype = Annotated[str, typer.Option(help="Compute dtype: float32, bfloat16 or float16.")]
BatchSize = Annotated[int, typer.Option(help="Sequences per forward batch.")]
MaxMemory = Annotated[
    str | None,
    typer.Option(
        help="Memory for the run, e.g. 8GB: one decoder layer's weights (or its routed experts a chunk at a time)"
        " plus the hidden states kept in RAM, the rest spilled to disk. Default: what the machine, its cgroup and"
        " ulimit -v leave free."
    ),
]
CacheWindow = Annotated[
    str,
    typer.Option(
        help="Hub source: source bytes held on disk at once, as layers (3layers) or a size (40GB); 'full' downloads"
        " the whole repo into the Hugging Face cache first."
    ),
]
Trust = Annotated[bool, typer.Option(help="Allow running the model's own remote code (calibration only).")]
MaxKl = Annotated[
    float | None,
    typer.Option(
        help="Exit with code 1 when the mean KL(original ‖ pruned) per token exceeds this, or was not measured."
    ),
]
CalibSplit = Annotated[str, typer.Option(help="Hub dataset split.")]
CalibColumn = Annotated[str | None, typer.Option(help="Hub dataset text column (default: text).")]


@app.command()
def inspect(
    src: Annotated[str, typer.Argument(help="Local checkpoint folder, or a Hub repo id (org/name).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    keep: Annotated[int | None, typer.Option(help="Also project the size after keeping N experts.")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="With --keep: check it against top-k K.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub source: branch, tag or commit.")] = None,
) -> None:
    """Describe a checkpoint: family, MoE/dense/MTP layers, experts, dtypes, quantisation, sizes."""
    src = _name(src, "the source")
    with open_source(src, revision, lambda config: _check_keep(routing_of(config), keep, top_k)) as ckpt:
        layout = resolve_layout(ckpt)  # a Hub source: its headers alone, by range requests
    _check_keep(layout, keep, top_k)
    report = inspect_report(ckpt, layout, keep)
    typer.echo(jsonio.dumps(report, indent=2) if as_json else format_inspect(report))


def _check_keep(routing: Routing, keep: int | None, top_k: int | None) -> None:
    """Refuse a ``--keep`` that ``slim`` would refuse (before a Hub source's weights are downloaded)."""
    if keep is not None:
        check_feasible(routing, keep, routing.top_k if top_k is None else top_k)


def _leader(device: str) -> bool:
    """Whether this process reports and writes: always, except the ranks other than 0 of a torchrun."""
    from moeslim.stream.ranks import current

    return current(device).leader


@app.command(name="slim")
def slim_command(
    src: Annotated[str, typer.Argument(help="Local checkpoint folder, or a Hub repo id (org/name).")],
    keep: Annotated[int | None, typer.Option(help="Experts to keep per MoE layer.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default ./<name>-keep<N>).")] = None,
    plan: Annotated[Path | None, typer.Option(help="Plan JSON (e.g. a previous output's moeslim_plan.json).")] = None,
    criterion: Annotated[str, typer.Option(help=f"How to score experts: {', '.join(CRITERIA)}.")] = DEFAULT_CRITERION,
    seed: Annotated[int | None, typer.Option(help="Seed for --criterion random.")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Lower the router's top-k to K.")] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB or 500MB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    revision: Annotated[str | None, typer.Option(help="Hub source: branch, tag or commit.")] = None,
    push_to: Annotated[str | None, typer.Option(help="Publish the output to this Hub repo (org/name).")] = None,
    private: Annotated[bool, typer.Option(help="With --push-to: create the repo private.")] = False,
    push_revision: Annotated[str | None, typer.Option(help="With --push-to: branch to push to.")] = None,
    create_pr: Annotated[bool, typer.Option(help="With --push-to: open a pull request.")] = False,
    stats: Annotated[Path | None, typer.Option(help="Statistics from `moeslim calibrate`.")] = None,
    progressive: Annotated[bool, typer.Option(help="Calibrate each layer on the pruned previous layers.")] = False,
    correct: Annotated[
        bool | None,
        typer.Option(
            "--correct/--no-correct",
            help="Refit the kept experts' down projections on the calibration tokens so the pruned output stays"
            " close to the original's (default: on when the plan uses calibration data).",
        ),
    ] = None,
    calib: Calib = None,
    samples: Samples = CalibrationOptions.samples,
    seq_len: SeqLen = CalibrationOptions.seq_len,
    device: Device = CalibrationOptions.device,
    dtype: Dtype = CalibrationOptions.dtype,
    batch_size: BatchSize = CalibrationOptions.batch_size,
    max_memory: MaxMemory = None,
    trust_remote_code: Trust = False,
    calib_split: CalibSplit = CalibrationOptions.calib_split,
    calib_column: CalibColumn = None,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip validating the output.")] = False,
    max_kl: MaxKl = None,
    cache_window: CacheWindow = DEFAULT_WINDOW,
) -> None:
    """Keep N experts per MoE layer; write the pruned checkpoint, its plan and model card; optionally push it."""
    from moeslim.pipeline import SlimOptions, slim  # writing and publishing load only for a slim

    _check_max_kl(max_kl, validated=not no_validate)
    src, calib = _name(src, "the source"), _name(calib, "--calib")
    out, plan, stats = _path(out, "--out"), _path(plan, "--plan"), _path(stats, "--stats")
    calibration = CalibrationOptions(
        calib, samples, seq_len, seed or 0, device, dtype, batch_size, max_memory,
        calib_split=calib_split, calib_column=calib_column, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    opts = SlimOptions(
        src, keep, out, plan, criterion, seed, top_k, max_shard_size, overwrite,
        stats=stats, calibration=calibration, progressive=progressive,
        revision=revision, cache_window=cache_window,
        push_to=push_to, private=private, push_revision=push_revision, create_pr=create_pr,
        command=redact(shlex.join(["moeslim", *sys.argv[1:]])), max_kl=max_kl, correct=correct,
        validation=None if no_validate else ValidateOptions(
            calib, samples=8, seq_len=128, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
            require_data=False,
        ),
    )  # fmt: skip
    result = slim(opts)
    if not _leader(device):
        return  # under torchrun rank 0 reports
    typer.echo(
        f"kept {result.plan.keep} of {result.plan.num_experts} experts in {len(result.plan.kept)} layers"
        f" ({result.plan.criterion}); wrote {human_bytes(result.bytes_written)} in {result.shards} shard(s)"
        f" to {result.out}"
    )
    if stability := result.plan.calibration.get("stability"):
        worst = min(stability, key=stability.get)
        typer.echo(
            f"kept-set stability (Jaccard of the sets chosen from two halves of the calibration data):"
            f" mean {sum(stability.values()) / len(stability):.2f}, lowest {stability[worst]:.2f} (layer {worst})"
        )
    for path in result.skipped:
        typer.echo(f"note: not copied (weights outside the safetensors index): {path}", err=True)
    if result.validation is not None:
        typer.echo(format_report({**result.validation, "pruned": str(result.out)}))
    typer.echo("\n".join(_written(result)))
    if result.url:
        typer.echo(f"pushed to {result.url}")
    _check_kl(result.validation, max_kl, "; not pushed" if push_to else "")


def _written(result: SlimResult) -> list[str]:
    """What ``slim`` wrote where, one path a line, for the end of its output."""
    out = result.out
    rows = [("checkpoint", f"{out} ({result.shards} shard(s))")]
    rows += [(what, str(out / name)) for what, name in OUTPUT_FILES.items() if (out / name).is_file()]
    return ["written:", *(f"  {what:<11} {path}" for what, path in rows)]


@app.command(name="validate")
def validate_command(
    original: Annotated[str, typer.Argument(help="The original checkpoint: folder or Hub repo id.")],
    pruned: Annotated[str, typer.Argument(help="The pruned checkpoint: folder or Hub repo id.")],
    calib: Annotated[
        str | None, typer.Option(help="Held-out text: file, folder, .jsonl, Hub dataset id; default: stdlib.")
    ] = None,
    samples: Annotated[int, typer.Option(help="Held-out sequences.")] = ValidateOptions.samples,
    seq_len: Annotated[int, typer.Option(help="Tokens per held-out sequence.")] = ValidateOptions.seq_len,
    seed: Annotated[int, typer.Option(help="Seed for sampling held-out text.")] = ValidateOptions.seed,
    batch_size: BatchSize = ValidateOptions.batch_size,
    device: Device = ValidateOptions.device,
    dtype: Dtype = ValidateOptions.dtype,
    generations: Annotated[int, typer.Option(help="Greedy generations side by side (0: none).")] = 3,
    json_file: Annotated[Path | None, typer.Option("--json", help="Also write the JSON report here.")] = None,
    max_kl: MaxKl = None,
    trust_remote_code: Trust = False,
    revision: Annotated[str | None, typer.Option(help="Hub revision of ORIGINAL.")] = None,
    cache_window: CacheWindow = DEFAULT_WINDOW,
) -> None:
    """Check the pruned checkpoint's structure, then compare it with the original on held-out text, streaming.

    The report is printed and saved as validation.json in the pruned folder (shown by its model card).
    """
    _check_max_kl(max_kl, validated=True)
    original, pruned = _name(original, "the original"), _name(pruned, "the pruned checkpoint")
    calib, json_file = _name(calib, "--calib"), _path(json_file, "--json")
    opts = ValidateOptions(calib, samples, seq_len, seed, batch_size, device, dtype, generations, trust_remote_code)
    beside = Path.cwd() if is_hub_source(pruned) else Path(pruned).expanduser().absolute().parent  # work folder
    with open_source(original, revision, lambda config: None, cache_window, beside) as ckpt:
        pruned_root = resolve_source(pruned, None, preflight=lambda config: None)  # small: downloaded whole
        report = validate(ckpt.root, pruned_root, opts, ckpt)
    report = {**report, "original": original} if is_hub_source(original) else report  # not the work folder
    if not _leader(device):
        return  # under torchrun rank 0 reports and writes
    typer.echo(format_report(report))
    if not is_hub_source(pruned):
        typer.echo(f"wrote {write_report(report, pruned_root)}")
    if json_file is not None:
        typer.echo(f"wrote {write_report(report, json_file)}")
    _check_kl(report, max_kl)


@overload
def _name(text: str, what: str) -> str: ...
@overload
def _name(text: None, what: str) -> None: ...
def _name(text: str | None, what: str) -> str | None:
    """A source, path or other name given on the command line, refused in one line when it is not UTF-8 (bytes
    the shell passed through, which Python decodes with surrogateescape): moeslim writes names into UTF-8 files
    (statistics, plan, validation report, model card) and into its messages."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            shown = os.fsencode(text).decode("utf-8", "backslashreplace")  # the bytes as given: src\xff
        except UnicodeEncodeError:
            shown = text.encode("utf-8", "backslashreplace").decode("utf-8")
        raise UsageError(
            f"{what} {shown} is not a UTF-8 name, and moeslim writes names into UTF-8 files (JSON, the model card);"
            " rename it, or pass a link to it with a UTF-8 name"
        ) from None
    return text


@overload
def _path(path: Path, what: str) -> Path: ...
@overload
def _path(path: None, what: str) -> None: ...
def _path(path: Path | None, what: str) -> Path | None:
    """A path option: UTF-8 (``_name``), with a leading ``~`` expanded as the shell does, also when it was quoted,
    so that the lock, the checks and the files written all mean the same folder (``$PWD/~`` names a folder ``~``;
    ``./~`` does not, as typer's ``Path`` drops the ``./``)."""
    return None if path is None else Path(_name(str(path), what)).expanduser()


def _check_max_kl(max_kl: float | None, *, validated: bool) -> None:
    """Refuse, before any work, a ``--max-kl`` that could never pass or that nothing would measure."""
    if max_kl is None:
        return
    if not math.isfinite(max_kl) or max_kl < 0:
        raise UsageError(f"--max-kl {max_kl:g} is not a KL bound: pass a number ≥ 0, e.g. --max-kl 0.1")
    if not validated:
        raise UsageError("--max-kl checks the validation that --no-validate skips: drop one of them")


def _check_kl(report: dict | None, max_kl: float | None, consequence: str = "") -> None:
    """Exit with code 1 (a failed check, not a usage error) when ``--max-kl`` refuses the pruned model: its mean KL
    is above the bound, or no KL was measured."""
    if failure := kl_gate(report, max_kl):
        print(f"moeslim: validation failed: {failure}{consequence}", file=sys.stderr)
        sys.exit(1)


@app.command()
def calibrate(
    src: Annotated[str, typer.Argument(help="Local checkpoint folder, or a Hub repo id (org/name).")],
    out: Annotated[Path, typer.Option(help="Statistics folder to write (resumed if interrupted).")],
    calib: Calib = None,
    samples: Samples = CalibrationOptions.samples,
    seq_len: SeqLen = CalibrationOptions.seq_len,
    seed: Annotated[int, typer.Option(help="Seed for sampling calibration text.")] = 0,
    device: Device = CalibrationOptions.device,
    dtype: Dtype = CalibrationOptions.dtype,
    batch_size: BatchSize = CalibrationOptions.batch_size,
    max_memory: MaxMemory = None,
    reconstruction_tokens: Annotated[
        int, typer.Option(help="Tokens per layer sampled for the reconstruction criterion (0: skip it).")
    ] = CalibrationOptions.reconstruction_tokens,
    trust_remote_code: Trust = False,
    calib_split: CalibSplit = CalibrationOptions.calib_split,
    calib_column: CalibColumn = None,
    overwrite: Annotated[bool, typer.Option(help="Replace statistics made with other data or settings.")] = False,
    revision: Annotated[str | None, typer.Option(help="Hub source: branch, tag or commit.")] = None,
    cache_window: CacheWindow = DEFAULT_WINDOW,
) -> None:
    """Collect routing statistics layer by layer, for `moeslim slim --stats`."""
    from moeslim.calibrate.session import run_calibration  # torch and transformers: only when calibrating
    from moeslim.stream.context import RunContext

    src, out, calib = _name(src, "the source"), _path(out, "--out"), _name(calib, "--calib")
    src = src if is_hub_source(src) else str(Path(src).expanduser())
    opts = CalibrationOptions(
        calib, samples, seq_len, seed, device, dtype, batch_size, max_memory, reconstruction_tokens,
        calib_split, calib_column, trust_remote_code,
    )  # fmt: skip
    with open_source(src, revision, lambda config: None, cache_window, out.absolute().parent) as ckpt:
        ctx = RunContext(ckpt, resolve_layout(ckpt), opts, spill_beside=out)
        stats, meta = run_calibration(ctx, out=out, overwrite=overwrite)
    if not _leader(device):
        return
    cal = meta.calibration
    typer.echo(f"calibrated {len(stats.layers)} MoE layers on {cal['tokens']} tokens ({cal['data']}); wrote {out}")


@app.command()
def push(
    folder: Annotated[Path, typer.Argument(help="Output folder of `moeslim slim`.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo to publish to (org/name); created if missing.")],
    private: Annotated[bool, typer.Option(help="Create the repo private (an existing repo keeps its own).")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to push to; created if missing.")] = None,
    create_pr: Annotated[bool, typer.Option(help="Open a pull request instead of committing.")] = False,
    commit_message: Annotated[str | None, typer.Option(help="Summary of the commit.")] = None,
    dry_run: Annotated[bool, typer.Option(help="List what would be uploaded; contact nothing.")] = False,
) -> None:
    """Upload a pruned folder to the Hub (token from HF_TOKEN or `hf auth login`) and print its URL."""
    folder = _path(folder, "the folder")
    opts = PushOptions(repo_id, private, revision, create_pr, commit_message)
    if dry_run:
        _list_upload(folder, repo_id)
        return
    check_write_access(opts)
    typer.echo(f"pushed to {push_folder(folder, opts)}")


def _list_upload(folder: Path, repo_id: str) -> None:
    files = upload_list(folder)
    for rel, size in files:
        typer.echo(f"{human_bytes(size):>10}  {rel}")
    total = human_bytes(sum(size for _, size in files))
    typer.echo(f"would upload {len(files)} file(s), {total}, to {repo_id} (dry run: nothing sent)")


@app.command()
def version() -> None:
    """Print the moeslim version."""
    typer.echo(__version__)


def _say(line: str) -> None:
    """One line on stderr; nothing where stderr is gone (a closed terminal, the usual sender of SIGHUP)."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


def main() -> None:
    """The ``moeslim`` command: a short message for every failure a user can act on, never a traceback for them.

    typer reports usage errors (bad option values, missing arguments, unknown commands) with the usage line and
    exit code 2, and turns Ctrl-C into exit code 130; SIGTERM and SIGHUP end the run the same way, with exit code
    128 + the signal's number (143, 129). moeslim's errors and the OS errors it has advice for (a full disk, a
    denied permission, a read-only filesystem: ``errors.os_error_line``) are one line and exit code 2; another OS
    error is one line with the system's text and exit code 1. ``MOESLIM_DEBUG=1`` shows their traceback.
    """
    try:
        with stopping_signals_raise():
            app(prog_name="moeslim")
    except SystemExit as e:  # typer ends every run with one; success returns, as callers of main() expect
        if e.code == INTERRUPTED:
            _say("moeslim: interrupted")
        if e.code not in (0, None):
            raise
    except Stopped as e:
        _say(f"moeslim: stopped by {e}")
        sys.exit(128 + e.signum)
    except (MemoryError, RuntimeError, ImportError) as e:  # outside a pass, which names its layer: importing torch
        if not is_out_of_memory(e) or os.environ.get("MOESLIM_DEBUG") == "1":  # or starting a thread under ulimit -v
            raise
        _say(f"moeslim: error: {out_of_memory()}")
        sys.exit(2)
    except (MoeslimError, OSError) as e:
        if os.environ.get("MOESLIM_DEBUG") == "1":
            raise
        line = None if isinstance(e, MoeslimError) else os_error_line(e)
        _say(f"moeslim: error: {line or e}")
        sys.exit(2 if isinstance(e, MoeslimError) or line else 1)
