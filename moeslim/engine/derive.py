"""A family's on-disk MoE layout, derived from its transformers model definition.

Two tiny random models of the family are built from its own config class, with 8 and with 10 routed experts,
and saved by ``save_pretrained`` (which writes the release naming through transformers' reverse conversion).
A tensor whose shape follows the expert count (8 → 10 on one dim) is stacked over experts; a tensor whose
name gains an index (``experts.8.…``) is one expert's. Each such tensor is mapped *forward* through
transformers' loading conversion to the parameter it loads into: parameters of the module that holds the
largest expert-indexed tensor are the experts, the others the router. Config keys that hold the expert count
are those that read 8 and 10. The result is plain data (``families.json``), so moeslim starts without torch;
``python -m moeslim.engine.derive`` regenerates it and ``tests/test_every_family.py`` re-derives it.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from moeslim.engine.tiny import COUNT_KEYS, GROUP_KEYS, TOP_K, architecture_of, tiny_model

SMALL, LARGE = 8, 10  # the two expert counts the probe models are built with
DERIVED_PATH = Path(__file__).with_name("families.json")
_MTP = re.compile(r"nextn|(^|_)mtp(_|$)")
_LAYER = re.compile(r"^(?P<prefix>.*?)layers\.(?P<i>\d+)\.(?P<rel>.+)$")


class Refused(Exception):
    """The family cannot be pruned by slicing experts; the message says why."""


def moe_model_types() -> list[str]:
    """Every model type of the installed transformers whose config counts routed experts and which has a
    language-model class: what moeslim should prune."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    found = []
    for model_type in sorted(CONFIG_MAPPING.keys()):
        try:
            d = CONFIG_MAPPING[model_type]().to_dict()
        except Exception:  # noqa: BLE001 - a config class that cannot build its defaults has no family to derive
            continue
        nested = d.get("text_config")
        text: dict[str, Any] = nested if isinstance(nested, dict) else d
        if any(k in COUNT_KEYS for k in _flat_keys(text)) and architecture_of(model_type):
            found.append(model_type)
    return found


def _flat_keys(d: dict[str, Any]) -> list[str]:
    out = []
    for k, v in d.items():
        out.extend(_flat_keys(v) if isinstance(v, dict) else [str(k)])
    return out


