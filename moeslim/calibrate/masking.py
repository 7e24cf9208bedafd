"""Routers that behave as if dropped experts did not exist: what a pruned model computes, on the original.

Every router in transformers 5.x computes its logits with one ``F.linear`` call on its own weight; during
that call ``-inf`` is added to the dropped experts' logits, and their ``e_score_correction_bias`` (the
sigmoid routers' choice bias) is set to ``-inf``. Softmax then gives them probability 0 and the others
renormalise over the kept set; sigmoid routers give them score 0 and never choose them; group scores see
only kept experts. Progressive calibration and the reconstruction criterion route this way; the surgery
tests use it as their reference (it shares no code with surgery).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from moeslim.layout import Layout


def routers_of(model: torch.nn.Module) -> dict[int, tuple[torch.nn.Module, torch.nn.Module]]:
    """Decoder layer index → (MoE block module, its router module), found by transformers' class names."""
    found = {}
    for name, module in model.named_modules():
        if "Router" in type(module).__name__:
            parts = name.split(".")
            index = int(parts[parts.index("layers") + 1])
            block = model.get_submodule(".".join(parts[:-1]))
            found[index] = (block, module)
    return found


@contextlib.contextmanager
def drop_experts(model: torch.nn.Module, kept: dict[int, tuple[int, ...]]) -> Iterator[None]:
    """Within the context, the routers of ``model`` route only to ``kept[layer]`` experts."""
    routers = routers_of(model)
    assert set(routers) == {i for i in kept if i in routers} and routers, (sorted(routers), sorted(kept))
    with contextlib.ExitStack() as stack:
        for index, (block, router) in routers.items():
            stack.enter_context(mask_router(block, router, kept[index]))
        yield


@contextlib.contextmanager
def drop_experts_of(model: torch.nn.Module, layout: Layout, kept: dict[int, tuple[int, ...]]) -> Iterator[None]:
    """Within the context, every MoE layer of ``model`` routes only to ``kept[layer]``; routers and selection
    biases are found from the checkpoint's own tensor names (``layout``), mapped forward by transformers."""
    from moeslim.engine.modules import router_modules

    with contextlib.ExitStack() as stack:
        for index, (block, router, biases) in router_modules(model, layout).items():
            stack.enter_context(mask_router(block, router, kept[index], biases))
        yield


@contextlib.contextmanager
def mask_router(
    block: torch.nn.Module,
    router: torch.nn.Module,
    kept: tuple[int, ...],
    biases: list[torch.Tensor] | None = None,
) -> Iterator[None]:
    """Within the context, ``router`` (of MoE ``block``) routes only to the ``kept`` experts; ``biases`` are
    the selection biases to mask too (by default ``e_score_correction_bias`` of the block or router)."""
    weight: torch.Tensor = router.weight  # type: ignore[assignment]
    mask = torch.full((weight.shape[0],), float("-inf"), device=weight.device)  # (experts,)
    mask[list(kept)] = 0.0
    if biases is None:
        biases = [
            b for h in (block, router) if isinstance(b := getattr(h, "e_score_correction_bias", None), torch.Tensor)
        ]
    saved = [b.detach().clone() for b in biases]
    with torch.no_grad():
        for bias in biases:
            bias.add_(mask.to(bias.dtype))
    router.forward = _masked_forward(router, mask)
    try:
        yield
    finally:
        del router.forward  # the class's forward again
        with torch.no_grad():
            for bias, value in zip(biases, saved, strict=True):
                bias.copy_(value)


def _masked_forward(router: torch.nn.Module, mask: torch.Tensor) -> Callable[..., Any]:
    """The router's own forward, with ``mask`` added to the logits of its single ``F.linear`` call."""
    original = type(router).forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        real_linear = F.linear

        def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            out = real_linear(x, weight, bias)
            return out + mask.to(out.dtype) if weight is router.weight else out

        F.linear = linear  # type: ignore[assignment]
        try:
            return original(router, *args, **kwargs)
        finally:
            F.linear = real_linear

    return forward
