"""MoE families as data: where each family keeps its router and experts on disk, and its config keys.

A family is described relative to one decoder layer's MoE block, so the same description serves the
trunk, MTP layers beyond ``num_hidden_layers`` and multimodal wrappers that prefix every key. Python
appears only where the layout depends on config values (which layers are MoE, whether groups apply).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from moeslim.errors import CheckpointError, UnsupportedModelError
from moeslim.families.runtime import installed_transformers, record_of


def _all_layers(cfg: dict) -> list[int]:
    return list(range(cfg["num_hidden_layers"]))


def _after_first_dense(cfg: dict) -> list[int]:
    return list(range(cfg.get("first_k_dense_replace") or 0, cfg["num_hidden_layers"]))


def _qwen_sparse(cfg: dict) -> list[int]:
    step, dense = cfg.get("decoder_sparse_step") or 1, set(cfg.get("mlp_only_layers") or [])
    return [i for i in range(cfg["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0]


def _llama4_interleaved(cfg: dict) -> list[int]:
    if cfg.get("moe_layers") is not None:
        return list(cfg["moe_layers"])
    step = cfg.get("interleave_moe_layer_step") or 1
    return list(range(step - 1, cfg["num_hidden_layers"], step))


def _no_groups(cfg: dict) -> int:
    return 1


def _noaux_groups(cfg: dict) -> int:
    return int(cfg.get("n_group") or 1)


def _v2_groups(cfg: dict) -> int:
    return int(cfg.get("n_group") or 1) if cfg.get("topk_method") == "group_limited_greedy" else 1


@dataclass(frozen=True)
class Family:
    """On-disk layout of one MoE family.

    Names are relative to the MoE block of a decoder layer, ``{prefix}layers.{i}.{block}.``. An entry
    ending in ``.`` is a module prefix, otherwise an exact tensor name.
    """

    name: str
    model_types: tuple[str, ...]
    block: str  # MoE block inside a decoder layer: "mlp", "block_sparse_moe", "feed_forward"
    router: tuple[str, ...]  # tensors with one row per expert on dim 0 (weight, bias, correction bias)
    count_keys: tuple[str, ...]  # config keys that may hold the routed expert count
    experts: tuple[str, ...] = ("experts.",)  # per-expert: then "{j}."; fused: tensors with experts on dim 0
    fused: bool = False
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok",)
    moe_layers: Callable[[dict], list[int]] | None = _all_layers  # None: the layers that hold a router
    groups: Callable[[dict], int] = _no_groups  # number of routing groups (1: no group-limited routing)
    min_per_group: int = 1  # experts a group must keep for the router's group score to be defined
    shared: tuple[str, ...] = ()  # shared experts: never pruned, reported by inspect
    mtp_key: str | None = None  # config key counting MTP / next-n layers after the trunk
    scoring: str = "softmax"  # how router logits become probabilities: "softmax" or "sigmoid"
    dims: tuple[tuple[str, int], ...] = ()  # router / stacked tensors whose experts are not on dim 0
    layers_list: str | None = None  # where num_hidden_layers is absent: a per-layer list, or the count's own key
    flattened: tuple[str, ...] = ()  # stacked tensors holding a block of rows per expert (DBRX: experts × ffn)
    extra_rows: tuple[tuple[str, int], ...] = ()  # router / stacked tensors with rows after the experts' (zero
    # -computation experts: LongCat-Flash), kept as they are
    extra_experts: bool = False  # per-expert tensors past the routed experts (LongCat-Flash's zero experts'): kept
    layers_name: str = "layers"  # the decoder's list of layers, as tensor names spell it (DBRX: "blocks")
    group_keys: tuple[str, str] = ("n_group", "topk_group")  # config keys of the group count and groups chosen
    calibration: str | None = None  # why its decoder cannot run one layer at a time (calibration, validation)
    per_layer: tuple[str, ...] = ()  # count / top-k keys its config may also hold as one entry per layer (Hunyuan)
    # The same family under its transformers module's own parameter names (``mlp.experts.gate_up_proj`` ``[E, 2I,
    # H]`` where the release form has ``mlp.experts.N.gate_proj.weight``), which transformers loads as they are;
    # None where both namings are one. A checkpoint's tensor names say which it is in (``layout.py``).
    module: Family | None = None

    @property
    def block_path(self) -> str:
        """The MoE block's key prefix within a decoder layer: ``"mlp."``; ``""`` where router and experts sit in
        the decoder layer itself (Gemma 4)."""
        return f"{self.block}." if self.block else ""

    @property
    def router_weight(self) -> str:
        """The router's weight tensor, whose presence marks a layer as MoE."""
        first = self.router[0]
        return first + "weight" if first.endswith(".") else first


