"""The structural check of a pruned checkpoint: headers and config only, no tensor data read (but the few bytes of
compressed-tensors' ``weight_shape``).

Three steps, each failing with one line that names the layer and the tensor:

1. the config is consistent (top-k within the expert count, groups dividing it, MTP layers declared);
2. every MoE layer (MTP layers too) holds exactly the config's expert count, each expert with the same set
   of tensors (checked by name from the safetensors headers);
3. transformers itself agrees: the model is instantiated from the config on the meta device and the
   checkpoint's keys, as meta tensors of the header shapes and dtypes, go through transformers' own loading
   conversion (the one ``from_pretrained`` uses, experts fused in memory); any missing, unexpected or
   mismatched key is an error. Quantised weights in a format calibration reads (``stream/dequant.py``) go
   through at their dequantised names and shapes; those of other formats are loaded by a quantiser, not this
   path, and are checked by name only (step 2).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from moeslim.errors import CheckpointError, StructureError
from moeslim.families.table import Family, text_config
from moeslim.layout import (
    Layout,
    Routing,
    decoder_layer_of,
    expert_pattern,
    incomplete_expert,
    resolve_layout,
    routing_of,
)
from moeslim.quant import QUANT_SUFFIXES, unreadable
from moeslim.source import Checkpoint


@dataclass(frozen=True)
class Structure:
    """What the structural check established about a checkpoint."""

    layout: Layout
    tensors: int  # tensors in the headers
    checked_by_transformers: int  # of which went through transformers' conversion
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "ok": True,
            "experts": self.layout.num_experts,
            "top_k": self.layout.top_k,
            "moe_layers": len(self.layout.layers),
            "mtp_layers": sum(layer.mtp for layer in self.layout.layers),
            "tensors": self.tensors,
            "checked_by_transformers": self.checked_by_transformers,
            "notes": list(self.notes),
        }


def check_structure(ckpt: Checkpoint, what: str = "pruned checkpoint", trust_remote_code: bool = False) -> Structure:
    """Check ``ckpt`` against its own config without reading weights; raise ``StructureError`` on the first fault."""
    routing = routing_of(ckpt.config)
    check_config(routing, text_config(ckpt.config), what)
    check_experts(ckpt, routing, what)
    try:
        layout = resolve_layout(ckpt)
    except CheckpointError as e:
        raise StructureError(f"{what}: {e}") from e
    checked, notes = check_with_transformers(ckpt, layout, what, trust_remote_code)
    return Structure(layout, len(ckpt.tensors), checked, notes)


def check_config(routing: Routing, cfg: dict, what: str) -> None:
    """Expert count, top-k and groups that an engine can serve (``routing_of`` has checked top-k against the
    expert count and the groups' sizes)."""
    e, k, g = routing.num_experts, routing.top_k, routing.n_group
    if g > 1 and k > routing.topk_group * (e // g):
        raise StructureError(
            f"{what}: config top-k {k} exceeds topk_group={routing.topk_group} groups × {e // g} experts"
        )
    mtp = cfg.get(routing.family.mtp_key) if routing.family.mtp_key else None
    if mtp is not None and (not isinstance(mtp, int) or mtp < 0):
        raise StructureError(f"{what}: config {routing.family.mtp_key}={mtp!r} is not a layer count")


def check_experts(ckpt: Checkpoint, routing: Routing, what: str) -> None:
    """Per-expert families: each MoE layer holds experts 0..E-1 exactly, all with the same tensors."""
    family = routing.family
    if family.fused:
        return  # one tensor per layer with experts on dim 0: resolve_layout checks its rows
    for index, experts in sorted(per_expert_tensors(ckpt, family).items()):
        block = experts.pop("block")
        found = incomplete_expert(experts, routing.num_experts)
        if found is not None:
            j, suffix = found
            suffix = suffix or sorted(set().union(*experts.values()))[0]
            raise StructureError(
                f"{what} is missing {block}{j}.{suffix} (layer {index}, expert {j});"
                f" config.json says {routing.num_experts} experts"
            )
        extra = sorted(j for j in experts if j >= routing.num_experts)
        if extra and not family.extra_experts:
            name = f"{block}{extra[0]}.{sorted(experts[extra[0]])[0]}"
            raise StructureError(
                f"{what} holds {name} (layer {index}, expert {extra[0]}) but config.json says"
                f" {routing.num_experts} experts; the config does not match the tensors"
            )


def per_expert_tensors(ckpt: Checkpoint, family: Family) -> dict[int, dict]:
    """Layer index → {expert id → tensor suffixes, "block": the experts' key prefix}."""
    pattern = expert_pattern(family)
    found: dict[int, dict] = defaultdict(lambda: defaultdict(set))
    for name in ckpt.tensors:
        if m := pattern.match(name):
            layer = found[int(m["layer"])]
            layer["block"] = m["prefix"]
            layer[int(m["expert"])].add(m["suffix"])
    return {i: dict(v) for i, v in found.items()}


def check_with_transformers(
    ckpt: Checkpoint, layout: Layout, what: str, trust_remote_code: bool = False
) -> tuple[int, tuple[str, ...]]:
    """Feed the header shapes as meta tensors through transformers' loading conversion of a meta model."""
    from moeslim.stream.runner import load_on_meta

    mtp = tuple(_mtp_prefix(layer.block, layout.family) for layer in layout.layers if layer.mtp)
    # a quantisation calibration reads is checked at its dequantised names and shapes; others by name only
    # fused experts quantised (``unread_experts``): their weights and companions by name too
    fused = {n for layer in layout.layers if layer.quantised for n in (*layer.fused, *layer.quantised)}
    by_name = unreadable(ckpt.config) is not None or bool(fused)
    names = [n for n in ckpt.tensors if not n.startswith(mtp) and not (by_name and n.endswith(QUANT_SUFFIXES))]
    names = [n for n in names if n not in fused]
    model, info, count = load_on_meta(ckpt, names, trust_remote_code)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing = {m for m in info.missing_keys if not (m in tied and tied[m] not in info.missing_keys)}
    if by_name:  # a weight stored under other names, e.g. `<name>_blocks` + `<name>_scales`
        missing = {m for m in missing if not any(n.startswith(m + "_") for n in ckpt.tensors)}
    _raise_first(what, missing, set(info.unexpected_keys), list(info.mismatched_keys), info.conversion_errors)
    notes = [f"MTP layers {[layer.index for layer in layout.layers if layer.mtp]} are not run by transformers:"
             " checked by name and expert count only"] if mtp else []  # fmt: skip
    if by_name:
        notes.append("quantised tensors are loaded by a quantiser: checked by name and expert count only")
    return count, tuple(notes)


def _mtp_prefix(block: str, family: Family) -> str:
    """What transformers does not model of an MTP layer: ``model.layers.61.`` or, under its own root, all of
    ``mtp.`` (Qwen3-Next releases: ``mtp.layers.0.…``, ``mtp.fc.…``)."""
    layer = block[: len(block) - len(family.block_path)]
    root = layer[: layer.rindex(f"{family.layers_name}.")]
    return root if root.endswith("mtp.") else layer


def _raise_first(what: str, missing: set, unexpected: set, mismatched: list, errors: dict) -> None:
    if missing:
        name = sorted(missing)[0]
        raise StructureError(f"{what} is missing {name} ({_where(name)}), which transformers expects for its config")
    if unexpected:
        name = sorted(unexpected)[0]
        raise StructureError(f"{what} holds {name} ({_where(name)}), which transformers does not expect for its config")
    if mismatched:
        name, got, want = sorted(mismatched, key=lambda m: m[0])[0]
        raise StructureError(
            f"{what}: {name} ({_where(name)}) loads as shape {list(got)} but its config makes transformers expect"
            f" {list(want)}; the config does not match the tensors"
        )
    if errors:
        name = sorted(errors)[0]
        raise StructureError(f"{what}: transformers cannot convert {name} ({_where(name)}): {errors[name]}")


def _where(name: str) -> str:
    index = next((i for stack in ("layers", "blocks") if (i := decoder_layer_of(name, stack)) is not None), None)
    return "outside the decoder layers" if index is None else f"layer {index}"
