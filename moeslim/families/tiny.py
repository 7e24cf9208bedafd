"""Tiny random models of any MoE family, built from its own config class: the derivation's probe and the
tests' checkpoints.

Widths are shrunk to a few dozen, the layer count to a handful, and the routed expert count set exactly;
per-layer lists in the config are cut to the new layer count, keeping one layer of every kind the family mixes
(attention / linear attention, dense / sparse MLP, ...). Widths that other widths are derived from (MLA's rope
head, grouped-query ratios, M-RoPE sections, Mamba heads) are kept consistent. What a family's config
validators need beyond that is small data in ``TINY_OVERRIDES``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeGuard

from moeslim.stream.build import architecture_of

SHRINK: dict[str, int] = {
    "hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 32, "expert_ffn_hidden_size": 32,
    "shared_expert_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32, "share_expert_dim": 32,
    "shared_experts_intermediate_size": 32, "shared_intermediate_size": 32, "ffn_hidden_size": 32,
    "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16, "vocab_size": 256,
    "max_position_embeddings": 512, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 16, "qk_head_dim": 16, "n_shared_experts": 1, "num_shared_experts": 1,
    "moe_num_shared_experts": 1, "index_n_heads": 4, "index_head_dim": 16, "index_topk": 8, "index_kpool": 4,
    "mamba_d_state": 16, "mamba_d_head": 16, "mamba_dt_rank": 8, "mamba_chunk_size": 16, "moe_hidden_size": 32,
    "intermediate_size_mlp": 64, "unpadded_vocab_size": 256, "vocab_size_per_layer_input": 256,
    "hidden_size_per_layer_input": 16, "linear_head_dim": 16, "linear_num_heads": 4,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "zero_expert_num": 2,
}  # fmt: skip
COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K = re.compile(r"^(num_experts_per_tok(en)?|experts_per_token|moe_k|moe_topk|moe_top_k|top_k|top_k_experts)$")
GROUP_KEYS = ("n_group", "num_expert_group")
TINY_LAYERS = 4
# Dicts inside a config that are data, not sub-configs: never shrunk.
_DATA_DICTS = ("rope_parameters", "rope_scaling", "id2label", "label2id", "quantization_config", "ffn_act_fn")
# Layer counts (and equal-length per-layer lists) that follow them.
_LAYER_KEYS = ("num_hidden_layers", "n_layers", "num_layers")

Override = dict[str, Any] | Callable[[dict[str, Any], int, int], None]
# Per-family settings that the generic shrink cannot guess (config validators, layer patterns), applied last to
# the family's (text) config dict. A key "a.b" sets b in the nested dict a. A callable gets (dict, experts, top_k)
# and edits the dict. ``"top_k"`` forces the routed top-k of families whose code supports only one value.
TINY_OVERRIDES: dict[str, Override] = {
    # DbrxAttention reads both; the default config has neither (released: 500000, 8)
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},
    "deepseek_ocr2_text": {"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]},  # default None: unbuildable
    "doge": {"is_moe": True},  # the default is the dense variant
    # M-RoPE sections (the model's fallback, sized for the released head) summing to the tiny rotary half
    "ernie4_5_vl_moe": {"text_config.rope_parameters.mrope_section": [3, 3, 2]},
    "glm4v_moe": {"text_config.rope_parameters.mrope_section": [2, 1, 1]},
    # all Mamba by default, and the cache then has no attention layer to measure
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},  # default None: unbuildable
    # The vision encoder plans its layers from the patch: a 40-pixel patch makes 600k-wide layers, and fewer
    # layers than scales needs scipy. A 2-pixel patch plans 3 small layers.
    "inkling_mm_model": {"vision_config.patch_size": 2, "vision_config.n_layers": 3},
    # the talker reads both; its default config has neither
    "qwen3_omni_moe": {
        "talker_config.text_config.shared_expert_intermediate_size": 32,
        "talker_config.spatial_merge_size": 2,
    },
    # the indexed-attention layers need the (released) QSA indexer, which the default leaves unset
    "qwen4_exp_text": {
        "indexer_n_heads": 4,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 8,
        "indexer_compress_ratio": 4,
    },
    "step3p5": {"sliding_window": 512},  # the sliding mask is always built; the default leaves the window unset
    # the MoE block is optional and off by default (the 26B-A4B release turns it on)
    "gemma4_text": {"enable_moe_block": True, "moe_intermediate_size": 32},
    "gemma4": {"text_config.enable_moe_block": True, "text_config.moe_intermediate_size": 32},
    "zaya": {"top_k": 1},  # "ZAYA currently supports num_experts_per_tok=1 only"
}


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _layer_index(k: object) -> int | None:
    """A per-layer dict's key as a layer index (``3`` or ``"03"``), else None."""
    if _is_int(k):
        return k
    return int(k) if isinstance(k, str) and k.isdigit() else None


