"""Routers that behave as if dropped experts did not exist: what a pruned model computes, on the original.

Every router in transformers 5.x computes its logits with one ``F.linear`` call on its weight (or on an upcast
copy: the call is told by the weight's shape); during that call ``-inf`` is added to the dropped experts'
logits, and their selection biases (``e_score_correction_bias`` and alike) are set to ``-inf``. Softmax then
gives them probability 0 and the others renormalise over the kept set; sigmoid routers give them score 0 and
never choose them; group scores see only kept experts. Rows after the routed experts (zero-computation experts)
are left alone. Progressive calibration and the reconstruction criterion route this way; the surgery tests use
it as their reference (it shares no code with surgery).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from moeslim.layout import Layout
from moeslim.stream.modules import MoeParts


@contextlib.contextmanager
def drop_experts_of(model: torch.nn.Module, layout: Layout, kept: dict[int, tuple[int, ...]]) -> Iterator[None]:
    """Within the context, every MoE layer of ``model`` routes only to ``kept[layer]``; routers and selection
    biases are found from the checkpoint's own tensor names (``layout``), mapped forward by transformers."""
    from moeslim.stream.modules import moe_parts

    with contextlib.ExitStack() as stack:
        for index, parts in moe_parts(model, layout).items():
            stack.enter_context(mask_router(parts, kept[index], layout.num_experts))
        yield


@contextlib.contextmanager
def mask_router(parts: MoeParts, kept: tuple[int, ...], experts: int) -> Iterator[None]:
    """Within the context, the router of ``parts`` routes only to the ``kept`` of its ``experts`` routed
    experts; rows after them (zero-computation experts) stay. Its selection biases are masked too."""
    dropped = sorted(set(range(experts)) - set(kept))

    def mask_of(rows: int, device: torch.device) -> torch.Tensor:
        mask = torch.zeros(rows, device=device)
        mask[dropped] = float("-inf")
        return mask

    biases = list(parts.biases)
    saved = [b.detach().clone() for b in biases]
    with torch.no_grad():
        for bias in biases:
            bias.add_(mask_of(bias.shape[-1], bias.device).to(bias.dtype))
    mask = mask_of(parts.weight.shape[0], parts.weight.device)
    try:
        with router_logits(parts, lambda logits: logits + mask.to(logits.dtype)):
            yield
    finally:
        with torch.no_grad():
            for bias, value in zip(biases, saved, strict=True):
                bias.copy_(value)


@contextlib.contextmanager
def router_logits(parts: MoeParts, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the context, the logits that the router of ``parts`` computes pass through ``edit`` (which may
    record them or change them). The logits are the output of the one ``F.linear`` call in the router's own
    forward whose weight has the router weight's shape (the weight itself, or an upcast copy of it)."""
    with _logit_call(parts, lambda linear, *args: edit(linear(*args))):
        yield


@contextlib.contextmanager
def masked_rows(parts: MoeParts, logits: torch.Tensor, masks: torch.Tensor, args: tuple) -> Iterator[tuple]:
    """Within the context, the router of ``parts``, called on ``C × T`` rows (``C = len(masks)``, ``T =
    len(logits)``), routes rows ``c·T … c·T + T - 1`` as ``mask_router`` routes the ``T`` tokens whose logits are
    ``logits`` with the routed experts that ``masks[c]`` (``0`` or ``-inf`` per routed expert) drops; rows after
    the routed experts (zero-computation experts) stay. Its logit matmul is not
    computed (the rows' own input is not read: any rows of the right shape do), its output is ``logits + masks[c]``
    per row, and each selection bias becomes one row per call row, ``bias + masks[c]``. Yields the router's extra
    arguments ``args`` with each bias among them (MiniMax passes its own) replaced the same way.

    Exact where the router treats rows independently, reads its input only through that matmul and adds its biases
    to ``(rows, experts)`` scores; a router that indexes or reshapes its bias otherwise fails or routes otherwise,
    which callers check (``ReconstructionSampler`` compares against ``mask_router``)."""
    c, t = masks.shape[0], logits.shape[0]
    rows = (logits[None] + _widen(masks, logits.shape[1])[:, None].to(logits.dtype)).reshape(c * t, -1)  # (C·T, rows)
    originals = [getattr(module, name) for module, name in parts.bias_slots]
    per_row = [_rows_of(bias, masks, t) for bias in originals]
    try:
        for (module, name), new in zip(parts.bias_slots, per_row, strict=True):
            setattr(module, name, torch.nn.Parameter(new, False) if name in module._parameters else new)
        with _logit_call(parts, lambda *_: rows):
            yield tuple(next((n for o, n in zip(originals, per_row, strict=True) if a is o), a) for a in args)
    finally:
        for (module, name), bias in zip(parts.bias_slots, originals, strict=True):
            setattr(module, name, bias)


def _rows_of(bias: torch.Tensor, masks: torch.Tensor, t: int) -> torch.Tensor:
    """``(C·T, n)``: ``bias`` (``n`` values, any shape) plus ``masks[c]`` in each of candidate ``c``'s ``T`` rows."""
    n = bias.numel()
    per_candidate = bias.detach().reshape(1, n) + _widen(masks, n).to(bias.dtype)  # (C, n)
    return per_candidate.repeat_interleave(t, dim=0)


def _widen(masks: torch.Tensor, n: int) -> torch.Tensor:
    """``(C, n)``: ``masks`` over the routed experts, then ``0`` for the rows after them."""
    return torch.nn.functional.pad(masks, (0, n - masks.shape[1]))


@contextlib.contextmanager
def _logit_call(parts: MoeParts, call: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Within the context, the router's ``F.linear`` call on a weight of the router weight's shape returns
    ``call(F.linear, input, weight, bias)``; its other ``F.linear`` calls are left alone."""
    router = parts.router
    shape = tuple(parts.weight.shape)
    previous = router.__dict__.get("forward")  # an enclosing router_logits context's, if any
    inner = previous or type(router).forward.__get__(router)

    def forward(*args: Any, **kwargs: Any) -> Any:
        real_linear = F.linear

        def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            return call(real_linear, x, weight, bias) if tuple(weight.shape) == shape else real_linear(x, weight, bias)

        F.linear = linear  # type: ignore[assignment]
        try:
            return inner(*args, **kwargs)
        finally:
            F.linear = real_linear

    router.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del router.forward  # the class's forward again
        else:
            router.forward = previous
