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
        if loaded not in params and name in params:  # transformers' own rule: a parameter's own name is not renamed
            loaded, _ = rename_source_key(name, [], [], model.base_model_prefix, params)
        out[name] = loaded
    return out


def owner(param: str) -> str:
    """The module that owns ``param``."""
    return param.rpartition(".")[0]


@dataclass(frozen=True)
class MoeParts:
    """The modules of one MoE layer in a transformers model, found from the checkpoint's tensor names.

    Tensors are looked up when used: loading a layer replaces its parameters, the modules stay."""

    block: Any  # the module holding router and experts
    router: Any  # the block's child that computes the router logits (with ``weight``, one F.linear call)
    experts: Any  # the block's child holding the routed experts' weights
    bias_slots: tuple[tuple[Any, str], ...]  # (module, attribute) of each selection bias: router tensors
    # other than the weight (correction biases, ``[1, E]`` statics, a router's own bias)
    weight_slot: tuple[Any, str]  # (module, attribute) of the router's logit weight ``(rows, hidden)``

    @property
    def weight(self) -> Any:
        """The router's logit weight: a routed expert per row, then any extra rows."""
        return getattr(*self.weight_slot)

    @property
    def biases(self) -> tuple[Any, ...]:
        return tuple(getattr(module, name) for module, name in self.bias_slots)


def moe_parts(model: Any, layout: Layout) -> dict[int, MoeParts]:
    """Trunk MoE layer index → its modules in ``model`` (meta or loaded: the modules are the same objects)."""
    weight = layout.family.router_weight
    layers = [layer for layer in layout.layers if not layer.mtp]
    experts_names = {layer.index: (layer.fused or layer.per_expert[0])[0] for layer in layers}
    loaded = loaded_names(model, [n for layer in layers for n in layer.router] + list(experts_names.values()))
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())

    def slot(name: str) -> tuple[Any, str]:
        module, _, attr = name.rpartition(".")
        return model.get_submodule(module), attr

    found = {}
    for layer in layers:
        router_owner = owner(loaded[layer.block + weight])  # e.g. mlp.gate, or LongCat's mlp.router.classifier
        inner = owner(loaded[experts_names[layer.index]])  # e.g. mlp.experts, or DBRX's ffn.experts.mlp
        block = _common(router_owner, inner)
        # router and experts are the block's children on the way to their weights, not helpers below them
        router, experts = (_child(block, name) for name in (router_owner, inner))
        biases = tuple(slot(loaded[n]) for n in layer.router if n != layer.block + weight and loaded[n] in params)
        found[layer.index] = MoeParts(
            model.get_submodule(block), model.get_submodule(router), model.get_submodule(experts), biases,
            slot(loaded[layer.block + weight]),
        )  # fmt: skip
    return found


def _child(block: str, module: str) -> str:
    """The child of ``block`` on the way to ``module`` (``block`` "" is the decoder layer's own children)."""
    rest = module[len(block) + 1 :] if block else module
    return f"{block}.{rest.split('.')[0]}" if block else rest.split(".")[0]


def without_index(module: str) -> str:
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


def choice_of(outputs: tuple) -> tuple[Any, Any]:
    """``(weight, index)`` ``(tokens, k)`` of a router's outputs, whatever their order: the index is the integer
    tensor, the weight the floating one of the same shape (GraniteMoe's router returned ``(index, weight,
    logits)`` up to transformers 5.16, ``(logits, weight, index)`` later; most return the latter)."""
    index = next(t for t in outputs if not t.is_floating_point())
    weight = next(t for t in outputs if t.is_floating_point() and t.shape == index.shape)
    return weight, index