def _per_layer_dict(v: object, layers: int) -> bool:
    return isinstance(v, dict) and bool(v) and all((i := _layer_index(k)) is not None and 0 <= i < layers for k in v)


def _aliases(model_type: str) -> dict[str, str]:
    """The config class's attribute_map (standard name → the key it stores), e.g. dbrx's hidden_size → d_model."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {})
    except KeyError:
        return {}


# Per-layer-kind variants of the attention widths (sliding-window layers with their own head count, ...).
_VARIANT = re.compile(r"^(?:(?:swa|sliding|local|global)_(num_attention_heads|num_key_value_heads|head_dim)"
                      r"|num_(?:swa|sliding|local|global)_(attention_heads|key_value_heads))$")  # fmt: skip


def _canonical(k: str, shrink_keys: dict[str, int]) -> str | None:
    """The SHRINK key that ``k`` is (or is a per-layer-kind variant of), else None."""
    if k in shrink_keys:
        return k
    m = _VARIANT.match(k)
    return None if m is None else m[1] or f"num_{m[2]}"


def _per_layer_width(k: str) -> str | None:
    """The SHRINK key of a list-valued width: the key itself, or ``<key>_per_layer``."""
    name = k.removesuffix("_per_layer")
    return name if name in SHRINK and name not in ("vocab_size", "max_position_embeddings") else None


_SHARED_KEYS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")


def _shrink_values(d: dict[str, Any], experts: int, top_k: int, aliases: dict[str, str]) -> None:
    """Widths, expert count, top-k and groups of one config dict and its nested sub-config dicts."""
    shrink_keys = {**SHRINK, **{aliases[k]: v for k, v in SHRINK.items() if k in aliases}}
    old = dict(d)
    widths = _width_keys(d)
    has_count = any(_is_int(d.get(k)) for k in COUNT_KEYS)
    if not has_count and (unset := [k for k in COUNT_KEYS if k in d and d[k] is None]):
        d[unset[0]] = experts  # a config that leaves the count unset by default (dots.llm1, Gemma 4's MoE)
        has_count = True
    for k, v in list(d.items()):
        if isinstance(v, dict) and k not in _DATA_DICTS:
            for sub in v.values() if _per_layer_dict(v, 1 << 30) else [v]:
                if isinstance(sub, dict):
                    _shrink_values(sub, experts, top_k, {})
        elif k in COUNT_KEYS and _is_int(v):
            d[k] = experts
        elif TOP_K.match(k) and (_is_int(v) or (v is None and has_count)):
            d[k] = top_k
        elif k in GROUP_KEYS and _is_int(v) and v > 1:
            d[k] = 2
        elif k == "topk_group" and _is_int(v):
            d[k] = 1
        elif k.endswith("_token_id") and _is_int(v) and v >= SHRINK["vocab_size"]:
            d[k] = 0
        elif isinstance(v, list) and v and all(_is_int(x) and x > 0 for x in v) and (name := _per_layer_width(k)):
            d[k] = [shrink_keys[name]] * len(v)  # a width given per layer, or per modality (ERNIE-VL's experts)
        elif k in _SHARED_KEYS and v in (0, None):
            d[k] = SHRINK[k]  # an optional shared expert: in the probe, so its tensors are known
        elif not _is_int(v) or v <= 0:
            continue
        elif (name := _canonical(k, shrink_keys)) is not None:
            d[k] = shrink_keys.get(name, SHRINK.get(name, 0))
            heads = old.get(k.replace("key_value", "attention"), old.get(aliases.get("num_attention_heads", "")))
            if "key_value_heads" in k and _is_int(heads) and 0 < v < heads:
                d[k] = max(1, SHRINK["num_attention_heads"] * v // heads)  # keep the grouped-query ratio
        elif v in widths and _WIDTH.search(k) and not _NOT_WIDTH.search(k):
            d[k] = SHRINK["hidden_size"]  # a width that equals the hidden size (an embedding's, an adapter's)


def _derived_widths(d: dict[str, Any], old: dict[str, Any]) -> None:
    """Widths that the family derives from others: keep the relation the defaults had."""
    rope, nope = old.get("qk_rope_head_dim"), old.get("qk_nope_head_dim")
    if _is_int(rope) and rope > 0:
        for k in ("head_dim", "qk_head_dim"):
            if old.get(k) == rope:  # MLA: head_dim is the rope head
                d[k] = d["qk_rope_head_dim"]
            elif _is_int(nope) and old.get(k) == rope + nope:
                d[k] = d["qk_rope_head_dim"] + d.get("qk_nope_head_dim", 0)
    if d.get("head_dim", 0) is None and "qk_rope_head_dim" not in d and _is_int(d.get("num_attention_heads")):
        d["head_dim"] = SHRINK["head_dim"]
    # Mamba-2: heads × head dim must equal expand × hidden size.
    expand, hidden = d.get("mamba_expand"), d.get("hidden_size")
    for n_key, h_key in (("mamba_n_heads", "mamba_d_head"), ("mamba_num_heads", "mamba_head_dim")):
        if _is_int(expand) and _is_int(hidden) and _is_int(d.get(n_key)) and _is_int(d.get(h_key)):
            d[n_key] = max(1, expand * hidden // d[h_key])
    _scale_mrope(d)


def _rotary_half(d: dict[str, Any], rope: dict[str, Any]) -> int | None:
    """Half the rotary width of one attention head (what M-RoPE sections sum to)."""
    if _is_int(d.get("qk_rope_head_dim")) and d["qk_rope_head_dim"] > 0:
        return int(d["qk_rope_head_dim"]) // 2
    head = d.get("head_dim")
    if not _is_int(head) or head <= 0:
        heads, hidden = d.get("num_attention_heads"), d.get("hidden_size")
        if not (_is_int(heads) and _is_int(hidden) and heads > 0):
            return None
        head = hidden // heads
    factor = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0
    return int(head * factor) // 2


def _scale_mrope(d: dict[str, Any]) -> None:
    """M-RoPE sections (time, height, width) sum to half the rotary width: rescale them to the new width."""
    for rope in (d.get("rope_parameters"), d.get("rope_scaling")):
        if not isinstance(rope, dict):
            continue
        for sub in [rope, *[v for v in rope.values() if isinstance(v, dict)]]:
            section = sub.get("mrope_section")
            if not (isinstance(section, list) and section and all(_is_int(s) and s > 0 for s in section)):
                continue
            target = _rotary_half(d, sub)
            if target is None or target == sum(section) or target < len(section):
                continue
            total = sum(section)
            new = [max(1, s * target // total) for s in section]
            new[0] += target - sum(new)
            while new[0] < 1:  # the rounding took too much from the first: take it back from the largest
                big = max(range(1, len(new)), key=lambda i: new[i])
                new[big] -= 1
                new[0] += 1
            sub["mrope_section"] = new


_DENSE_FIRST = ("first_k_dense_replace", "num_dense_layers")  # the first k layers are dense


def _index_list(k: str, v: object, layers: int) -> bool:
    """A list of layer indices of one kind (``mlp_only_layers``, ``moe_layers``, identity ``kv_source_layers``)."""
    return (
        k.endswith(("layers", "layer_ids"))
        and isinstance(v, list)
        and all(_is_int(x) and 0 <= x < layers for x in v)
        and all(a < b for a, b in zip(v, v[1:], strict=False))
    )


def _layer_kinds(d: dict[str, Any], layers: int) -> list[tuple[str, ...]]:
    """Each layer's kind: its entries in the per-layer lists and dicts, and whether the dense-first count and the
    index lists name it."""
    lists = [v for k, v in d.items() if isinstance(v, list) and len(v) == layers and not _index_list(k, v, layers)]
    dicts = [
        {_layer_index(j): x for j, x in v.items()}
        for k, v in d.items()
        if k not in _DATA_DICTS and _per_layer_dict(v, layers)
    ]
    firsts = [v for k, v in d.items() if k in _DENSE_FIRST and _is_int(v)]
    indices = [set(v) for k, v in d.items() if _index_list(k, v, layers)]
    return [
        (
            *[repr(v[i]) for v in lists],
            *[repr(v.get(i)) for v in dicts],
            *[str(i < k) for k in firsts],
            *[str(i in s) for s in indices],
        )
        for i in range(layers)
    ]


def _cut_layers(d: dict[str, Any], layer_key: str, old_layers: int, keep_at_least: int) -> None:
    """Cut the layer count to a handful: the first layer of every kind (in order), then the layers after the last
    of those (the repeating body, e.g. sparse ones); the per-layer lists, dicts and counts follow."""
    keep: list[int] = []
    seen: set[tuple[str, ...]] = set()
    for i, kind in enumerate(_layer_kinds(d, old_layers)):
        if kind not in seen:
            seen.add(kind)
            keep.append(i)
    rest = [i for i in range(keep[-1] + 1, old_layers)] + [i for i in range(keep[-1]) if i not in keep]
    keep = sorted(keep + rest[: max(0, keep_at_least - len(keep))])
    new_index = {old: new for new, old in enumerate(keep)}
    d[layer_key] = len(keep)
    for k, v in list(d.items()):
        if _index_list(k, v, old_layers):
            d[k] = [new_index[i] for i in v if i in new_index]
        elif isinstance(v, list) and len(v) == old_layers:
            d[k] = [v[i] for i in keep]
        elif k not in _DATA_DICTS and _per_layer_dict(v, old_layers):
            d[k] = {
                (str(new_index[n]) if isinstance(j, str) else new_index[n]): x
                for j, x in v.items()
                if (n := _layer_index(j)) is not None and n in new_index
            }
        elif k in _DENSE_FIRST and _is_int(v):
            d[k] = sum(i < v for i in keep)
        elif k.endswith("_layer_period") and _is_int(v) and v > len(keep):
            # A period longer than the model: the layer kind it places would vanish. Scale it (and its offset).
            offset_key = k[: -len("period")] + "offset"
            d[k] = len(keep)
            if _is_int(d.get(offset_key)):
                d[offset_key] = d[offset_key] * len(keep) // v


def shrink(d: dict[str, Any], experts: int, top_k: int, model_type: str) -> dict[str, Any]:
    """Shrink one (text) config dict in place: widths, layers, experts, top-k, groups, token ids."""
    aliases = _aliases(model_type)
    old = dict(d)
    layer_key = next((k for k in (*_LAYER_KEYS, aliases.get("num_hidden_layers", "")) if _is_int(d.get(k))), None)
    top_k = _forced_top_k(model_type, top_k)
    _shrink_values(d, experts, top_k, aliases)
    _derived_widths(d, old)
    if layer_key is not None and d[layer_key] > TINY_LAYERS:
        _cut_layers(d, layer_key, d[layer_key], TINY_LAYERS)
    _apply_override(d, model_type, experts, top_k)
    return d


def _forced_top_k(model_type: str, top_k: int) -> int:
    """The top-k a family's override forces (its code supports no other), else ``top_k``."""
    override = TINY_OVERRIDES.get(model_type)
    forced = override.get("top_k") if isinstance(override, dict) else None
    return forced if _is_int(forced) else top_k


