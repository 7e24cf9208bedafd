"""A checkpoint's MoE structure: which layers hold experts, and which tensors are routers and experts.

Built from the family description, the config and the tensor names, and checked against each other, so
that surgery can trust it: every MoE layer has a router with one row per expert and a full set of experts.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from moeslim.errors import CheckpointError
from moeslim.families import Family, family_of, text_config
from moeslim.source import Checkpoint


@dataclass(frozen=True)
class MoeLayer:
    """The routed-expert tensors of one decoder (or MTP) layer.

    ``router`` and ``fused`` tensors carry one slice per expert on dim 0. ``per_expert[j]`` lists the
    tensor names of expert ``j`` (weights with every quantisation sibling).
    """

    index: int
    block: str  # full key prefix of the MoE block, e.g. "model.layers.3.mlp."
    router: tuple[str, ...]
    fused: tuple[str, ...]
    per_expert: tuple[tuple[str, ...], ...]
    mtp: bool


@dataclass(frozen=True)
class Routing:
    """What ``config.json`` alone says about routing: enough to check a ``--keep`` before reading weights."""

    family: Family
    num_experts: int
    top_k: int
    n_group: int
    topk_group: int
    num_hidden_layers: int


@dataclass(frozen=True)
class Layout(Routing):
    """The MoE structure of a checkpoint: its routing settings and its MoE layers' tensors."""

    layers: tuple[MoeLayer, ...] = ()

    @property
    def moe_indices(self) -> list[int]:
        return [layer.index for layer in self.layers]


def routing_of(config: dict) -> Routing:
    """Routing settings from a raw ``config.json`` dict (looking through multimodal wrappers)."""
    family = family_of(config)
    cfg = text_config(config)
    n_group = family.groups(cfg)
    return Routing(
        family=family,
        num_experts=_config_int(cfg, family.count_keys, "expert count"),
        top_k=_config_int(cfg, family.top_k_keys, "top-k"),
        n_group=n_group,
        topk_group=int(cfg.get("topk_group") or n_group) if n_group > 1 else 1,
        num_hidden_layers=_config_int(cfg, ("num_hidden_layers",), "layer count"),
    )


def resolve_layout(ckpt: Checkpoint) -> Layout:
    """Find the MoE layers of ``ckpt`` and check tensor names and shapes against its config."""
    routing = routing_of(ckpt.config)
    family, n_layers = routing.family, routing.num_hidden_layers
    blocks = _moe_blocks(ckpt, family)
    _check_layers_against_config(family, text_config(ckpt.config), blocks, n_layers)
    layers = tuple(
        _moe_layer(ckpt, family, index, block, routing.num_experts, mtp=index >= n_layers)
        for index, block in sorted(blocks.items())
    )
    return Layout(**vars(routing), layers=layers)


def _config_int(cfg: dict, keys: tuple[str, ...], what: str) -> int:
    for key in keys:
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    raise CheckpointError(f"config.json has no {what} (looked for {', '.join(keys)}); the config is incomplete")


def _moe_blocks(ckpt: Checkpoint, family: Family) -> dict[int, str]:
    """Layer index → MoE block key prefix, found from where the router weights are."""
    pattern = re.compile(rf"^(.*?)layers\.(\d+)\.{re.escape(family.block)}\.{re.escape(family.router_weight)}$")
    found: dict[int, str] = {}
    prefixes = set()
    for name in ckpt.tensors:
        if m := pattern.match(name):
            prefixes.add(m.group(1))
            found[int(m.group(2))] = f"{m.group(1)}layers.{m.group(2)}.{family.block}."
    if not found:
        raise CheckpointError(
            f"no MoE router tensors found (expected names like model.layers.N.{family.block}."
            f"{family.router_weight} for a {family.name} model); the checkpoint does not match its config"
        )
    if len(prefixes) > 1:
        raise CheckpointError(f"MoE layers found under several prefixes ({sorted(prefixes)}); cannot tell the trunk")
    return found


