"""The model card's facts, measured from the source checkpoint and the written output folder, and the card
(plus its expert map image) written into that folder."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from huggingface_hub import constants

from moeslim import __version__
from moeslim.hub import is_hub_source, is_repo_id
from moeslim.layout import Layout
from moeslim.names import CARD_NAME, IMAGE_NAME, VALIDATION_NAME
from moeslim.plan import Plan
from moeslim.publish.card import CardFacts, Side, front_matter, render_card
from moeslim.publish.heatmap import draw_expert_map
from moeslim.source import Checkpoint, open_checkpoint


def write_model_card(folder: Path, ckpt: Checkpoint, layout: Layout, plan: Plan, *, source: str, name: str,
                     command: str) -> None:  # fmt: skip
    """Write ``README.md`` (and ``expert_map.png`` when matplotlib is there) into the pruned ``folder``."""
    image = IMAGE_NAME if draw_expert_map(plan, folder / IMAGE_NAME) else None
    facts = CardFacts(
        name=name,
        source=source,
        base_model=base_model_id(source, ckpt),
        source_revision=ckpt.root.name if is_hub_source(source) else None,
        model_type=str(ckpt.config.get("model_type") or plan.model_type),
        original=Side(layout.num_experts, layout.top_k, *measure(ckpt)),
        pruned=Side(plan.keep, plan.top_k, *measure(open_checkpoint(folder))),
        plan=plan,
        version=__version__,
        command=command,
        base_card=front_matter(_text(ckpt.root / CARD_NAME)),
        validation=_validation(folder / VALIDATION_NAME),
        image=image,
        packed_fp4=any(t.endswith("_blocks") for t in ckpt.tensors),
        endpoint=constants.ENDPOINT,
    )
    (folder / CARD_NAME).write_text(render_card(facts), encoding="utf-8")


def measure(ckpt: Checkpoint) -> tuple[int, int]:
    """(parameters as stored, bytes of the safetensors files), from the headers and file sizes alone."""
    parameters = sum(math.prod(t.shape) for t in ckpt.tensors.values())
    return parameters, sum((ckpt.root / shard).stat().st_size for shard in ckpt.shards)


def base_model_id(source: str, ckpt: Checkpoint) -> str | None:
    """The base model's Hub id: the source itself, the repo of a Hub cache snapshot folder, or a repo id in
    the config's ``_name_or_path``; ``None`` for a local folder of unknown origin."""
    if is_hub_source(source):
        return source
    root = ckpt.root.resolve()
    if root.parent.name == "snapshots" and (m := re.fullmatch(r"models--(.+)", root.parent.parent.name)):
        return m.group(1).replace("--", "/")
    name = ckpt.config.get("_name_or_path")
    return name if isinstance(name, str) and is_repo_id(name) and not Path(name).exists() else None


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _validation(path: Path) -> dict | None:
    """``validation.json``, read leniently: a NaN written by an older moeslim is shown as not measured."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