def _apply_override(d: dict[str, Any], model_type: str, experts: int, top_k: int) -> None:
    override = TINY_OVERRIDES.get(model_type)
    if callable(override):
        override(d, experts, top_k)
        return
    for key, value in (override or {}).items():
        if key == "top_k":
            continue
        *path, last = key.split(".")
        target = d
        for part in path:
            target = target.setdefault(part, {})
        target[last] = value


_OTHER_SHRINK = {"depth": 1, "num_hidden_layers": 1, "num_layers": 1, "n_layers": 1, "encoder_layers": 1,
                 "decoder_layers": 1, "out_hidden_size": 64, "text_hidden_size": 64, "projection_dim": 64,
                 "projector_hidden_size": 64, "embed_dim": 64, "d_model": 64, "output_dim": 64, "encoder_ffn_dim": 64,
                 "num_heads": 4, "encoder_attention_heads": 4,
                 "decoder_dim": 64, "downsample_hidden_size": 32, "projection_hidden_dim": 64, "vision_output_dim": 64,
                 "projector_input_dim": 64, "projector_output_dim": 64}  # fmt: skip
# Widths of a tower (or of the wrapper around it) that equal the text's or the tower's own hidden size follow it.
_WIDTH = re.compile(r"(hidden_size|_dim|_size)$")
_NOT_WIDTH = re.compile(r"vocab|position|window|image|patch|chunk|kernel|conv|merge|codebook|bins|channels")


