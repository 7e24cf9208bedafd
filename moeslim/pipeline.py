"""``slim``: the whole flow, in order — open source → layout → plan → map → write."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from moeslim.criteria import CRITERIA, DEFAULT_CRITERION
from moeslim.errors import PlanError
from moeslim.families import text_config
from moeslim.layout import Layout, resolve_layout
from moeslim.plan import PLAN_NAME, Plan, check_feasible, check_plan, load_plan, select
from moeslim.source import Checkpoint, open_checkpoint
from moeslim.surgery.config import dump_config, rewrite_config
from moeslim.surgery.files import atomic_folder, check_space, check_target, copy_files, extra_files
from moeslim.surgery.mapping import plan_outputs
from moeslim.surgery.writer import plan_shards, write_checkpoint


@dataclass(frozen=True)
class SlimOptions:
    source: Path
    keep: int | None = None
    out: Path | None = None
    plan: Path | None = None
    criterion: str = DEFAULT_CRITERION
    seed: int | None = None
    top_k: int | None = None
    max_shard_size: str = "5GB"
    overwrite: bool = False


@dataclass(frozen=True)
class SlimResult:
    out: Path
    plan: Plan
    bytes_written: int
    shards: int
    skipped: list[Path]


def slim(opts: SlimOptions) -> SlimResult:
    """Prune ``opts.source`` into ``opts.out``; the source is only read, the target appears whole or not at all."""
    ckpt = open_checkpoint(opts.source)
    layout = resolve_layout(ckpt)
    if opts.out is not None:
        check_target(opts.source, opts.out, opts.overwrite)  # before scoring, which may take a while
    plan = make_plan(ckpt, layout, opts)
    out = opts.out or default_out(opts.source, plan.keep)
    check_target(opts.source, out, opts.overwrite)
    outputs = plan_outputs(ckpt, layout, plan.kept)
    try:
        shards = plan_shards(outputs, opts.max_shard_size)
    except ValueError as e:
        raise PlanError(f"--max-shard-size {opts.max_shard_size!r} is not a size like 5GB or 500MB") from e
    copied, skipped = extra_files(ckpt.root, ckpt.shards)
    total = sum(t.nbytes for t in outputs)
    check_space(out, total + sum((ckpt.root / f).stat().st_size for f in copied))
    config = rewrite_config(ckpt.config, layout.family, plan.keep, plan.top_k)
    with (
        atomic_folder(out) as tmp,
        tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=None) as bar,
    ):
        write_checkpoint(tmp, shards, {**ckpt.metadata, "format": "pt"}, bar.update)
        (tmp / "config.json").write_text(dump_config(config), encoding="utf-8")
        copy_files(ckpt.root, copied, tmp)
        (tmp / PLAN_NAME).write_text(plan.to_json(), encoding="utf-8")
    return SlimResult(out, plan, total, len(shards), skipped)


def make_plan(ckpt: Checkpoint, layout: Layout, opts: SlimOptions) -> Plan:
    """The plan from ``--plan``, or scored by a criterion; feasibility is checked before any scoring."""
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
    top_k = layout.top_k if opts.top_k is None else opts.top_k
    check_feasible(layout, opts.keep, top_k)
    scores = CRITERIA[opts.criterion](ckpt, layout, opts.seed)
    return Plan(
        model_type=str(text_config(ckpt.config)["model_type"]),
        num_experts=layout.num_experts,
        top_k=top_k,
        kept=select(layout, scores, opts.keep),
        criterion=opts.criterion,
        seed=opts.seed if opts.criterion == "random" else None,
        scores={i: tuple(float(x) for x in s) for i, s in scores.items()},
    )


def default_out(source: Path, keep: int) -> Path:
    """``./<source name>-keep<N>`` in the working directory."""
    return Path.cwd() / f"{Path(source).resolve().name}-keep{keep}"
