"""A family's on-disk MoE layout, derived from its transformers model definition.

Two tiny random models of the family are built from its own config class, with 8 and with 10 routed experts,
and saved by ``save_pretrained`` (which writes the release naming through transformers' reverse conversion).
A tensor whose shape follows the expert count (8 → 10 on one dim) is stacked over experts; a tensor whose
name gains an index (``experts.8.…``) is one expert's. Each such tensor is mapped *forward* through
transformers' loading conversion to the parameter it loads into: parameters of the module that holds the
largest expert-indexed tensor are the experts, the others the router. Config keys that hold the expert count
are those that read 8 and 10. The result is plain data (``families.json``), so moeslim starts without torch;
``python -m moeslim.families.derive`` regenerates it and ``tests/test_every_family.py`` re-derives it.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
import textwrap
import tokenize
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moeslim.families.tiny import _DATA_DICTS, COUNT_KEYS, GROUP_KEYS, TOP_K, _text_path, tiny_model
from moeslim.stream.build import architecture_of
from moeslim.stream.modules import loaded_names, owner, without_index

SMALL, LARGE = 8, 10  # the two expert counts the probe models are built with
DERIVED_PATH = Path(__file__).with_name("families.json")
_MTP = re.compile(r"nextn|(^|_)mtp(_|$)")
_NESTED_SETTINGS = ("ffn_config", "attn_config")  # settings dicts that are saved as sub-configs (DBRX)
_LAYER = re.compile(r"^(?P<prefix>.*?)(?P<stack>layers|blocks)\.(?P<i>\d+)\.(?P<rel>.+)$")


class Refused(Exception):
    """The family cannot be pruned by slicing experts; the message says why."""


def moe_model_types() -> list[str]:
    """Every model type of the installed transformers whose config counts routed experts and which has a
    language-model class: what moeslim should prune."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return [model_type for model_type in sorted(CONFIG_MAPPING.keys()) if is_moe_type(model_type)]


