"""Thin typer commands. Known errors become one line on stderr and exit code 2 (``MOESLIM_DEBUG=1``
shows the traceback)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from moeslim import __version__
from moeslim.criteria import CRITERIA, DEFAULT_CRITERION
from moeslim.errors import MoeslimError
from moeslim.layout import resolve_layout
from moeslim.pipeline import SlimOptions, slim
from moeslim.report import format_report, human_bytes, inspect_report
from moeslim.source import open_checkpoint

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prune experts out of Mixture-of-Experts checkpoints, straight in the safetensors files.",
)


@app.command()
def inspect(
    src: Annotated[Path, typer.Argument(help="Local checkpoint folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    keep: Annotated[int | None, typer.Option(help="Also project the size after keeping N experts.")] = None,
) -> None:
    """Describe a checkpoint: family, MoE/dense/MTP layers, experts, dtypes, quantisation, sizes."""
    ckpt = open_checkpoint(src)
    report = inspect_report(ckpt, resolve_layout(ckpt), keep)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@app.command(name="slim")
def slim_command(
    src: Annotated[Path, typer.Argument(help="Local checkpoint folder.")],
    keep: Annotated[int | None, typer.Option(help="Experts to keep per MoE layer.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default ./<name>-keep<N>).")] = None,
    plan: Annotated[Path | None, typer.Option(help="Plan JSON (e.g. a previous output's moeslim_plan.json).")] = None,
    criterion: Annotated[str, typer.Option(help=f"How to score experts: {', '.join(CRITERIA)}.")] = DEFAULT_CRITERION,
    seed: Annotated[int | None, typer.Option(help="Seed for --criterion random.")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Lower the router's top-k to K.")] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB or 500MB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Keep N experts per MoE layer; write the pruned checkpoint and the plan that made it."""
    opts = SlimOptions(src, keep, out, plan, criterion, seed, top_k, max_shard_size, overwrite)
    result = slim(opts)
    typer.echo(
        f"kept {result.plan.keep} of {result.plan.num_experts} experts in {len(result.plan.kept)} layers"
        f" ({result.plan.criterion}); wrote {human_bytes(result.bytes_written)} in {result.shards} shard(s)"
        f" to {result.out}"
    )
    for path in result.skipped:
        typer.echo(f"note: not copied (weights outside the safetensors index): {path}", err=True)


@app.command()
def version() -> None:
    """Print the moeslim version."""
    typer.echo(__version__)


def main() -> None:
    try:
        app(standalone_mode=False)
    except MoeslimError as e:
        if os.environ.get("MOESLIM_DEBUG") == "1":
            raise
        print(f"moeslim: error: {e}", file=sys.stderr)
        sys.exit(2)
