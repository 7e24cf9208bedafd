"""Correction after pruning: the kept experts' down projections refit so the pruned layer's output stays close
to the original's, inside the standard config (the same tensors, other values).

Pruning moves every token that chose a dropped expert onto kept ones, and the MoE output loses what the dropped
experts added. The output is linear in each kept expert's down projection ``W_k`` ``(out, inner)``: with ``h_k`` the
expert's inner activation and ``w_k`` the pruned router's weight, the routed output is ``Σ_k w_k W_k h_k``. Each
kept expert is refit to carry, on the tokens it now serves, its own output plus its share of the error
``e = y - ŷ`` (``y`` the original routed output, ``ŷ`` the pruned one; the share is ``e / s`` with ``s = Σ_k w_k``,
so the shares add up to ``e``). Weighted by ``w_k²``, that is ridge least squares with a closed form:

    ΔW_k = C_k (G_k + λ mean(diag G_k) I)⁻¹,   G_k = Σ_t w_k² h_k h_kᵀ,   C_k = Σ_t w_k² (e / s) h_kᵀ

The pass streams the original model as calibration does, one decoder layer in memory at a time, and fits every MoE
layer on its own inputs (fitting each on the outputs of the already pruned and corrected layers before it instead
gained under 0.002 KL on the trained fixtures, for a second forward per layer). Memory: the layer, the hidden
states, the layer's MoE inputs and error shares, and one expert's sums. ``benchmarks/quality`` measures the gain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from moeslim.stream.chunks import ExpertChunks, Resident
from moeslim.stream.loop import Observer, Walk
from moeslim.stream.masking import mask_router
from moeslim.stream.modules import MoeParts, choice_of, takes_routing
from moeslim.stream.ranks import SINGLE, Ranks
from moeslim.surgery.patch import PatchError

RIDGE = 1e-2  # λ, relative to the mean diagonal of G_k (1e-3 to 1e-1: held-out KL ± 0.002)
CHUNK = 1024  # tokens per experts call while fitting (their intermediate activations are the transient memory)


class Unsupported(Exception):
    """This model's experts cannot be corrected (the message says why)."""


@dataclass(frozen=True)
class Down:
    """Where an experts module keeps its down projections: a 3-D parameter with one slice per expert, used by
    ``F.linear`` as ``(out, inner)`` (``transposed``: the slice is stored ``(inner, out)``)."""

    attr: str
    transposed: bool