def is_moe_type(model_type: str) -> bool:
    """Whether the installed transformers defines ``model_type`` with a config that counts routed experts and a
    language-model class."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        return False
    try:
        with _offline():
            d = CONFIG_MAPPING[model_type]().to_dict()
    except Exception:  # noqa: BLE001 - a config class that cannot build its defaults has no family to derive
        return False
    nested = d.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else d
    return any(k in COUNT_KEYS for k in _flat_keys(text)) and architecture_of(model_type) is not None


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """huggingface_hub in offline mode: a config class whose defaults fetch a sub-config from the Hub (5.16's
    ``edgetam``: a timm config) fails at once, instead of waiting out retries without a network (47 s measured);
    deriving the families never downloads anything."""
    import huggingface_hub.constants as constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


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
    """The language model's part of the saved config.json, as moeslim reads it (itself, or ``text_config``),
    flattened one level: a nested settings dict's keys read ``outer.inner`` (DBRX's ``ffn_config.moe_top_k``)."""
    d = config.to_dict()
    path = _text_path(config)
    if len(path) > 1:
        raise Refused(f"the language model's config sits at {'.'.join(path)}, deeper than text_config")
    text = d[path[0]] if path else d
    flat = dict(text)
    for k, v in text.items():
        if isinstance(v, dict) and (k in _NESTED_SETTINGS or k not in _DATA_DICTS and not k.endswith("_config")):
            flat.update({f"{k}.{inner}": x for inner, x in v.items() if not isinstance(x, dict)})
    return flat


def derive(model_type: str, built: list[Any] | None = None) -> dict[str, Any]:
    """The family record of ``model_type`` (see ``families.json``); raises ``Refused`` with the reason. The tiny
    model with ``SMALL`` experts is appended to ``built`` once made (tests reuse it)."""
    with tempfile.TemporaryDirectory() as tmp:
        small = tiny_model(model_type, SMALL)
        if built is not None:
            built.append(small)
        large = tiny_model(model_type, LARGE)
        a = _saved_shapes(small, Path(tmp, "a"))
        b = _saved_shapes(large, Path(tmp, "b"))
    count_keys = _count_keys(small.config, large.config)
    first, layers, stacked, per_expert_extra, loaded, roles, experts_modules = _naming(small, a, b)
    module = _module_naming(small, large, first)
    text = _text_dict(small.config)
    record: dict[str, Any] = {
        "name": model_type,
        "model_types": sorted({model_type, text.get("model_type") or model_type}),
        **first,
        "count_keys": count_keys,
        "top_k_keys": sorted(k for k in text if TOP_K.match(k.rpartition(".")[2])),
        "groups_key": next((k for k in GROUP_KEYS if k in text), None),
        "layers_list": _layers_list(small, text),
        "mtp_key": next((k for k in sorted(text) if _MTP.search(k) and _is_count(text[k])), None),
        "scoring": _scoring(text, small, loaded, roles),
        "moe_layers_seen": sorted(layers),
        "architecture": architecture_of(model_type),
        "calibration": _calibration(small, experts_modules),
    }
    if any(extra for _, extra in per_expert_extra.values()):
        record["extra_experts"] = True  # kept, renumbered after the kept experts
    if module is not None:
        record["module"] = module  # the model's own parameter names, which transformers also loads as they are
    if per_layer := _per_layer_keys(small, [*count_keys, *record["top_k_keys"]]):
        record["per_layer_keys"] = per_layer  # also read as a list of one value per layer (Hunyuan-A13B's moe_topk)
    if not record["top_k_keys"]:
        raise Refused("the config names no top-k key (num_experts_per_tok or alike); routing cannot be rewritten")
    return record


Naming = tuple[dict[str, Any], dict[int, dict[str, str]], dict[str, tuple[int, int, int]], dict[str, tuple[str, int]],
              dict[str, str], dict[str, str], list[str]]  # fmt: skip


def _naming(model: Any, a: dict[str, tuple[int, ...]], b: dict[str, tuple[int, ...]]) -> Naming:
    """The MoE layer record of one naming of the tensors (``a``: with ``SMALL`` experts, ``b``: ``LARGE``), and what
    it was found from: the MoE layers, stacked and per-expert tensors, where each loads and its role."""
    stacked, per_expert_extra = _expert_tensors(a, b)
    per_expert = {first: template for first, (template, _) in per_expert_extra.items()}
    layers = _by_layer(stacked, per_expert)
    if not layers:
        raise Refused("no tensor follows the expert count in any decoder layer; experts are not prunable by slicing")
    loaded = _loaded(model, stacked, per_expert)
    roles, experts_modules = _roles(model, loaded, stacked, per_expert)
    records = {i: _layer_record(rel, roles, stacked, a) for i, rel in layers.items()}
    first = next(iter(records.values()))
    if odd := [i for i, r in records.items() if r != first]:
        raise Refused(f"MoE layer {odd[0]} differs in its tensors from layer {next(iter(records))}")
    stacks = {m["stack"] for name in [*stacked, *per_expert.values()] if (m := _LAYER.match(name))}
    if stacks != {"layers"}:
        first = {**first, "layers_name": "".join(stacks)}
    return first, layers, stacked, per_expert_extra, loaded, roles, experts_modules


def _module_naming(small: Any, large: Any, saved: dict[str, Any]) -> dict[str, Any] | None:
    """The MoE layer record of the model's own parameter names (its ``state_dict``: ``mlp.experts.gate_up_proj``
    ``[E, 2I, H]`` where ``save_pretrained`` writes ``mlp.experts.N.gate_proj.weight``), which transformers loads
    as they are: releases are published in it too (Qwen3.5-MoE). None where it is the saved naming, or where its
    MoE layers cannot be told apart by the same rules."""
    a, b = ({k: tuple(v.shape) for k, v in m.state_dict().items()} for m in (small, large))
    try:
        record = _naming(small, a, b)[0]
    except Refused:
        return None
    fields = ("block", "router", "experts", "fused", "dims", "flattened", "extra_rows", "layers_name")
    record = {k: v for k, v in record.items() if k in (*fields, "shared")}
    same = all(record.get(k) == saved.get(k) for k in fields)
    return None if same else record


def _calibration(model: Any, experts_modules: list[str]) -> str | None:
    """Why the family's decoder cannot be run one layer at a time, or its routing cannot be read where calibration
    reads it (the experts module's call: the router's choice, or the hidden states alone as Llama-4's), or None."""
    import inspect

    import torch

    from moeslim.stream.modules import takes_routing
    from moeslim.stream.stub import LayerProtocolError, decoder_of, layer_inputs

    for path in experts_modules:
        experts = model.get_submodule(path)
        arguments = list(inspect.signature(experts.forward).parameters)
        if not takes_routing(experts) and len(arguments) != 1:  # Aria's under transformers 5.16: the router's logits
            return f"its experts module is called with ({', '.join(arguments)}), not with the router's choice"
    decoder = decoder_of(model)
    if decoder is None:
        return "no decoder module holds both the layers and the input embedding"
    try:
        layer_inputs(decoder, torch.arange(3, 11).reshape(2, 4))
    except LayerProtocolError as e:
        return str(e)
    return None


def _per_layer_keys(model: Any, keys: list[str]) -> list[str]:
    """Those of ``keys`` that the family's config also takes as a list with one entry per decoder layer, read as
    that entry: its config class accepts the list, and the model built from it, with ``model``'s weights, gives
    ``model``'s logits. Config classes that type a key as a number refuse the list at once."""
    import torch

    from moeslim.stream.stub import decoder_of, layers_of

    decoder = decoder_of(model)
    if decoder is None:
        return []
    layers, path = len(layers_of(decoder)), _text_path(model.config)
    found: list[str] = []
    for key in keys:
        d = model.config.to_dict()
        text = d
        for part in path:
            text = text[part]
        if not _is_count(text.get(key)):
            continue  # an alias the saved config does not hold, or a nested setting
        text[key] = [text[key]] * layers
        try:
            listed = type(model)._from_config(type(model.config).from_dict(d), dtype=torch.float32).eval()
        except Exception:  # noqa: BLE001 - the config class or the model's code does not take a list there
            continue
        listed.load_state_dict(model.state_dict())
        if _same_logits(model, listed):
            found.append(key)
    return found


def _same_logits(a: Any, b: Any) -> bool:
    """Whether models ``a`` and ``b`` give the same logits on a few tokens (False where either cannot run)."""
    import torch

    ids = torch.arange(3, 11).reshape(2, 4)
    try:
        with torch.no_grad():
            return torch.equal(a(input_ids=ids, use_cache=False).logits, b(input_ids=ids, use_cache=False).logits)
    except Exception:  # noqa: BLE001 - a forward this tiny text-only call cannot drive
        return False


def _layers_list(model: Any, text: dict[str, Any]) -> str | None:
    """Where a config keeps the decoder's layer count when ``num_hidden_layers`` is not it: a key holding it (DBRX's
    alias ``n_layers``, LongCat-Flash's ``num_layers``; transformers 5.16 also saves LongCat-Flash's
    ``num_hidden_layers``, as twice the layers, one per attention), else, where ``num_hidden_layers`` is absent, a
    per-layer list of that length (Nemotron-H's pattern)."""
    from moeslim.stream.stub import decoder_of, layers_of

    decoder = decoder_of(model)
    n = len(layers_of(decoder)) if decoder is not None else None
    if "num_hidden_layers" in text and text["num_hidden_layers"] == n:
        return None
    alias = getattr(model.config.get_text_config(), "attribute_map", {}).get("num_hidden_layers")
    for key in (alias, "num_layers", "n_layers"):
        if key in text and _is_count(text[key]) and text[key] == n:
            return str(key)
    if "num_hidden_layers" in text:
        return None  # a count that is not the layers', and no other: the layout check says which the weights hold
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
) -> tuple[dict[str, tuple[int, int, int]], dict[str, tuple[str, int]]]:
    """Stacked tensors → (the dim that indexes experts, rows per expert, extra rows after the experts); per-expert
    names of expert 0 → their template."""
    stacked: dict[str, tuple[int, int, int]] = {}
    for name, shape in a.items():
        other = b.get(name)
        if other is None or other == shape:
            continue
        dims = [d for d, (x, y) in enumerate(zip(shape, other, strict=False)) if x != y]
        if len(shape) != len(other) or len(dims) != 1:
            raise Refused(f"{name} changes shape {list(shape)} → {list(other)} with the expert count; cannot slice it")
        d = dims[0]
        per, rest = divmod(other[d] - shape[d], LARGE - SMALL)  # rows per expert
        extra = shape[d] - per * SMALL  # rows that do not follow the count: zero-computation experts' and alike
        if rest or per < 1 or extra < 0 or (per > 1 and extra):
            raise Refused(
                f"{name} has {shape[d]} rows for {SMALL} experts and {other[d]} for {LARGE}; the rows do not map"
                " to experts"
            )
        stacked[name] = (d, per, extra)
    return stacked, _per_expert(a, b)