def _sigmoid_grouped(name: str, model_types: tuple[str, ...]) -> Family:
    """DeepSeek-V3-style: sigmoid scores, correction bias under the gate, groups scored by their top-2."""
    return Family(
        name, model_types, "mlp", ("gate.",), ("n_routed_experts",),
        moe_layers=_after_first_dense, groups=_noaux_groups, min_per_group=2,
        shared=("shared_experts.",), mtp_key="num_nextn_predict_layers", scoring="sigmoid",
    )  # fmt: skip


_QWEN_COUNT = ("num_experts", "num_local_experts")  # Hub files: num_experts; transformers 5.x writes the other

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("mixtral", ("mixtral",), "block_sparse_moe", ("gate.",), ("num_local_experts",)),
        Family("phimoe", ("phimoe",), "block_sparse_moe", ("gate.",), ("num_local_experts",)),
        Family("minimax_m2", ("minimax_m2",), "block_sparse_moe", ("gate.", "e_score_correction_bias"),
               ("num_local_experts",), scoring="sigmoid"),
        Family("qwen2_moe", ("qwen2_moe",), "mlp", ("gate.",), _QWEN_COUNT, moe_layers=_qwen_sparse,
               shared=("shared_expert.", "shared_expert_gate.")),
        Family("qwen3_moe", ("qwen3_moe",), "mlp", ("gate.",), _QWEN_COUNT, moe_layers=_qwen_sparse),
        Family("olmoe", ("olmoe",), "mlp", ("gate.",), _QWEN_COUNT),
        Family("deepseek_v2", ("deepseek_v2",), "mlp", ("gate.",), ("n_routed_experts",),
               moe_layers=_after_first_dense, groups=_v2_groups, shared=("shared_experts.",)),
        _sigmoid_grouped("deepseek_v3", ("deepseek_v3", "kimi_k2")),
        _sigmoid_grouped("glm4_moe", ("glm4_moe",)),
        Family("gpt_oss", ("gpt_oss",), "mlp", ("router.",), ("num_local_experts", "num_experts"), fused=True,
               top_k_keys=("num_experts_per_tok", "experts_per_token")),
        Family("granitemoe", ("granitemoe",), "block_sparse_moe", ("router.layer.",), ("num_local_experts",),
               experts=("input_linear.", "output_linear."), fused=True),
        Family("llama4", ("llama4_text",), "feed_forward", ("router.",), ("num_local_experts",),
               fused=True, moe_layers=_llama4_interleaved, shared=("shared_expert.",), scoring="sigmoid"),
    )
}  # fmt: skip

#: The committed table; ``MOESLIM_FAMILIES_TABLE`` names another (a regenerated one, or a test's cut-down copy).
_DERIVED = Path(os.environ.get("MOESLIM_FAMILIES_TABLE") or Path(__file__).with_name("families.json"))


def _group_keys(key: str | None) -> tuple[str, str]:
    """The config keys of the group count and of the groups chosen (``num_expert_group`` / ``topk_group``)."""
    return (key or "n_group", "topk_group")


def _group_rule(key: str | None) -> Callable[[dict], int]:
    if key is None:
        return _no_groups
    return lambda cfg: int(cfg.get(key) or 1)


