"""Where a checkpoint's tensors live in a transformers model: disk names mapped forward through the loading
conversion that transformers itself applies (renamings, then at most one converter)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from moeslim.layout import Layout


def loaded_names(model: Any, names: list[str]) -> dict[str, str]:
    """Checkpoint tensor name → the parameter (or buffer) of ``model`` it loads into."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    out = {}
    for name in names:
        loaded, _ = rename_source_key(name, renamings, converters, model.base_model_prefix, params)
        out[name] = loaded
    return out


def owner(param: str) -> str:
    """The module that owns ``param``."""
    return param.rpartition(".")[0]


def router_modules(model: Any, layout: Layout) -> dict[int, tuple[Any, Any, list[Any]]]:
    """MoE layer index → (MoE block module, router module, selection biases) of ``model``, for the layers it
    has (MTP layers beyond ``num_hidden_layers`` are not modelled by transformers). The biases are the
    router tensors other than the weight: correction biases, ``[1, E]`` statics, a router's own bias."""
    return {i: (p.block, p.router, list(p.biases)) for i, p in moe_parts(model, layout).items()}


@dataclass(frozen=True)
class MoeParts:
    """The modules of one MoE layer in a transformers model, found from the checkpoint's tensor names."""

    block: Any  # the module holding router and experts
    router: Any  # the module whose ``weight`` gives the router logits
    experts: Any  # the module holding the routed experts' weights
    biases: tuple[Any, ...]  # selection biases: router tensors other than the weight


def moe_parts(model: Any, layout: Layout) -> dict[int, MoeParts]:
    """Trunk MoE layer index → its modules in ``model`` (meta or loaded: the modules are the same objects)."""
    weight = layout.family.router_weight
    layers = [layer for layer in layout.layers if not layer.mtp]
    experts_names = {layer.index: (layer.fused or layer.per_expert[0])[0] for layer in layers}
    loaded = loaded_names(model, [n for layer in layers for n in layer.router] + list(experts_names.values()))
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    found = {}
    for layer in layers:
        router = owner(loaded[layer.block + weight])
        experts = _without_index(owner(loaded[experts_names[layer.index]]))
        block = _common(router, experts)
        biases = tuple(params[loaded[n]] for n in layer.router if n != layer.block + weight and loaded[n] in params)
        found[layer.index] = MoeParts(
            model.get_submodule(block), model.get_submodule(router), model.get_submodule(experts), biases
        )
    return found


def _without_index(module: str) -> str:
    """``mlp.experts.3`` (one expert of a module list) → ``mlp.experts``."""
    parts = module.split(".")
    while parts and parts[-1].isdigit():
        parts.pop()
    return ".".join(parts)


def _common(a: str, b: str) -> str:
    out = []
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        out.append(x)
    return ".".join(out)


def takes_routing(experts: Any) -> bool:
    """Whether an experts module is called with the router's choice, ``(hidden, index, weights)``, as in
    transformers 5.x; Llama-4's takes the hidden states only (every token through every expert, pre-scaled)."""
    return len(inspect.signature(experts.forward).parameters) >= 3