def _per_expert(a: dict[str, tuple[int, ...]], b: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, int]]:
    """Per-expert tensors: the name of expert 0 → (its template with ``{j}``, how many tensors of that template
    come after the routed experts, e.g. a zero-computation expert's unused weights). A template is per-expert
    when its indices run 0..n-1 in both models and n grows by exactly the expert count's growth."""
    seen: dict[str, tuple[set[int], set[int]]] = defaultdict(lambda: (set(), set()))
    for name in {*a, *b}:
        parts = name.split(".")
        for k, part in enumerate(parts):
            if part.isdigit():
                sets = seen[".".join([*parts[:k], "{j}", *parts[k + 1 :]])]
                for model, indices in zip((a, b), sets, strict=True):
                    if name in model:
                        indices.add(int(part))
    found: dict[str, tuple[str, int]] = {}
    for template, (small, large) in seen.items():
        runs = small == set(range(len(small))) and large == set(range(len(large)))
        if runs and len(small) >= SMALL and len(large) - len(small) == LARGE - SMALL:
            found[template.format(j=0)] = (template, len(small) - SMALL)
    covered = {t.format(j=j) for t, z in found.values() for j in range(LARGE + z)}
    if stray := sorted(b.keys() - a.keys() - covered):
        raise Refused(f"{stray[0]} appears with more experts but carries no single expert index")
    return found