def _family(name: str, r: dict) -> Family:
    """The family of one derived record (``families.json``, or one derived at run time)."""
    groups = r.get("groups_key")
    family = Family(
        name, tuple(t for t in r["model_types"] if t not in _HAND), r["block"], tuple(r["router"]),
        tuple(r["count_keys"]), experts=tuple(r["experts"]), fused=r["fused"], top_k_keys=tuple(r["top_k_keys"]),
        moe_layers=None, groups=_group_rule(groups), min_per_group=2 if groups and r["scoring"] == "sigmoid" else 1,
        shared=tuple(r["shared"]), mtp_key=r.get("mtp_key"), scoring=r["scoring"],
        dims=tuple(sorted(r.get("dims", {}).items())), layers_list=r.get("layers_list"),
        group_keys=_group_keys(groups), calibration=r.get("calibration"), flattened=tuple(r.get("flattened", ())),
        extra_rows=tuple(sorted(r.get("extra_rows", {}).items())), layers_name=r.get("layers_name", "layers"),
        extra_experts=r.get("extra_experts", False), per_layer=tuple(r.get("per_layer_keys", ())),
    )  # fmt: skip
    return _module_form(family, r.get("module"))


def _module_form(family: Family, r: dict | None) -> Family:
    """``family`` with its module naming (a derived record's ``module``) attached, where it has one."""
    if not r:
        return family
    module = replace(
        family, block=r["block"], router=tuple(r["router"]), experts=tuple(r["experts"]), fused=r["fused"],
        shared=tuple(r.get("shared", ())), dims=tuple(sorted(r.get("dims", {}).items())),
        flattened=tuple(r.get("flattened", ())), extra_rows=tuple(sorted(r.get("extra_rows", {}).items())),
        layers_name=r.get("layers_name", "layers"), extra_experts=family.extra_experts and not r["fused"],
    )  # fmt: skip
    return replace(family, module=module)


def _derived() -> tuple[str, dict[str, Family], dict[str, str]]:
    """The transformers version the table was derived under; the families derived from its model definitions
    (``derive.py``), and the refused ones with why.

    The hand-written entries above win for the model types they name: they carry what derivation cannot see
    (MTP layers, group rules, sigmoid routing of llama4, which layers the config makes MoE)."""
    table = json.loads(_DERIVED.read_text(encoding="utf-8"))
    derived, refused = {}, {}
    for name, r in table["families"].items():
        if name in _HAND:  # the hand-written entry, with the module naming its derivation found
            hand = _BY_HAND[name]
            _BY_HAND[name] = _module_form(hand, r.get("module")) if hand.module is None else hand
            continue
        if "refused" in r:
            refused[name] = r["refused"]
        else:
            derived[name] = _family(name, r)
    return table["transformers"], derived, refused


_HAND = {t for f in FAMILIES.values() for t in f.model_types}
_BY_HAND = {t: f for f in FAMILIES.values() for t in f.model_types}
DERIVED_UNDER, DERIVED, REFUSED = _derived()
_BY_MODEL_TYPE = {**{t: f for f in DERIVED.values() for t in f.model_types}, **_BY_HAND}
_RUNTIME: dict[str, Family | str | None] = {}  # model type → its family derived at run time, or why it is refused


def supported_model_types() -> list[str]:
    return sorted({*_BY_MODEL_TYPE, *(t for f in _RUNTIME.values() if isinstance(f, Family) for t in f.model_types)})


def config_value(cfg: dict, key: str) -> object:
    """``cfg[key]``, where a dotted key reads a nested dict (DBRX: ``ffn_config.moe_num_experts``); None if absent."""
    *path, last = key.split(".")
    for part in path:
        cfg = cfg.get(part)  # type: ignore[assignment]
        if not isinstance(cfg, dict):
            return None
    return cfg.get(last)