def _width_keys(d: dict[str, Any]) -> set[int]:
    """The hidden widths a config dict declares (hidden_size and its aliases)."""
    aliases = _aliases(str(d.get("model_type", "")))
    keys = ("hidden_size", "embed_dim", "d_model", aliases.get("hidden_size", "hidden_size"))
    return {v for k in keys if _is_int(v := d.get(k)) and v > SHRINK["hidden_size"]}


def _shrink_tower(d: dict[str, Any], widths: frozenset[int] = frozenset()) -> None:
    """Vision / audio towers of a wrapper: as small as their validators allow. ``widths``: hidden sizes (text's,
    outer towers') that widths here may have to match."""
    aliases = _aliases(str(d.get("model_type", "")))
    widths = widths | _width_keys(d)
    other = {**_OTHER_SHRINK, **{aliases[k]: v for k, v in _OTHER_SHRINK.items() if k in aliases}}
    other.update({aliases[k]: v for k, v in SHRINK.items() if k in aliases and aliases[k] not in other})
    layers = {k: v for k, v in d.items() if k in other and other[k] == 1 and _is_int(v) and v > 1}
    for k, v in list(d.items()):
        if isinstance(v, dict) and k not in _DATA_DICTS and not _per_layer_dict(v, 1 << 30):
            _shrink_tower(v, widths)
        elif not _is_int(v) or v <= 0:
            continue
        elif k in other:
            d[k] = other[k]
        elif k in SHRINK and k not in ("vocab_size", "max_position_embeddings"):
            d[k] = SHRINK[k]
        elif v in widths and _WIDTH.search(k) and not _NOT_WIDTH.search(k):
            d[k] = SHRINK["hidden_size"]
    for k, old in layers.items():  # per-layer lists and dicts follow the tower's layer count: its first layers
        new = d[k]
        for key, v in list(d.items()):
            if isinstance(v, list) and len(v) == old:
                d[key] = v[:new]
            elif key not in _DATA_DICTS and _per_layer_dict(v, old):
                d[key] = {j: x for j, x in v.items() if (_layer_index(j) or 0) < new}