def _by_layer(stacked: dict[str, tuple[int, int, int]], per_expert: dict[str, str]) -> dict[int, dict[str, str]]:
    """Decoder layer → {name relative to the layer: full name} of its expert-indexed tensors."""
    layers: dict[int, dict[str, str]] = defaultdict(dict)
    for name in [*stacked, *per_expert.values()]:
        m = _LAYER.match(name)
        if m is None:
            raise Refused(f"{name} follows the expert count outside any decoder layer")
        layers[int(m["i"])][m["rel"]] = name
    return dict(sorted(layers.items()))


def _roles(
    model: Any, loaded: dict[str, str], stacked: dict[str, tuple[int, int, int]], per_expert: dict[str, str]
) -> tuple[dict[str, str], list[str]]:
    """Saved name (per-expert: its template) → "router" or "experts", from the module each loads into
    through the forward conversion: in each layer, the module of the largest tensor holds the experts
    (``_experts_module``). Also the experts module of each layer."""
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    by_layer: dict[str, list[str]] = defaultdict(list)
    for name in [*stacked, *per_expert.values()]:
        m = _LAYER.match(loaded[name])
        by_layer[m["prefix"] + m["i"] if m else ""].append(name)
    roles, experts_modules = {}, []
    for names in by_layer.values():
        biggest = max(names, key=lambda n: (params[loaded[n]].numel(), n))
        experts_module = _experts_module(biggest, names, loaded, params)
        experts_modules.append(experts_module)
        for name in names:  # the experts module's own submodules are experts' too (Ergo's per-expert output norm)
            module = without_index(owner(loaded[name]))
            roles[name] = "experts" if (module + ".").startswith(experts_module + ".") else "router"
    return roles, experts_modules


def _experts_module(biggest: str, names: list[str], loaded: dict[str, str], params: dict[str, Any]) -> str:
    """The module of the largest tensor, widened to its parent while what that adds is expert stacks too (3-d;
    Aria under transformers 5.16 keeps ``fc1`` and ``fc2`` as two modules under ``experts``), and some tensor is
    still left outside (a router). JetMoE's MLP block also holds its router (2-d): not widened, refused later."""
    modules = {n: without_index(owner(loaded[n])) for n in names}

    def under(module: str, parent: str) -> bool:
        return (module + ".").startswith(parent + ".")

    module = modules[biggest]
    while "." in module:
        parent = module.rpartition(".")[0]
        added = [n for n in names if under(modules[n], parent) and not under(modules[n], module)]
        if all(under(m, parent) for m in modules.values()) or any(params[loaded[n]].ndim < 3 for n in added):
            break
        module = parent
    return module


def _loaded(model: Any, stacked: dict[str, tuple[int, int, int]], per_expert: dict[str, str]) -> dict[str, str]:
    """Saved name (per-expert: its template) → the parameter it loads into, through the forward conversion."""
    names = [*stacked, *per_expert.values()]
    loaded = loaded_names(model, [n.format(j=0) for n in names])
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    out = {}
    for name in names:
        target = loaded[name.format(j=0)]
        if target not in params:
            raise Refused(f"{name} loads into {target}, which the model does not have; conversion unknown")
        out[name] = target
    return out


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _layer_record(
    rel: dict[str, str],
    roles: dict[str, str],
    stacked: dict[str, tuple[int, int, int]],
    saved: dict[str, tuple[int, ...]],
) -> dict[str, Any]:
    """One MoE layer as a family record: block, router tensors, expert tensors, fused or per-expert, shared
    experts, and the expert dim of stacked tensors where it is not 0."""
    names = list(rel)
    block = _common_module(names)
    for role in ("experts", "router"):  # no common block: router and experts sit in the decoder layer itself
        tops = sorted({n.split(".")[0] for n in names if roles[rel[n]] == role})
        if not block and len(tops) > 1:
            raise Refused(
                f"{role} tensors sit in several modules of a decoder layer ({', '.join(tops)}), e.g. experts in"
                " attention too; moeslim prunes one MoE block"
            )
    cut = len(block) + 1 if block else 0
    shapes = {r[cut:]: stacked[rel[r]] for r in names if rel[r] in stacked}
    dims = {r: d for r, (d, _, _) in shapes.items() if d}  # where experts are not on dim 0
    odd = {
        "flattened": sorted(r for r, (_, per, _) in shapes.items() if per > 1),
        "extra_rows": {r: extra for r, (_, _, extra) in shapes.items() if extra},
    }
    odd = {k: v for k, v in odd.items() if v}  # only where a family has them
    layer_prefix = rel[names[0]][: -len(names[0])] + (block + "." if block else "")
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
        return {"block": block, "router": router, "experts": prefixes, "fused": False, "shared": shared, "dims": dims,
                **odd}  # fmt: skip
    return {"block": block, "router": router, "experts": experts, "fused": True, "shared": shared, "dims": dims, **odd}