def set_config_value(cfg: dict, key: str, value: object) -> bool:
    """Set ``key`` (dotted: nested) in ``cfg`` if the file has it; True if it was set."""
    *path, last = key.split(".")
    for part in path:
        cfg = cfg.get(part)  # type: ignore[assignment]
        if not isinstance(cfg, dict):
            return False
    if last not in cfg:
        return False
    cfg[last] = value
    return True


def text_config(config: dict) -> dict:
    """The part of ``config.json`` describing the language model: itself, or ``text_config`` of a wrapper."""
    nested = config.get("text_config")
    if isinstance(nested, dict) and _known(nested.get("model_type")):
        return nested
    return config


def _known(model_type: object) -> bool:
    """Whether ``model_type`` names a family moeslim prunes (in the table, or derived at run time)."""
    if not isinstance(model_type, str):
        return False
    runtime_types = (t for f in _RUNTIME.values() if isinstance(f, Family) for t in f.model_types)
    return model_type in _BY_MODEL_TYPE or model_type in runtime_types


def family_of(config: dict) -> Family:
    """The family of a raw ``config.json`` dict, looking through multimodal wrappers.

    A model type the table lacks but the installed transformers defines, or any derived one when the installed
    transformers is not the version the table was derived under, is derived from the installed transformers
    (``runtime.py``, cached per version), before any weight is read."""
    outer = config.get("model_type")
    if not isinstance(outer, str | None):
        raise CheckpointError("config.json model_type is not a string; fix or re-download the config")
    nested = config.get("text_config")
    inner = nested.get("model_type") if isinstance(nested, dict) else None
    named = [t for t in (outer, inner) if isinstance(t, str)]
    in_table = [t for t in named if t in _BY_MODEL_TYPE or t in REFUSED]  # a type the table lacks: derived only
    refused = []  # where the table knows neither the wrapper's type nor its text's
    # A wrapper family's own record first (its checkpoints are named as the wrapper saves them), then its text's.
    for model_type in in_table or named:
        found = _lookup(model_type)
        if isinstance(found, Family):
            return found
        if found is not None:
            refused.append(f"model family {model_type!r} cannot be pruned: {found}")
    if refused:
        raise UnsupportedModelError(refused[0])
    raise UnsupportedModelError(
        f"unsupported model family {outer!r} (model_type in config.json);"
        f" moeslim supports: {', '.join(supported_model_types())}"
    )


def _lookup(model_type: str) -> Family | str | None:
    """``model_type``'s family, or why it is refused, or None where moeslim knows no MoE model of that type."""
    if model_type in _HAND:
        return _BY_MODEL_TYPE[model_type]
    committed = _BY_MODEL_TYPE.get(model_type) or REFUSED.get(model_type)
    version = installed_transformers()
    if version is None or (committed and version == DERIVED_UNDER):
        return committed
    if model_type not in _RUNTIME:
        try:
            _RUNTIME[model_type] = _read(record_of(model_type, version), committed)
        except (KeyError, TypeError, ValueError, AttributeError):  # a cached record that does not read: derive anew
            _RUNTIME[model_type] = _read(record_of(model_type, version, rederive=True), committed)
    return _RUNTIME[model_type]


def _read(record: dict | None, committed: Family | str | None) -> Family | str | None:
    """A record derived at run time as a family, or why it is refused; None (the installed transformers defines
    no such MoE model) leaves the committed family, if any."""
    if record is None:
        return committed
    if "refused" in record:
        return str(record["refused"])
    return _family(record["name"], record)


def calibration_refused(name: str, reason: str) -> UnsupportedModelError:
    """The one-line refusal of calibrating family ``name``, whose decoder cannot run one layer at a time."""
    return UnsupportedModelError(
        f"calibration cannot run {name} layer by layer: {reason}; prune it with a data-free criterion"
        " (--criterion router-norm)"
    )


def check_calibratable(family: Family) -> None:
    """Calibration and numeric validation run a family's decoder one layer at a time; refuse one that cannot."""
    if family.calibration:
        raise calibration_refused(family.name, family.calibration)