def inner_activations(experts: Any, x: torch.Tensor, k: int) -> tuple[torch.Tensor, Down]:
    """``h_k`` ``(tokens, inner)`` of expert ``k`` on ``x``, and where its down projection is: the input of the last
    product (``F.linear`` or ``@``) in the experts module's own eager forward whose weight is expert ``k``'s slice
    of a 3-D parameter, and whose output is the expert's output up to a constant (a bias added after). Raises
    ``Unsupported`` where the module computes otherwise."""
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = []  # (input, weight, output, F.linear?)

    class Products(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if func is F.linear or (func in MATMULS and len(args) == 2):
                calls.append((args[0], args[1], out, func is F.linear))
            return out

    index = torch.full((x.shape[0], 1), k, dtype=torch.long, device=x.device)
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    with _eager(experts), Products():
        out = experts.forward(x, index, ones)
    for h, weight, product, linear in reversed(calls):
        down = _down_of(experts, weight, k, linear)
        if down is None:
            continue
        rest = (out - product).float()
        if h.dim() != 2 or product.shape != out.shape or not torch.allclose(rest, rest[:1].expand_as(rest), atol=1e-5):
            break
        return h, down
    raise Unsupported("its experts' last projection is not one expert's slice of a weight giving its output")


MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


def _down_of(experts: Any, weight: torch.Tensor, k: int, linear: bool) -> Down | None:
    """Which 3-D parameter ``weight`` is expert ``k``'s slice of (itself or transposed), and how that slice is laid
    out: ``F.linear`` takes its weight ``(out, inner)``, ``@`` takes it ``(inner, out)``."""
    for attr, param in experts.named_parameters(recurse=False):
        if param.dim() != 3 or param.shape[0] <= k or weight.data_ptr() != param[k].data_ptr():
            continue
        piece = param[k]
        if weight.shape == piece.shape and weight.stride() == piece.stride():
            return Down(attr, transposed=not linear)
        if weight.shape == piece.T.shape and weight.stride() == piece.T.stride():
            return Down(attr, transposed=linear)
    return None


@contextlib.contextmanager
def _eager(experts: Any) -> Iterator[None]:
    """transformers 5.x experts dispatch on ``config._experts_implementation``; the eager one loops over experts."""
    config = getattr(experts, "config", None)
    if config is None or not hasattr(config, "_experts_implementation"):
        yield
        return
    saved = config._experts_implementation
    config._experts_implementation = "eager"
    try:
        yield
    finally:
        config._experts_implementation = saved


class LayerFit:
    """Collects one MoE layer's inputs and routed outputs while the original layer runs, then fits the kept
    experts of the pruned layer on them."""

    def __init__(self, parts: MoeParts, num_experts: int, experts: Resident | ExpertChunks | None = None) -> None:
        if not takes_routing(parts.experts):
            raise Unsupported("its experts module is not called with the router's choice")
        self.parts, self.num_experts = parts, num_experts
        self.access = Resident(parts.experts, num_experts) if experts is None else experts
        self._inputs: list[torch.Tensor] = []
        self._outputs: list[torch.Tensor] = []
        self._router_args: tuple = ()
        self._broken = False
        self.down: Down | None = None

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Within the context, every call of the block records its router's input and its experts' output (the
        first call of each inside the block's own forward: others, such as a criterion's, are not the block's)."""
        call: dict[str, torch.Tensor] = {}
        armed = [False]

        def on_block(module: torch.nn.Module, args: tuple) -> None:
            call.clear()
            armed[0] = True

        def on_router(module: torch.nn.Module, args: tuple) -> None:
            if armed[0] and "x" not in call:
                call["x"] = args[0].reshape(-1, args[0].shape[-1]).detach().clone()
                self._router_args = args[1:]  # e.g. MiniMax passes its correction bias: a live buffer

        def on_experts(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            if armed[0] and "y" not in call:
                call["y"] = out.reshape(-1, out.shape[-1]).detach().clone()

        def on_block_done(module: torch.nn.Module, args: tuple, out: Any) -> None:
            armed[0] = False
            if "x" in call and "y" in call and call["x"].shape[0] == call["y"].shape[0]:
                self._inputs.append(call.pop("x"))
                self._outputs.append(call.pop("y"))
            else:
                self._broken = True

        handles = [
            self.parts.block.register_forward_pre_hook(on_block),
            self.parts.router.register_forward_pre_hook(on_router),
            self.parts.experts.register_forward_hook(on_experts),
            self.parts.block.register_forward_hook(on_block_done),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def solve(self, kept: tuple[int, ...], ranks: Ranks, ridge: float = RIDGE) -> dict[int, torch.Tensor]:
        """Kept expert → ``ΔW_k`` ``(out, inner)`` float32 (experts whose tokens lost nothing are left out), for a
        layer keeping ``kept``. One expert's sums at a time, taken over every rank's tokens."""
        if self._broken or not self._inputs:
            raise Unsupported("its block does not call its router and experts on the same tokens")
        x, share = torch.cat(self._inputs), torch.cat(self._outputs)
        self._inputs, self._outputs = [], []
        original, chosen = choice_of(self.parts.router(x, *self._router_args))
        with mask_router(self.parts, kept, self.num_experts):
            weight, index = choice_of(self.parts.router(x, *self._router_args))
        # share ← (y − ŷ) / s, in place; a token the pruned router routes exactly as before lost nothing (exactly 0,
        # not the rounding of recomputing its output)
        changed = ((chosen != index) | (original != weight)).any(-1)
        share[~changed] = 0
        rows = changed.nonzero()[:, 0]
        pruned = self.access.outputs(x[rows], index[rows], weight[rows]).float()  # under expert parallel: collective
        total = weight[rows].float().sum(-1, keepdim=True).clamp_min(1e-12)
        share[rows] = ((share[rows].float() - pruned) / total).to(share.dtype)
        parallel = self.access.parallel
        if parallel:  # each rank fits its own experts, on every rank's tokens
            x, share, weight, index = (torch.cat(ranks.gather_rows(t)) for t in (x, share, weight, index))
            ranks, everyone = SINGLE, ranks
        deltas = {}
        for chunk in self.access.chunks(kept):  # experts streamed from disk: a chunk at a time
            if self.down is None:
                self._probe(chunk.local(chunk.experts[0]))
            out, inner = self._shape()
            for k in chunk.experts:
                chosen = index == k
                rows = chosen.any(-1).nonzero()[:, 0]
                w = (weight * chosen).sum(-1).float()
                local = chunk.local(k)  # where the experts module holds it
                if ranks.world == 1 and 0 < rows.numel() < min(inner, CHUNK):
                    delta = self._few_tokens(x, share, w, rows, local, ridge)  # the same solution, cheaper
                else:
                    delta = self._from_sums(*self._sums(x, share, w, rows, local, inner, out), ranks, ridge)
                if delta is not None:
                    deltas[k] = delta
        if parallel:
            parts = everyone.gather((deltas, self.down))
            deltas = {k: d for part, _ in parts for k, d in part.items()}
            deltas = {k: deltas[k] for k in sorted(deltas)}
            self.down = next((down for _, down in parts if down is not None), None)
        return deltas

    @staticmethod
    def _from_sums(g: torch.Tensor, c: torch.Tensor, ranks: Ranks, ridge: float) -> torch.Tensor | None:
        """``ΔW = C (G + λ'I)⁻¹`` from this rank's sums, added over the ranks."""
        if ranks.world > 1:
            g, c = (torch.from_numpy(ranks.sum(t.double().numpy())).float() for t in (g, c))
        scale = float(g.diagonal().mean())
        if scale <= 0.0 or not c.any():  # no token reached it, or its tokens lost nothing
            return None
        # G + λ'I is positive definite, and λ' bounds its condition: float32 Cholesky is enough for a correction
        factor = torch.linalg.cholesky(g + ridge * scale * torch.eye(g.shape[0], dtype=g.dtype))
        return torch.cholesky_solve(c.T, factor).T

    def _few_tokens(
        self, x: torch.Tensor, share: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, k: int, ridge: float
    ) -> torch.Tensor | None:
        """With fewer tokens ``n`` than inner units the same ridge solution through the ``n × n`` system:
        ``Bᵀ A (AᵀA + λ'I)⁻¹ = Bᵀ (AAᵀ + λ'I)⁻¹ A`` with ``A = diag(w) H``, ``B = diag(w) E / s``."""
        h, self.down = inner_activations(self.parts.experts, x[rows], k)
        a = h.float().cpu() * w[rows, None].cpu()
        b = share[rows].float().cpu() * w[rows, None].cpu()
        scale = float((a * a).sum()) / a.shape[1]  # mean diagonal of AᵀA
        if scale <= 0.0 or not b.any():
            return None
        factor = torch.linalg.cholesky(a @ a.T + ridge * scale * torch.eye(a.shape[0], dtype=a.dtype))
        return b.T @ torch.cholesky_solve(a, factor)

    def _sums(
        self, x: torch.Tensor, share: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, k: int, inner: int,
        out: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``G_k`` ``(inner, inner)`` and ``C_k`` ``(out, inner)`` over this rank's tokens routed to ``k``."""
        g, c = torch.zeros(inner, inner), torch.zeros(out, inner)
        w2 = w**2
        for part in rows.split(CHUNK) if rows.numel() else ():
            h, self.down = inner_activations(self.parts.experts, x[part], k)
            h = h.float()
            weighted = h * w2[part, None]
            g += (weighted.T @ h).cpu()
            c += ((share[part].float() * w2[part, None]).T @ h).cpu()
        return g, c

    def _shape(self) -> tuple[int, int]:
        """``(out, inner)`` of one expert's down projection."""
        assert self.down is not None
        param = getattr(self.parts.experts, self.down.attr)
        return (param.shape[2], param.shape[1]) if self.down.transposed else (param.shape[1], param.shape[2])

    def _probe(self, k: int) -> None:
        """Find the down projection on one token."""
        x = torch.zeros(1, self.parts.weight.shape[1], dtype=self.parts.weight.dtype, device=self.parts.weight.device)
        _, self.down = inner_activations(self.parts.experts, x, k)


class Fitter(Observer):
    """Fits, as an observer of the layer loop, each trunk MoE layer's correction for the experts ``kept(index)``
    keeps there, on that layer's inputs; ``on_fit(model, index, kept, deltas, down)`` follows each fitted layer.

    A model whose experts cannot be corrected (``Unsupported``, or a ``PatchError`` from ``on_fit``) sets
    ``error`` to why; nothing more is fitted, and a walk with no other observer stops there."""

    def __init__(self, family: str, kept: Callable[[int], tuple[int, ...]], on_fit: OnFit) -> None:
        self.family, self.kept, self.on_fit = family, kept, on_fit
        self.error: str | None = None
        self._fit: LayerFit | None = None
        self._last = -1

    def begin(self, walk: Walk) -> None:
        self._last = max(walk.moe)

    def stop(self, walk: Walk) -> int | None:
        return self._last + 1

    def batches(self, walk: Walk, index: int) -> list[int] | None:
        return list(range(len(walk.store))) if self.error is None and index <= self._last else None

    def layer(self, walk: Walk, index: int, layer: torch.nn.Module) -> AbstractContextManager[None] | None:
        block = walk.block(index)
        if block is None or self.error is not None:
            return None
        try:
            self._fit = LayerFit(block, walk.runner.layout.num_experts, walk.runner.experts_of(index))
        except Unsupported as e:
            self._give_up(e)
            return None
        return self._fit.capture()

    def after(self, walk: Walk, index: int, layer: torch.nn.Module) -> None:
        fit, self._fit = self._fit, None
        if fit is None:
            return
        kept = self.kept(index)
        try:
            self.on_fit(walk.runner.model, index, kept, fit.solve(kept, walk.ranks), fit.down)
        except (Unsupported, PatchError) as e:
            self._give_up(e)

    def done(self, walk: Walk) -> bool:
        return self.error is not None

    def _give_up(self, e: Exception) -> None:
        self.error = f"{self.family}: {e}"


OnFit = Callable[[Any, int, tuple[int, ...], dict, Any], None]  # (model, layer, kept, ΔW per expert, down)