def _common_module(names: list[str]) -> str:
    split = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _scoring(text: dict[str, Any], model: Any, loaded: dict[str, str], roles: dict[str, str]) -> str:
    """How router logits become probabilities: the config's ``scoring_func``, else what the router's own code
    applies (a router module's forward, or the MoE block's where the router is a plain linear layer)."""
    import inspect

    func = text.get("scoring_func")
    if func in ("sigmoid", "softmax"):
        return str(func)
    router = min((loaded[n] for n, role in roles.items() if role == "router"), key=lambda n: (len(n), n))
    experts = next(loaded[n] for n, role in roles.items() if role == "experts")
    chain = [owner(router)]  # the router's module and those above it, up to the MoE block holding the experts too
    while chain[-1] and not without_index(owner(experts)).startswith(chain[-1] + "."):
        chain.append(owner(chain[-1]))
    for module in (model.get_submodule(name) for name in chain):
        try:
            code = inspect.getsource(type(module).forward)
        except (OSError, TypeError):
            continue
        names = [t.string for t in tokenize.generate_tokens(io.StringIO(textwrap.dedent(code)).readline)
                 if t.type == tokenize.NAME and t.string in ("sigmoid", "softmax")]  # code, not comments  # fmt: skip
        if names:
            return names[0]
    return "softmax"


def probe(model_type: str) -> tuple[dict[str, Any], Any]:
    """``model_type``'s record (or why it is refused) and its tiny model with ``SMALL`` experts (None if none
    builds)."""
    built: list[Any] = []
    try:
        record = derive(model_type, built)
    except Refused as e:
        record = {"name": model_type, "refused": str(e)}
    except Exception as e:  # noqa: BLE001 - a tiny model that transformers cannot build or run on CPU
        reason = str(e).splitlines()[0][:160] if str(e) else ""
        record = {"name": model_type, "refused": f"no tiny model builds here ({type(e).__name__}: {reason})"}
    return record, (built[0] if built else None)


def derive_all(model_types: list[str] | None = None) -> dict[str, Any]:
    """Every MoE family of the installed transformers: its record, or why it is refused."""
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    out = {model_type: probe(model_type)[0] for model_type in model_types or moe_model_types()}
    return {"transformers": transformers.__version__, "families": out}


def markdown_table(table: dict[str, Any]) -> str:
    """The README's coverage table: every family, its layout and whether it calibrates, or why it is refused."""
    rows = ["| model type | MoE block | router | experts | module naming (also read) | calibration |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in sorted(table["families"].items()):
        if "refused" in r:
            rows.append(f"| `{name}` | refused: {r['refused']} | | | | |")
            continue
        module = r.get("module")
        also = "the same" if module is None else f"{_block(module)}: `{_router(module)}`; {_experts(module)}"
        calibration = f"no: {r['calibration']}" if r.get("calibration") else "yes"
        rows.append(f"| `{name}` | {_block(r)} | `{_router(r)}` | {_experts(r)} | {also} | {calibration} |")
    return "\n".join(rows) + "\n"


def _block(r: dict[str, Any]) -> str:
    return f"`{r['block']}`" if r["block"] else "(the decoder layer)"


def _router(r: dict[str, Any]) -> str:
    return ", ".join(r["router"]) + (" (+ extra rows kept)" if r.get("extra_rows") else "")


def _experts(r: dict[str, Any]) -> str:
    experts = ", ".join(r["experts"]) if r["fused"] else f"{r['experts'][0]}N.*"
    kind = "flattened" if r.get("flattened") else "stacked" if r["fused"] else "per-expert"
    return f"{kind} `{experts}`"


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
