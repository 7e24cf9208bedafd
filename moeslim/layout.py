"""A checkpoint's MoE structure: which layers hold experts, and which tensors are routers and experts.

Built from the family description, the config and the tensor names, and checked against each other, so
that surgery can trust it: every MoE layer has a router with one row per expert and a full set of experts.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

from moeslim.errors import CheckpointError, UnsupportedModelError
from moeslim.families.table import Family, config_value, family_of, text_config
from moeslim.jsonio import is_whole
from moeslim.quant import FUSED_SCALES, quantization_config
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
    dims: tuple[tuple[str, int], ...] = ()  # router / fused tensors whose experts are on a dim other than 0
    # router / fused tensors with (rows per expert, extra rows after the experts) other than (1, 0): experts
    # flattened into a matrix (DBRX's ``w1`` is ``[experts × ffn, hidden]``), zero-computation experts' rows
    blocks: tuple[tuple[str, int, int], ...] = ()
    extra: tuple[tuple[int, tuple[str, ...]], ...] = ()  # (index, names) of per-expert tensors past the experts
    # tensors that quantise a fused one (``experts.gate_up_proj_scale_inv`` beside an FP8 ``experts.gate_up_proj``):
    # those with a slice per expert are in ``fused`` too, sliced as bytes like their weight, one value for every
    # expert is left whole; their weights are not dequantised (``unread_experts``)
    quantised: tuple[str, ...] = ()

    def dim_of(self, name: str) -> int:
        """The dim of ``name`` (a router or fused tensor) that indexes experts."""
        return dict(self.dims).get(name, 0)

    def block_of(self, name: str) -> tuple[int, int]:
        """``(rows per expert, extra rows after the experts)`` of ``name`` (a router or fused tensor)."""
        return next(((k, z) for n, k, z in self.blocks if n == name), (1, 0))

    def expert_tensors(self, j: int) -> tuple[tuple[str, tuple[int, int] | None], ...]:
        """Routed expert ``j``'s on-disk tensors, read the same way whichever form the layer is stored in:
        ``(name, None)`` for a per-expert tensor (all of it is expert ``j``'s) and ``(name, (start, stop))`` for a
        fused one (its rows ``start:stop`` along dim 0; ``T[j]`` where each expert has one row). Raises
        ``ValueError`` for a fused tensor whose experts are not on dim 0 (a slice of it is not contiguous)."""
        if self.per_expert:
            return tuple((name, None) for name in self.per_expert[j])
        out: list[tuple[str, tuple[int, int] | None]] = []
        for name in self.fused:
            if self.dim_of(name) != 0:
                raise ValueError(f"{name} keeps its experts on dim {self.dim_of(name)}, not 0")
            per, _ = self.block_of(name)
            out.append((name, (j * per, (j + 1) * per)))
        return tuple(out)

    def rows_of(self, name: str, kept: tuple[int, ...], size: int) -> tuple[int, ...]:
        """The rows of ``name``'s expert dim (``size`` long) that keep experts ``kept``: each expert's block of
        rows, then every extra row after the experts (zero-computation experts stay)."""
        per, extra = self.block_of(name)
        experts = (size - extra) // per
        return (*(j * per + r for j in kept for r in range(per)), *range(experts * per, size))


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


def unread_experts(layout: Layout, config: dict) -> str | None:
    """Why calibration and ``weight-norm`` cannot read ``layout``'s experts (``config``: its ``config.json``), or
    None: experts quantised in the fused module naming are sliced by surgery but not dequantised (no public release
    ships them)."""
    quantised = next((n for layer in layout.layers for n in layer.quantised), None)
    if quantised is None:
        return None
    method = quantization_config(config).get("quant_method", "quantised")
    return (
        f"{method} experts in the fused module naming ({quantised}) are not dequantised (moeslim reads quantised"
        " experts per expert, as FP8 and NVFP4 releases ship them)"
    )


def routing_of(config: dict) -> Routing:
    """Routing settings from a raw ``config.json`` dict (looking through multimodal wrappers), checked for sense:
    a top-k the experts cannot serve or groups that do not divide them fail here, for every command alike."""
    family = family_of(config)
    cfg = text_config(config)
    num_experts = _config_int(cfg, family.count_keys, "expert count", family.per_layer)
    top_k = _config_int(cfg, family.top_k_keys, "top-k", family.per_layer)
    if not 1 <= top_k <= num_experts:
        raise CheckpointError(
            f"config.json routes each token to top-k {top_k} of {num_experts} experts; top-k must be between 1 and"
            f" {num_experts}, the config is corrupt"
        )
    n_group, topk_group = _groups(family, cfg, num_experts)
    listed = cfg.get(family.layers_list) if family.layers_list else None
    if isinstance(listed, list) and "num_hidden_layers" not in cfg:
        num_hidden_layers = len(listed)
    elif family.layers_list and listed is not None and not isinstance(listed, list):
        # the count under the key the family's model reads (DBRX: n_layers), before a num_hidden_layers that counts
        # something else (LongCat-Flash saved by transformers 5.16: one per attention, twice the layers)
        num_hidden_layers = _config_int(cfg, (family.layers_list,), "layer count")
    else:  # the count itself
        num_hidden_layers = _config_int(cfg, ("num_hidden_layers", *filter(None, [family.layers_list])), "layer count")
    if num_hidden_layers < 1:
        raise CheckpointError(f"config.json says num_hidden_layers={num_hidden_layers}; the config is corrupt")
    return Routing(family, num_experts, top_k, n_group, topk_group, num_hidden_layers)


def _groups(family: Family, cfg: dict, num_experts: int) -> tuple[int, int]:
    """``(n_group, topk_group)`` of group-limited routing, ``(1, 1)`` without it."""
    try:
        n_group = family.groups(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"config.json {family.group_keys[0]} {cfg.get(family.group_keys[0])!r} is not a whole number;"
            " fix the config"
        ) from e
    if n_group == 1:
        return 1, 1
    group_key, chosen_key = family.group_keys
    n_group = _config_int(cfg, (group_key,), "group count")
    topk_group = _config_int(cfg, (chosen_key,), "chosen group count") if cfg.get(chosen_key) else n_group
    size = num_experts // n_group if n_group > 0 else 0
    if n_group < 1 or num_experts % n_group or size < family.min_per_group:
        raise CheckpointError(
            f"config.json {group_key} {n_group} does not split {num_experts} experts into equal groups of at least"
            f" {family.min_per_group}; the config is corrupt"
        )
    if not 1 <= topk_group <= n_group:
        raise CheckpointError(
            f"config.json {chosen_key} {topk_group} must be between 1 and {group_key} {n_group}; the config is corrupt"
        )
    return n_group, topk_group


def resolve_layout(ckpt: Checkpoint) -> Layout:
    """Find the MoE layers of ``ckpt`` and check tensor names and shapes against its config.

    A family's checkpoints come in two namings that transformers loads: the release naming ``save_pretrained``
    writes (``mlp.experts.N.gate_proj.weight``: transformers fuses the experts when it loads them) and the module's
    own parameter names (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, loaded as they are), where they differ
    (``Family.module``). Which one a layer is in is read from its tensor names, never from the family; the layout's
    ``family`` is the naming of its layers, and each layer keeps its experts as it found them."""
    routing = routing_of(ckpt.config)
    n_layers = routing.num_hidden_layers
    found = _moe_blocks(ckpt, routing.family, n_layers)
    _check_layer_count(ckpt, namings(routing.family), n_layers)
    blocks = {index: block for index, (block, _) in found.items()}
    inside = _names_by_block(ckpt, routing.family, set(blocks.values()))
    layers, named = [], []
    for index, (block, candidates) in sorted(found.items()):
        form, collected = _naming_of(inside[block], candidates, block)
        named.append(form)
        layers.append(_moe_layer(ckpt, form, index, block, routing.num_experts, index >= n_layers, collected))
    family = _one_naming(named, [layer.index for layer in layers])
    cfg = {**text_config(ckpt.config), "num_hidden_layers": n_layers}
    _check_layers_against_config(routing.family, cfg, blocks, n_layers, ckpt.tensors)
    return Layout(**{**vars(routing), "family": family}, layers=tuple(layers))


def namings(family: Family) -> tuple[Family, ...]:
    """The namings a checkpoint of ``family`` may be in: the release naming, then the module's own, if it differs."""
    return (family,) if family.module is None else (family, family.module)


Collected = tuple[list[str], list[str], dict[int, dict[str, str]]]  # router, fused, per-expert {id: {suffix: name}}


def _names_by_block(ckpt: Checkpoint, family: Family, blocks: set[str]) -> dict[str, list[str]]:
    """MoE block key prefix → the tensor names under it, in one pass over the checkpoint's names (a DeepSeek-V3
    release has 90 thousand)."""
    stacks = "|".join(sorted({re.escape(f.layers_name) for f in namings(family)}))
    paths = sorted({f.block_path for f in namings(family)})
    layer = re.compile(rf"^(.*?(?:{stacks})\.\d+\.)")
    inside: dict[str, list[str]] = {block: [] for block in blocks}
    for name in ckpt.tensors:
        if m := layer.match(name):
            for path in paths:
                block = m.group(1) + path
                if block in inside and name.startswith(block):
                    inside[block].append(name)
                    break
    return inside


def _naming_of(names: list[str], candidates: list[Family], block: str) -> tuple[Family, Collected]:
    """The naming of the MoE block ``block`` among those whose router it has, and its tensors under it: the first
    under which the block holds expert tensors (per-expert or fused), else the first (whose checks then say what is
    missing)."""
    first = None
    for form in candidates:
        collected = _collect(names, form, block)
        if collected[1] or collected[2] or len(candidates) == 1:
            return form, collected
        first = first or (form, collected)
    assert first is not None
    return first


def _one_naming(named: list[Family], indices: list[int]) -> Family:
    """The naming of the checkpoint's MoE layers, which may differ in how they store experts (per-expert or fused)
    but not in where the router and the layers are; that of the first layer."""
    first = named[0]
    where = (first.layers_name, first.block_path, first.router_weight)
    for form, index in zip(named, indices, strict=True):
        if (form.layers_name, form.block_path, form.router_weight) != where:
            raise CheckpointError(
                f"layer {index} has its router at {form.layers_name}.N.{form.block_path}{form.router_weight}, layer"
                f" {indices[0]} at {first.layers_name}.N.{first.block_path}{first.router_weight}: the checkpoint mixes"
                " two namings of its MoE layers; re-download or re-export it in one"
            )
    return first


def _config_int(cfg: dict, keys: tuple[str, ...], what: str, per_layer: tuple[str, ...] = ()) -> int:
    """The first of ``keys`` that ``cfg`` sets (not null), which must be a JSON whole number; for a key in
    ``per_layer``, also a list of one whole number per layer, all equal (Hunyuan-A13B's ``moe_topk: [8, 8, …]``),
    read as that number."""
    for key in keys:
        value = config_value(cfg, key)
        if value is None:
            continue
        if key in per_layer and isinstance(value, list) and value and all(is_whole(v) for v in value):
            if len(set(value)) > 1:
                raise UnsupportedModelError(
                    f"config.json {key} differs between layers ({_short(value)}); a per-layer different {what} is"
                    " not supported, moeslim gives every MoE layer one"
                )
            value = value[0]
        if not is_whole(value):
            raise CheckpointError(f"config.json {key} is {value!r}, not a whole number; fix or re-download the config")
        return value
    raise CheckpointError(f"config.json has no {what} (looked for {', '.join(keys)}); the config is incomplete")


def _short(values: list) -> str:
    """A list as JSON, its middle elided past eight entries."""
    shown = [*map(str, values[:4]), "…", *map(str, values[-4:])] if len(values) > 8 else list(map(str, values))
    return "[" + ", ".join(shown) + "]"


def _moe_blocks(ckpt: Checkpoint, family: Family, n_layers: int) -> dict[int, tuple[str, list[Family]]]:
    """Layer index → (MoE block key prefix, the namings whose router weight is there), found from where the router
    weights are, in any of the family's namings. Layers under an ``mtp.`` prefix (Qwen3-Next releases:
    ``mtp.layers.0.…``) are MTP layers, numbered after the trunk."""
    found: dict[int, tuple[str, list[Family]]] = {}
    prefixes = set()
    for form in namings(family):
        stack, block = re.escape(form.layers_name), re.escape(form.block_path)
        pattern = re.compile(rf"^(.*?){stack}\.(\d+)\.{block}{re.escape(form.router_weight)}$")
        for name in ckpt.tensors:
            if m := pattern.match(name):
                mtp = m.group(1).endswith("mtp.")
                if not mtp:
                    prefixes.add(m.group(1))
                index = int(m.group(2)) + (n_layers if mtp else 0)
                where = f"{m.group(1)}{form.layers_name}.{m.group(2)}.{form.block_path}"
                seen, forms = found.setdefault(index, (where, []))
                if seen != where:
                    raise CheckpointError(
                        f"layer {index} has a router under {seen} and another under {where}: the checkpoint mixes"
                        " two namings of its MoE layers; re-download or re-export it in one"
                    )
                forms.append(form)
    if not found:
        raise CheckpointError(
            f"no MoE router tensors found (expected names like model.{family.layers_name}.N.{family.block_path}"
            f"{family.router_weight} for a {family.name} model); the checkpoint does not match its config"
        )
    if len(prefixes) > 1:
        raise CheckpointError(f"MoE layers found under several prefixes ({sorted(prefixes)}); cannot tell the trunk")
    return found


def decoder_layer_of(name: str, layers_name: str = "layers") -> int | None:
    """The decoder layer a tensor name lies in (``model.layers.3.mlp…`` → 3), or None outside the layers."""
    m = _layer_index(layers_name).search(name)
    return int(m.group(1)) if m else None


@cache
def _layer_index(layers_name: str) -> re.Pattern[str]:
    return re.compile(rf"(?:^|\.){re.escape(layers_name)}\.(\d+)\.")


def expert_pattern(family: Family) -> re.Pattern[str]:
    """Per-expert tensor names of ``family``: groups ``prefix`` (up to the expert id), ``layer``, ``expert`` and
    ``suffix`` (``model.layers.1.mlp.experts.`` / ``1`` / ``3`` / ``down_proj.weight``)."""
    prefixes = "|".join(re.escape(p) for p in family.experts)
    stack, block = re.escape(family.layers_name), re.escape(family.block_path)
    return re.compile(
        rf"^(?P<prefix>(?:.*?\.)?{stack}\.(?P<layer>\d+)\.{block}(?:{prefixes}))(?P<expert>\d+)\.(?P<suffix>.+)$"
    )


def incomplete_expert(experts: dict[int, set[str]], num_experts: int) -> tuple[int, str | None] | None:
    """The first expert of a per-expert layer that lacks a tensor: ``(expert, None)`` when it has none at all,
    ``(expert, suffix)`` when it lacks ``suffix`` that another expert has; None when experts 0..E-1 all hold the
    same tensors. The one completeness rule of per-expert layers (the layout and the structural check say it)."""
    for j in range(num_experts):
        if not experts.get(j):
            return j, None
    every = set().union(*(experts[j] for j in range(num_experts)))
    for j in range(num_experts):
        if lacking := sorted(every - experts[j]):
            return j, lacking[0]
    return None


def _check_layer_count(ckpt: Checkpoint, forms: tuple[Family, ...], n_layers: int) -> None:
    """``num_hidden_layers`` cannot exceed the decoder layers that have weights, in any of the family's namings
    (checked before any per-layer work, so an absurd count fails at once)."""
    stacks = {f.layers_name for f in forms}
    found = {i for name in ckpt.tensors for stack in stacks if (i := decoder_layer_of(name, stack)) is not None}
    if n_layers > max(found, default=-1) + 1:
        raise CheckpointError(
            f"config.json says num_hidden_layers={n_layers}, but the weights hold layers up to"
            f" {max(found, default=-1)}; the config does not match the weights"
        )


def _check_layers_against_config(
    family: Family, cfg: dict, blocks: dict[int, str], n_layers: int, names: Iterable[str]
) -> None:
    expected, mtp_expected = _layer_settings(family, cfg)
    trunk = {i for i in blocks if i < n_layers}
    if expected is None:  # derived families: the MoE layers are those with a router, and experts need one
        expected = trunk
        pattern = expert_pattern(family)
        if orphan := sorted({int(m["layer"]) for n in names if (m := pattern.match(n))} - set(blocks)):
            raise CheckpointError(
                f"layer {orphan[0]}: holds expert tensors but no router ({family.block_path}{family.router_weight});"
                " the checkpoint is incomplete, re-download it"
            )
    if missing := sorted(expected - trunk):
        raise CheckpointError(
            f"layer {missing[0]}: config says it is an MoE layer but its router tensor is missing;"
            " the checkpoint is incomplete, re-download it"
        )
    if extra := sorted(trunk - expected):
        raise CheckpointError(f"layer {extra[0]}: has a router but config says it is dense; the config does not match")
    mtp = sorted(i for i in blocks if i >= n_layers)
    if mtp and mtp != list(range(n_layers, n_layers + len(mtp))):
        raise CheckpointError(f"MoE layers {mtp} beyond num_hidden_layers={n_layers} are not consecutive MTP layers")
    if len(mtp) > mtp_expected and (family.mtp_key is not None or family.moe_layers is not None):
        raise CheckpointError(
            f"layer {mtp[0]} lies beyond num_hidden_layers={n_layers} but the config declares"
            f" {mtp_expected} MTP layers; the config does not match the tensors"
        )


def _layer_settings(family: Family, cfg: dict) -> tuple[set[int] | None, int]:
    """Which trunk layers the config makes MoE (None: the family leaves it to the tensors), and how many MTP
    layers it declares."""
    mtp = cfg.get(family.mtp_key) if family.mtp_key else None
    if mtp is not None and not (is_whole(mtp) and mtp >= 0):
        raise CheckpointError(f"config.json {family.mtp_key} is {mtp!r}, not a count; fix or re-download the config")
    first = cfg.get("first_k_dense_replace")  # starts a range of layers: bounded before any list is made of it
    if first is not None and not (is_whole(first) and 0 <= first <= cfg["num_hidden_layers"]):
        raise CheckpointError(
            f"config.json first_k_dense_replace is {first!r}, not a layer count within num_hidden_layers;"
            " fix or re-download the config"
        )
    if family.moe_layers is None:
        return None, mtp or 0
    try:
        expected = set(family.moe_layers(cfg))
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise CheckpointError(
            f"config.json cannot say which layers are MoE ({type(e).__name__}: {e}); fix or re-download the config"
        ) from e
    if odd := [i for i in expected if not is_whole(i)]:
        raise CheckpointError(f"config.json names MoE layer {odd[0]!r}, not a layer number; fix or re-download it")
    return expected, mtp or 0


def _collect(names: list[str], family: Family, block: str) -> Collected:
    """The router tensors, fused expert tensors and per-expert tensors (expert id → {suffix: full name}) among
    ``names`` (those under the MoE block ``block``) under ``family``'s naming. A fused tensor's quantisation
    companions (``experts.gate_up_proj_scale_inv``: its name, ``_`` and a quantiser's suffix) are fused tensors."""
    router, fused = [], []
    per_expert: dict[int, dict[str, str]] = defaultdict(dict)
    for name in names:
        rel = name[len(block) :]
        if _matches(rel, family.router):
            router.append(name)
        elif family.fused and (_matches(rel, family.experts) or companion_of(rel, family.experts)):
            fused.append(name)
        elif not family.fused and (found := _expert_part(rel, family.experts)):
            per_expert[found[0]][found[1]] = name
    return router, fused, per_expert


def companion_of(rel: str, experts: tuple[str, ...]) -> str | None:
    """The fused expert tensor (relative name, among ``experts``) that ``rel`` quantises, or None."""
    if rel in experts:
        return None
    return next((e for e in experts if rel.startswith(e + "_") and rel[len(e) :].endswith(FUSED_SCALES)), None)


def _moe_layer(
    ckpt: Checkpoint, family: Family, index: int, block: str, num_experts: int, mtp: bool, collected: Collected
) -> MoeLayer:
    router, fused, per_expert = collected
    quantised = tuple(n for n in fused if companion_of(n[len(block) :], family.experts))
    fused = [n for n in fused if n not in quantised or _sliced(ckpt, family, block, n, index, num_experts)]
    rel_dims = dict(family.dims)
    dims = tuple((n, rel_dims[n[len(block) :]]) for n in router + fused if n[len(block) :] in rel_dims)
    blocks = tuple(_blocks(ckpt, family, block, n, num_experts, index, dict(dims).get(n, 0)) for n in router + fused)
    if family.fused and not fused:
        raise CheckpointError(
            f"layer {index}: no expert tensors under {block}{family.experts[0]}; checkpoint incomplete"
        )
    extra: tuple[tuple[int, tuple[str, ...]], ...] = ()
    if family.extra_experts:  # e.g. zero-computation experts' unused weights: kept after the kept experts
        extra = tuple((j, tuple(per_expert.pop(j).values())) for j in sorted(per_expert) if j >= num_experts)
    experts = () if family.fused else _check_per_expert(per_expert, num_experts, index, block)
    odd = tuple(b for b in blocks if b[1:] != (1, 0))
    return MoeLayer(index, block, tuple(router), tuple(fused), experts, mtp, dims, odd, extra, quantised)


def _sliced(ckpt: Checkpoint, family: Family, block: str, name: str, index: int, num_experts: int) -> bool:
    """Whether companion ``name`` has a slice per expert on dim 0, which surgery slices as bytes; False for one
    value for every expert (a per-tensor scale), left whole as pruning leaves it. Any other shape is refused."""
    shape = ckpt.tensors[name].shape
    if math.prod(shape) == 1:
        return False
    base = companion_of(name[len(block) :], family.experts)
    if dict(family.dims).get(base or "", 0) != 0 or not shape or shape[0] != num_experts:
        raise UnsupportedModelError(
            f"layer {index}: {name} {list(shape)} quantises the fused experts {block}{base} without one slice per"
            f" expert on dim 0 (config: {num_experts} experts); moeslim cannot prune it: use the per-expert release"
            " of the model, or its unquantised one"
        )
    return True


def _matches(rel: str, names: tuple[str, ...]) -> bool:
    return any(rel.startswith(n) if n.endswith(".") else rel == n for n in names)


_EXPERT_ID = re.compile(r"(\d+)\.(.+)$")


def _expert_part(rel: str, prefixes: tuple[str, ...]) -> tuple[int, str] | None:
    """``experts.5.w1.weight`` → ``(5, "w1.weight")``."""
    for prefix in prefixes:
        if rel.startswith(prefix) and (m := _EXPERT_ID.match(rel, len(prefix))):
            return int(m.group(1)), m.group(2)
    return None


def _blocks(
    ckpt: Checkpoint, family: Family, block: str, name: str, num_experts: int, index: int, dim: int
) -> tuple[str, int, int]:
    """``(name, rows per expert, extra rows)`` of a router or fused tensor, checked against its shape."""
    rel = name[len(block) :]
    extra = dict(family.extra_rows).get(rel, 0)
    shape = ckpt.tensors[name].shape
    size = shape[dim] if len(shape) > dim else 0
    per = (size - extra) // num_experts if rel in family.flattened else 1
    if per < 1 or size != per * num_experts + extra:
        raise CheckpointError(
            f"layer {index}: {name} has shape {list(shape)}, but config says {num_experts} experts;"
            " the tensors do not match the config"
        )
    return name, per, extra


def _check_per_expert(
    per_expert: dict[int, dict[str, str]], num_experts: int, index: int, block: str
) -> tuple[tuple[str, ...], ...]:
    if extra := sorted(j for j in per_expert if j >= num_experts):
        raise CheckpointError(
            f"layer {index}: expert {extra[0]} exists but config says {num_experts} experts; the config does not match"
        )
    found = incomplete_expert({j: set(parts) for j, parts in per_expert.items()}, num_experts)
    if found is not None:
        lacking, suffix = found
        if suffix is None:
            raise CheckpointError(
                f"layer {index}: expert {lacking} has no tensors under {block}; checkpoint incomplete"
            )
        holder = min(j for j in range(num_experts) if suffix in per_expert[j])
        raise CheckpointError(
            f"layer {index}: expert {lacking} lacks {suffix} that expert {holder} has"
            f" ({block}experts.{lacking}.{suffix}); checkpoint incomplete"
        )
    return tuple(tuple(per_expert[j].values()) for j in range(num_experts))