def _saved_shapes(model: Any, where: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of what ``save_pretrained`` writes for ``model``."""
    from moeslim.source import open_checkpoint

    model.save_pretrained(where)
    return {name: info.shape for name, info in open_checkpoint(where).tensors.items()}


def _text_dict(config: Any) -> dict[str, Any]:
    d = config.to_dict()
    return d["text_config"] if isinstance(d.get("text_config"), dict) else d


def derive(model_type: str) -> dict[str, Any]:
    """The family record of ``model_type`` (see ``families.json``); raises ``Refused`` with the reason."""
    with tempfile.TemporaryDirectory() as tmp:
        small = tiny_model(model_type, SMALL)
        large = tiny_model(model_type, LARGE)
        a = _saved_shapes(small, Path(tmp, "a"))
        b = _saved_shapes(large, Path(tmp, "b"))
    count_keys = _count_keys(small.config, large.config)
    stacked, per_expert = _expert_tensors(a, b)
    layers = _by_layer(stacked, per_expert)
    if not layers:
        raise Refused("no tensor follows the expert count in any decoder layer; experts are not prunable by slicing")
    roles = _roles(small, a, stacked, per_expert)
    records = {i: _layer_record(rel, roles, stacked, a) for i, rel in layers.items()}
    first = next(iter(records.values()))
    if odd := [i for i, r in records.items() if r != first]:
        raise Refused(f"MoE layer {odd[0]} differs in its tensors from layer {next(iter(records))}")
    text = _text_dict(small.config)
    record: dict[str, Any] = {
        "name": model_type,
        "model_types": sorted({model_type, text.get("model_type") or model_type}),
        **first,
        "count_keys": count_keys,
        "top_k_keys": sorted(k for k in text if TOP_K.match(k)),
        "groups_key": next((k for k in GROUP_KEYS if k in text), None),
        "layers_list": _layers_list(small.config, text),
        "mtp_key": next((k for k in sorted(text) if _MTP.search(k) and _is_count(text[k])), None),
        "scoring": _scoring(text, first["router"]),
        "moe_layers_seen": sorted(layers),
        "architecture": architecture_of(model_type),
    }
    if not record["top_k_keys"]:
        raise Refused("the config names no top-k key (num_experts_per_tok or alike); routing cannot be rewritten")
    return record


def _layers_list(config: Any, text: dict[str, Any]) -> str | None:
    """The per-layer list whose length is the layer count, for configs that store no ``num_hidden_layers``."""
    if "num_hidden_layers" in text:
        return None
    n = config.get_text_config().num_hidden_layers
    found = sorted(k for k, v in text.items() if isinstance(v, list) and len(v) == n)
    if not found:
        raise Refused("the config stores neither num_hidden_layers nor a per-layer list of that length")
    return found[0]


def _count_keys(small: Any, large: Any) -> list[str]:
    """Config keys (and their aliases) that read the small count in one model and the large in the other."""
    ds, dl = _text_dict(small), _text_dict(large)
    keys = {k for k in ds if ds[k] == SMALL and dl.get(k) == LARGE}
    text = small.get_text_config() if hasattr(small, "get_text_config") else small
    aliases = {alias for alias, target in getattr(text, "attribute_map", {}).items() if target in keys}
    if not keys:
        raise Refused("no config key holds the routed expert count")
    return sorted(keys) + sorted(aliases - keys)


def _expert_tensors(
    a: dict[str, tuple[int, ...]], b: dict[str, tuple[int, ...]]
) -> tuple[dict[str, int], dict[str, str]]:
    """Stacked tensors → the dim that indexes experts; per-expert names of expert 0 → their template."""
    stacked: dict[str, int] = {}
    for name, shape in a.items():
        other = b.get(name)
        if other is None or other == shape:
            continue
        dims = [d for d, (x, y) in enumerate(zip(shape, other, strict=False)) if x != y]
        if len(shape) != len(other) or len(dims) != 1:
            raise Refused(f"{name} changes shape {list(shape)} → {list(other)} with the expert count; cannot slice it")
        d = dims[0]
        if (shape[d], other[d]) != (SMALL, LARGE):
            raise Refused(
                f"{name} has {shape[d]} rows for {SMALL} experts (extra rows beyond the routed experts,"
                " e.g. zero-computation experts); slicing would misalign them"
            )
        stacked[name] = d
    per_expert: dict[str, str] = {}
    for name in b.keys() - a.keys():
        parts = name.split(".")
        hits = [k for k, p in enumerate(parts) if p in (str(SMALL), str(LARGE - 1))]
        if len(hits) != 1:
            raise Refused(f"{name} appears with more experts but carries no single expert index")
        k = hits[0]
        template = ".".join([*parts[:k], "{j}", *parts[k + 1 :]])
        for j in range(SMALL):
            if template.format(j=j) not in a:
                raise Refused(f"{template} has no expert {j}")
        per_expert[template.format(j=0)] = template
    return stacked, per_expert


def _by_layer(stacked: dict[str, int], per_expert: dict[str, str]) -> dict[int, dict[str, str]]:
    """Decoder layer → {name relative to the layer: full name} of its expert-indexed tensors."""
    layers: dict[int, dict[str, str]] = defaultdict(dict)
    for name in [*stacked, *per_expert.values()]:
        m = _LAYER.match(name)
        if m is None:
            raise Refused(f"{name} follows the expert count outside any decoder layer")
        layers[int(m["i"])][m["rel"]] = name
    return dict(sorted(layers.items()))


def _roles(
    model: Any, saved: dict[str, tuple[int, ...]], stacked: dict[str, int], per_expert: dict[str, str]
) -> dict[str, str]:
    """Saved name (per-expert: its template) → "router" or "experts", from the module each loads into
    through the forward conversion."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    target = {}
    for name in [*stacked, *per_expert.values()]:
        loaded, _ = rename_source_key(name.format(j=0), renamings, converters, model.base_model_prefix, params)
        if loaded not in params:
            raise Refused(f"{name} loads into {loaded}, which the model does not have; conversion unknown")
        target[name] = loaded
    by_layer: dict[str, list[str]] = defaultdict(list)
    for name, loaded in target.items():
        m = _LAYER.match(loaded)
        by_layer[m["prefix"] + m["i"] if m else ""].append(name)
    roles = {}
    for names in by_layer.values():
        biggest = max(names, key=lambda n: (params[target[n]].numel(), n))
        experts_module = _module(target[biggest])
        for name in names:
            roles[name] = "experts" if _module(target[name]) == experts_module else "router"
    return roles


def _module(param: str) -> str:
    """The module owning ``param``, with trailing expert indices dropped (``experts.3.w1`` → ``experts``)."""
    parts = param.split(".")[:-1]
    while parts and parts[-1].isdigit():
        parts.pop()
    return ".".join(parts)


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _layer_record(
    rel: dict[str, str], roles: dict[str, str], stacked: dict[str, int], saved: dict[str, tuple[int, ...]]
) -> dict[str, Any]:
    """One MoE layer as a family record: block, router tensors, expert tensors, fused or per-expert, shared
    experts, and the expert dim of stacked tensors where it is not 0."""
    names = list(rel)
    block = _common_module(names)
    if not block:
        tops = sorted({n.split(".")[0] for n in names})
        raise Refused(
            f"experts sit in several modules of a decoder layer ({', '.join(tops)}), e.g. attention experts;"
            " one plan cannot prune them together"
        )
    cut = len(block) + 1
    dims = {r[cut:]: stacked[rel[r]] for r in names if stacked.get(rel[r])}  # where experts are not on dim 0
    layer_prefix = rel[names[0]][: -len(names[0])] + block + "."
    shared = sorted(
        {
            n[len(layer_prefix) :].split(".")[0] + "."
            for n in saved
            if n.startswith(layer_prefix) and "shared" in n[len(layer_prefix) :].split(".")[0]
        }
    )
    router = sorted(r[cut:] for r in names if roles[rel[r]] == "router")
    experts = sorted(r[cut:] for r in names if roles[rel[r]] == "experts")
    if not router:
        raise Refused("no router tensor has a row per expert (e.g. hash routing); nothing to slice for routing")
    templated = [e for e in experts if "{j}" in e]
    if templated and len(templated) != len(experts):
        raise Refused("experts are partly stacked and partly per-expert")
    router.sort(key=lambda r: (not r.endswith("weight"), r))
    if templated:
        prefixes = sorted({e.split("{j}")[0] for e in templated})
        return {"block": block, "router": router, "experts": prefixes, "fused": False, "shared": shared, "dims": dims}
    return {"block": block, "router": router, "experts": experts, "fused": True, "shared": shared, "dims": dims}


def _common_module(names: list[str]) -> str:
    split = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _scoring(text: dict[str, Any], router: list[str]) -> str:
    func = text.get("scoring_func")
    if func in ("sigmoid", "softmax"):
        return str(func)
    return "sigmoid" if any("bias" in r and "correction" in r for r in router) else "softmax"


def derive_all(model_types: list[str] | None = None) -> dict[str, Any]:
    """Every MoE family of the installed transformers: its record, or why it is refused."""
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    out: dict[str, Any] = {}
    for model_type in model_types or moe_model_types():
        try:
            out[model_type] = derive(model_type)
        except Refused as e:
            out[model_type] = {"name": model_type, "refused": str(e)}
        except Exception as e:  # noqa: BLE001 - a tiny model that transformers cannot build or run on CPU
            reason = str(e).splitlines()[0][:160] if str(e) else ""
            out[model_type] = {
                "name": model_type,
                "refused": f"no tiny model builds here ({type(e).__name__}: {reason})",
            }
    return {"transformers": transformers.__version__, "families": out}


def markdown_table(table: dict[str, Any]) -> str:
    """The README's coverage table: every family, its layout or why it is refused."""
    rows = ["| model type | MoE block | router | experts |", "|---|---|---|---|"]
    for name, r in sorted(table["families"].items()):
        if "refused" in r:
            rows.append(f"| `{name}` | refused: {r['refused']} | | |")
            continue
        experts = ", ".join(r["experts"]) if r["fused"] else f"{r['experts'][0]}N.*"
        kind = "stacked" if r["fused"] else "per-expert"
        router = ", ".join(r["router"])
        rows.append(f"| `{name}` | `{r['block']}` | `{router}` | {kind} `{experts}` |")
    return "\n".join(rows) + "\n"


def main() -> None:
    import sys

    if sys.argv[1:] == ["--table"]:
        print(markdown_table(json.loads(DERIVED_PATH.read_text(encoding="utf-8"))), end="")
        return
    table = derive_all()
    DERIVED_PATH.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    ok = sum("refused" not in r for r in table["families"].values())
    print(f"{ok} of {len(table['families'])} MoE families derived; written to {DERIVED_PATH}")


if __name__ == "__main__":
    main()
