"""A decoder's layer protocol, read from the model's own forward with every decoder layer stubbed out: the first
layer's input and each layer's keyword arguments (masks, rotary, positions). Layer-by-layer calibration needs
layers that take ``(hidden_states, **kwargs)`` and return the hidden states (or a tuple led by them) that the next
layer takes; a family whose layers pass anything else between them is refused here with why."""

from __future__ import annotations

from typing import Any

import torch


class LayerProtocolError(Exception):
    """The decoder layers cannot be run one at a time on cached hidden states; the message says why."""


def decoder_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The decoder stack: the module holding the list of layers (``layers``; DBRX: ``blocks``) and the input
    embedding (whatever the model's ``get_input_embeddings`` returns); None if there is none."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    for module in model.modules():
        if any(child is embedding for child in module.children()) and layer_list_name(module):
            return module
    return None


def layers_of(decoder: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's list of layers."""
    return getattr(decoder, layer_list_name(decoder) or "layers")


def layer_list_name(decoder: torch.nn.Module) -> str | None:
    """The attribute of ``decoder`` holding its layers: ``layers`` if it is a module list, else its only one."""
    if isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList):
        return "layers"
    lists = [name for name, child in decoder.named_children() if isinstance(child, torch.nn.ModuleList)]
    return lists[0] if len(lists) == 1 else None


def layer_inputs(decoder: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """``decoder``'s forward on ``ids`` with its layers stubbed: the first layer's input hidden states, and the
    keyword arguments of every layer. Raises ``LayerProtocolError``."""
    layers = layers_of(decoder)
    records: list[dict[str, Any]] = []
    first: list[torch.Tensor] = []

    class _Done(Exception):
        pass

    def stub(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise LayerProtocolError("its decoder layers take positional arguments after the hidden states")
        first[:] = first or [hidden_states.detach()]
        records.append(kwargs)
        if len(records) == len(layers):
            raise _Done
        return hidden_states

    for layer in layers:
        layer.forward = stub
    try:
        with torch.no_grad():
            decoder(input_ids=ids, use_cache=False)
    except _Done:
        pass
    except (TypeError, ValueError, AttributeError) as e:  # the decoder wants more than hidden states back
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise LayerProtocolError(
            f"its decoder layers return more than the hidden states ({type(e).__name__}: {first_line[:80]})"
        ) from e
    finally:
        for layer in layers:
            del layer.forward
    if not first:
        raise LayerProtocolError("its decoder forward never calls its layers on input ids")
    return first[0], records