def _shrink_wrapper(d: dict[str, Any], path: list[str], widths: frozenset[int]) -> None:
    """The levels of a wrapper config above its text config: their towers, and widths that follow the text's or a
    tower's (a projector's input or output)."""
    if not path:
        return
    towers = {k: v for k, v in d.items() if k != path[0] and isinstance(v, dict) and k not in _DATA_DICTS}
    widths = widths.union(*(_width_keys(v) for v in towers.values()))
    for k, v in list(d.items()):
        if k in towers:
            _shrink_tower(v, widths)
        elif (
            k != path[0]
            and _is_int(v)
            and (
                _OTHER_SHRINK.get(k) == SHRINK["hidden_size"]
                or v in widths
                and _WIDTH.search(k)
                and not _NOT_WIDTH.search(k)
            )
        ):
            d[k] = SHRINK["hidden_size"]
    _shrink_wrapper(d[path[0]], path[1:], widths)


def _text_path(config: Any) -> list[str]:
    """Where a wrapper config keeps its text config (``["text_config"]``; Qwen3-Omni: thinker, then text); [] for a
    plain one."""
    from transformers import PreTrainedConfig

    text = config.get_text_config()

    def find(c: Any) -> list[str] | None:
        if c is text:
            return []
        for k, v in vars(c).items():
            if isinstance(v, PreTrainedConfig) and (found := find(v)) is not None:
                return [k, *found]
        return None

    return find(config) or []


def tiny_config(model_type: str, experts: int, top_k: int = 2) -> Any:
    """A tiny config of ``model_type`` with ``experts`` routed experts (a transformers config object)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    d = default.to_dict()
    path = _text_path(default)
    text = d
    for k in path:
        text = text[k]
    widths = frozenset(_width_keys(text))
    _shrink_wrapper(d, path, widths)
    shrink(text, experts, _forced_top_k(model_type, top_k), str(text.get("model_type") or model_type))
    if path:
        _apply_override(d, model_type, experts, top_k)
    d.pop("architectures", None)
    return cls.from_dict(d)


def tiny_model(model_type: str, experts: int, top_k: int = 2, seed: int = 0) -> Any:
    """A tiny random model (float32, CPU) of ``model_type``, in its loading class, in eval mode."""
    import torch
    import transformers

    config = tiny_config(model_type, experts, top_k)
    arch = architecture_of(model_type)
    if arch is None:
        raise ValueError(f"{model_type}: transformers has no causal or image-text LM class for it")
    cls = getattr(transformers, arch)
    text_class = getattr(config, "sub_configs", {}).get("text_config")
    if text_class is not None and getattr(cls, "config_class", None) is text_class:
        config = config.get_text_config()  # as the auto classes do for a text-only class
    torch.manual_seed(seed)
    model = cls._from_config(config, dtype=torch.float32)
    return model.eval()


def save_module_form(model: Any, folder: Any) -> None:
    """Save ``model`` under its own parameter names (its ``state_dict``: ``mlp.experts.gate_up_proj`` ``[E, 2I, H]``)
    rather than the release naming ``save_pretrained`` writes through transformers' reverse conversion: the form
    some releases are published in (Qwen3.5-MoE), which transformers loads as it is. Tied parameters are stored
    once, as ``save_pretrained`` stores them."""
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    model.save_pretrained(folder)  # config, generation config and the release form, replaced below
    for old in [*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")]:
        old.unlink()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