def _check_layers_against_config(family: Family, cfg: dict, blocks: dict[int, str], n_layers: int) -> None:
    expected = set(family.moe_layers(cfg))
    trunk = {i for i in blocks if i < n_layers}
    if missing := sorted(expected - trunk):
        raise CheckpointError(
            f"layer {missing[0]}: config says it is an MoE layer but its router tensor is missing;"
            " the checkpoint is incomplete, re-download it"
        )
    if extra := sorted(trunk - expected):
        raise CheckpointError(f"layer {extra[0]}: has a router but config says it is dense; the config does not match")
    mtp_expected = int(cfg.get(family.mtp_key) or 0) if family.mtp_key else 0
    mtp = sorted(i for i in blocks if i >= n_layers)
    if mtp and mtp != list(range(n_layers, n_layers + len(mtp))):
        raise CheckpointError(f"MoE layers {mtp} beyond num_hidden_layers={n_layers} are not consecutive MTP layers")
    if len(mtp) > mtp_expected:
        raise CheckpointError(
            f"layer {mtp[0]} lies beyond num_hidden_layers={n_layers} but the config declares"
            f" {mtp_expected} MTP layers; the config does not match the tensors"
        )


def _moe_layer(ckpt: Checkpoint, family: Family, index: int, block: str, num_experts: int, mtp: bool) -> MoeLayer:
    router, fused = [], []
    per_expert: dict[int, dict[str, str]] = defaultdict(dict)  # expert id → {suffix: full name}
    for name in ckpt.tensors:
        if not name.startswith(block):
            continue
        rel = name[len(block) :]
        if _matches(rel, family.router):
            router.append(name)
        elif family.fused and _matches(rel, family.experts):
            fused.append(name)
        elif not family.fused and (found := _expert_part(rel, family.experts)):
            per_expert[found[0]][found[1]] = name
    for name in router + fused:
        _check_rows(ckpt, name, num_experts, index)
    if family.fused and not fused:
        raise CheckpointError(
            f"layer {index}: no expert tensors under {block}{family.experts[0]}; checkpoint incomplete"
        )
    experts = () if family.fused else _check_per_expert(per_expert, num_experts, index, block)
    return MoeLayer(index, block, tuple(router), tuple(fused), experts, mtp)


def _matches(rel: str, names: tuple[str, ...]) -> bool:
    return any(rel.startswith(n) if n.endswith(".") else rel == n for n in names)


def _expert_part(rel: str, prefixes: tuple[str, ...]) -> tuple[int, str] | None:
    """``experts.5.w1.weight`` → ``(5, "w1.weight")``."""
    for prefix in prefixes:
        if rel.startswith(prefix) and (m := re.match(r"(\d+)\.(.+)$", rel[len(prefix) :])):
            return int(m.group(1)), m.group(2)
    return None


def _check_rows(ckpt: Checkpoint, name: str, num_experts: int, index: int) -> None:
    shape = ckpt.tensors[name].shape
    if not shape or shape[0] != num_experts:
        raise CheckpointError(
            f"layer {index}: {name} has shape {list(shape)}, but config says {num_experts} experts;"
            " the tensors do not match the config"
        )


def _check_per_expert(
    per_expert: dict[int, dict[str, str]], num_experts: int, index: int, block: str
) -> tuple[tuple[str, ...], ...]:
    if extra := sorted(j for j in per_expert if j >= num_experts):
        raise CheckpointError(
            f"layer {index}: expert {extra[0]} exists but config says {num_experts} experts; the config does not match"
        )
    for j in range(num_experts):
        if j not in per_expert:
            raise CheckpointError(f"layer {index}: expert {j} has no tensors under {block}; checkpoint incomplete")
    reference = set(per_expert[0])
    for j in range(num_experts):
        if odd := sorted(set(per_expert[j]) ^ reference):
            holder, lacking = (j, 0) if odd[0] in per_expert[j] else (0, j)
            raise CheckpointError(
                f"layer {index}: expert {lacking} lacks {odd[0]} that expert {holder} has"
                f" ({block}experts.{lacking}.{odd[0]}); checkpoint incomplete"
            )
    return tuple(tuple(per_expert[j].values()) for j in range(num_experts))
