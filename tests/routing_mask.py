"""The reference for surgery: the *original* model whose routers behave as if dropped experts did not exist.

Every router in transformers 5.x computes its logits with one ``F.linear`` call on its own weight; during
that call we add ``-inf`` to the dropped experts' logits, and we set their ``e_score_correction_bias`` (the
sigmoid routers' choice bias) to ``-inf``. Softmax then gives them probability 0 and the remaining ones
renormalise over the kept set; sigmoid routers give them score 0 and never choose them; group scores see
only kept experts. Nothing of the pruned checkpoint is used, so agreement is evidence, not tautology.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def routers_of(model: torch.nn.Module) -> dict[int, tuple[torch.nn.Module, torch.nn.Module]]:
    """Decoder layer index → (MoE block module, its router module), found by transformers' class names."""
    found = {}
    for name, module in model.named_modules():
        if type(module).__name__.endswith(("Router", "TopKRouter", "TopkRouter")):
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
    originals = []
    for index, (block, router) in routers.items():
        n = router.weight.shape[0]
        mask = torch.full((n,), float("-inf"))
        mask[list(kept[index])] = 0.0
        for holder in (block, router):
            bias = getattr(holder, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                originals.append((bias, bias.detach().clone()))
                with torch.no_grad():
                    bias.add_(mask.to(bias.dtype))
        originals.append((router, router.forward))
        router.forward = _masked_forward(router, mask)
    try:
        yield
    finally:
        for target, saved in originals:
            if isinstance(target, torch.Tensor):
                with torch.no_grad():
                    target.copy_(saved)
            else:
                del target.forward  # restores the class's forward
                assert target.forward.__func__ is type(target).forward  # type: ignore[attr-defined]


def _masked_forward(router: torch.nn.Module, mask: torch.Tensor):
    original = type(router).forward

    def forward(*args, **kwargs):
        real_linear = F.linear

        def linear(x, weight, bias=None):
            out = real_linear(x, weight, bias)
            if weight is router.weight or weight.data_ptr() == router.weight.data_ptr():
                out = out + mask.to(out.dtype)
            return out

        F.linear = linear
        try:
            return original(router, *args, **kwargs)
        finally:
            F.linear = real_linear

    return forward
