"""A MoE layer's routed experts read from disk a chunk at a time, so that they are never all in memory.

A streamed layer is loaded without its routed experts: attention, router, shared experts and norms stay
resident, the experts module's per-expert parameters stay on the meta device. A forward of the layer over some
inputs then goes in three phases (``ExpertChunks.replaying``):

1. **record**: the layer runs over every input with its experts module answering zeros; what the module is
   called with (hidden states, the router's chosen experts and weights) is recorded. Nothing else is kept.
2. **sweep**: for each chunk of experts, their tensors are read (and dequantised) into chunk-sized parameters
   of the experts module (``fuse.py``, or transformers' own conversion for other layouts), every recorded
   (token, expert) pair routed into the chunk runs through the module's own forward as a row routed to its one
   expert with weight 1, and the chunk is dropped. A pair's output times its routing weight is added to its
   token's output in expert order (the order the module itself adds them); the unweighted output's norm is kept
   for the statistics. The routed experts are thus read once for all the inputs.
3. **replay**: the layer runs over the inputs again, in the same order, its experts module answering each call
   with the output computed in the sweep. Observers' hooks see this run only: the router's logits, the experts'
   inputs and outputs are those of a whole-layer forward (``pair_norms`` gives the statistics the pairs' norms
   without running the experts again).

Results equal the whole-layer path's up to the rounding of matrix products over other row counts. The cost is
the layer's non-expert part run twice. Where weights enter an experts module other than as a factor on an
expert's output, the sweep notices (a check on its first rows) and runs each pair with its weight instead.

``Resident`` is the same interface over an experts module whose parameters are all loaded (whole layers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from moeslim.errors import CheckpointError, DeviceError
from moeslim.layout import MoeLayer
from moeslim.shards import TensorInfo
from moeslim.stream.dequant import Item
from moeslim.stream.finite import nonfinite
from moeslim.stream.ranks import SINGLE, Ranks

PAIRS_PER_CALL = 8192  # (token, expert) pairs per experts call: bounds the (pairs, hidden) buffers
ROWS_PER_CALL = 1024  # tokens per experts call on resident experts (their intermediate activations are transient)


@dataclass(frozen=True)
class Chunk:
    """Experts ``start`` to ``stop`` loaded into the experts module, where expert ``k`` is at ``k - start``;
    ``experts`` are the ones asked for among them."""

    start: int
    stop: int
    experts: tuple[int, ...]

    def local(self, expert: int) -> int:
        return expert - self.start


@dataclass
class Call:
    """One call of an experts module: ``hidden`` ``(tokens, hidden)`` (``shape`` as passed), the chosen ``index``
    and ``weight`` ``(tokens, k)``; the sweep fills ``out`` (shaped as ``hidden``) and ``norms``, ``(tokens·k,)``
    float64 norms of each routed pair's unweighted output, token-major (0 for choices past the routed experts)."""

    hidden: torch.Tensor
    shape: torch.Size
    index: torch.Tensor
    weight: torch.Tensor
    out: torch.Tensor | None = None
    norms: torch.Tensor | None = None


def one_expert_each(experts: torch.nn.Module, rows: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The experts module's output for each row through its one ``chosen`` ``(rows, 1)`` expert, weight 1. An
    experts module that cannot take a single choice per token (LongCat-Flash's squeezes it away) gets the expert
    twice, with weights 1 and 0: the same output."""
    ones = torch.ones(chosen.shape[0], 1, dtype=rows.dtype, device=rows.device)
    forward = type(experts).forward
    try:
        return forward(experts, rows, chosen, ones)
    except ValueError:
        twice = torch.cat([chosen, chosen], dim=1)
        return forward(experts, rows, twice, torch.cat([ones, torch.zeros_like(ones)], dim=1))


_REPLAYS: weakref.WeakKeyDictionary[torch.nn.Module, deque[Call]] = weakref.WeakKeyDictionary()


def pair_norms(experts: torch.nn.Module) -> torch.Tensor | None:
    """While a streamed layer replays: the norms of the routed pairs of the experts module's next call (its
    forward pre-hooks see that call's arguments); else None (the experts are resident: run them)."""
    queue = _REPLAYS.get(experts)
    return queue[0].norms if queue else None


class Resident:
    """An experts module with all its experts loaded: one chunk of every expert."""

    parallel = False

    def __init__(self, experts: torch.nn.Module, num_experts: int) -> None:
        self.experts, self.num_experts = experts, num_experts

    def chunks(self, wanted: Iterable[int]) -> Iterator[Chunk]:
        experts = tuple(sorted(set(wanted)))
        if experts:
            yield Chunk(0, self.num_experts, experts)

    def outputs(self, hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The experts module's output for ``hidden`` routed to ``index`` with ``weight``, rows at a time."""
        pieces = zip(*(t.split(ROWS_PER_CALL) for t in (hidden, index, weight)), strict=True)
        parts = [self.experts(*args) for args in pieces]
        return torch.cat(parts) if parts else torch.zeros_like(hidden)


class ExpertChunks:
    """The routed experts of one loaded MoE layer, streamed from disk ``size`` experts at a time.

    ``items(start, stop)`` gives the on-disk tensors of experts ``start`` to ``stop`` named as experts 0.. of a
    checkpoint with that many experts; ``load(items, room)`` loads them into the model (whose experts module then has
    parameters of that many experts), writing into the tensors of ``room`` (the previous chunk's) where they fit.

    Under several ``ranks`` (expert parallel) each rank holds only its ``share`` of the experts (a contiguous
    block): a sweep gathers every rank's recorded calls, runs the pairs routed to its own experts and sums the
    partial outputs over the ranks, so each rank reads 1/N of the experts and gets its own calls' full outputs.
    ``chunks`` yields this rank's experts only. Where one chunk holds the whole share, it stays loaded from its
    first use until ``release`` (the layer is unloaded), so the sweeps of one layer read it once."""

    def __init__(
        self, experts: torch.nn.Module, num_experts: int, size: int, items: Callable[[int, int], list[Item]],
        load: Callable[[list[Item], list[torch.Tensor]], None], label: str, ranks: Ranks = SINGLE,
        params: Iterable[str] = (),
    ) -> None:  # fmt: skip
        self.experts, self.num_experts, self.ranks = experts, num_experts, ranks
        self.share = range(num_experts * ranks.rank // ranks.world, num_experts * (ranks.rank + 1) // ranks.world)
        self.size = max(1, min(size, len(self.share)))
        self._items, self._load, self.label = items, load, label
        self._held: tuple[int, int] | None = None  # the chunk kept loaded (the whole share in one chunk)
        self._params = []  # (module, attr, full shape, dtype) of the parameters the expert tensors load into
        for name in sorted(params):
            owner, _, attr = name.rpartition(".")
            module = experts.get_submodule(owner)
            param = module._parameters.get(attr)
            if param is None or not param.dim() or param.shape[0] % num_experts:
                raise CheckpointError(f"{label}: {name} does not hold the experts along its first dimension;"
                                      " this model's experts cannot be read a chunk at a time")  # fmt: skip
            self._params.append((module, attr, param.shape, param.dtype))
        self._linear: bool | None = None  # whether a pair's weight is a factor on its output (checked once)
        self._room: list[torch.Tensor] = []  # the last chunk's parameters, for the next chunk to be written into
        self._unload()

    @property
    def parallel(self) -> bool:
        """Whether the experts are divided across ranks."""
        return self.ranks.world > 1

    def chunks(self, wanted: Iterable[int]) -> Iterator[Chunk]:
        """Each chunk of this rank's share holding one of the ``wanted`` experts, loaded while the caller uses it."""
        wanted = sorted(set(wanted))
        keep = self.size >= len(self.share)  # one chunk is the whole share: it stays
        try:
            for start in range(self.share.start, self.share.stop, self.size):
                stop = min(self.share.stop, start + self.size)
                mine = tuple(k for k in wanted if start <= k < stop)
                if not mine:
                    continue
                if self._held != (start, stop):
                    self._fill(start, stop)
                    self._held = (start, stop) if keep else None
                try:
                    yield Chunk(start, stop, mine)
                finally:
                    if not keep:
                        self._unload(recycle=True)
        finally:
            self._room = []  # no chunk memory held between sweeps

    def release(self) -> None:
        """Drop a chunk kept loaded (the layer is being unloaded)."""
        if self._held is not None:
            self._held = None
            self._unload()

    def outputs(self, hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The experts module's output for ``hidden`` routed to ``index`` with ``weight``, in one sweep."""
        call = Call(hidden, hidden.shape, index, weight)
        self.sweep([call])
        assert call.out is not None
        return call.out

    @contextlib.contextmanager
    def replaying(self, run: Callable[[], None]) -> Iterator[None]:
        """Record the experts' calls of ``run()``, sweep the chunks over them, and within the context answer the
        same calls, in the same order, with their outputs (see the module docstring)."""
        calls: list[Call] = []
        experts = self.experts

        def record(hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, *args: Any, **kw: Any) -> Any:
            calls.append(Call(hidden.reshape(-1, hidden.shape[-1]), hidden.shape, index, weight))
            return torch.zeros_like(hidden)

        experts.forward = record
        try:
            run()
        finally:
            del experts.forward
        self.sweep(calls)
        queue = deque(calls)

        def replay(hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, *args: Any, **kw: Any) -> Any:
            if not queue or not torch.equal(queue[0].index, index):
                raise DeviceError(
                    f"{self.label} routed its tokens otherwise when run a second time (kernels that are"
                    " not deterministic on this device); rerun where whole layers fit in memory"
                )
            call = queue.popleft()
            assert call.out is not None
            return call.out.reshape(call.shape)

        experts.forward = replay
        _REPLAYS[experts] = queue
        try:
            yield
        finally:
            del experts.forward
            _REPLAYS.pop(experts, None)

    @torch.no_grad()
    def sweep(self, calls: Sequence[Call]) -> None:
        """Fill every call's ``out`` and ``norms``, reading each chunk that one of them routes to once; under
        several ranks, over every rank's calls, each rank running its own experts (a collective: every rank
        sweeps at the same points, with or without calls)."""
        if not self.parallel:
            self._sweep(calls)
            return
        ranks = self.ranks
        width, k = (max(v) for v in zip(*ranks.gather((_width(calls), _choices(calls))), strict=True))
        dtype = calls[0].hidden.dtype if calls else self._params[0][3]
        hidden = torch.cat([c.hidden for c in calls]) if calls else torch.zeros(0, width, dtype=dtype)
        index = torch.cat([_pad(c.index, k, self.num_experts) for c in calls]) if calls else torch.zeros(0, k).long()
        weight = torch.cat([_pad(c.weight, k, 0) for c in calls]) if calls else torch.zeros(0, k, dtype=dtype)
        gathered = (ranks.gather_rows(t) for t in (hidden, index, weight))
        every = [Call(h, h.shape, i, w) for h, i, w in zip(*gathered, strict=True)]
        self._sweep(every)  # this rank's experts over every rank's pairs; the others' add zeros here
        out = ranks.sum_tensor(torch.cat([cast(torch.Tensor, c.out) for c in every]))
        norms = ranks.sum_tensor(torch.cat([cast(torch.Tensor, c.norms) for c in every]))
        row = sum(c.hidden.shape[0] for c in every[: ranks.rank])
        for call in calls:
            rows = call.hidden.shape[0]
            call.out = out[row : row + rows]
            call.norms = norms[row * k : (row + rows) * k].reshape(rows, k)[:, : call.index.shape[1]].reshape(-1)
            row += rows

    def _sweep(self, calls: Sequence[Call]) -> None:
        e = self.num_experts
        pairs = []
        for call in calls:
            flat = call.index.reshape(-1)
            token = torch.arange(call.index.shape[0], device=flat.device).repeat_interleave(call.index.shape[1])
            pairs.append((flat, token))
            call.out = torch.zeros_like(call.hidden)
            call.norms = torch.zeros(flat.shape[0], dtype=torch.float64, device=flat.device)
        hit = set().union(*(flat[flat < e].unique().tolist() for flat, _ in pairs)) if pairs else set()
        for chunk in self.chunks(hit):
            for call, (flat, token) in zip(calls, pairs, strict=True):
                inside = ((flat >= chunk.start) & (flat < chunk.stop)).nonzero()[:, 0]
                if not inside.numel():
                    continue
                order = inside[torch.argsort(flat[inside], stable=True)]  # by expert: the module's order of sums
                for part in order.split(PAIRS_PER_CALL):
                    self._run_pairs(call, part, flat[part] - chunk.start, token[part])

    def _run_pairs(self, call: Call, part: torch.Tensor, local: torch.Tensor, token: torch.Tensor) -> None:
        assert call.out is not None and call.norms is not None
        rows = call.hidden[token]
        alone = one_expert_each(self.experts, rows, local[:, None])
        alone = alone.reshape(-1, alone.shape[-1])  # DBRX's experts answer (rows, 1, hidden)
        call.norms[part] = torch.linalg.vector_norm(alone.double(), dim=-1)
        weight = call.weight.reshape(-1)[part]
        weighted = alone * weight[:, None]
        if self._linear is None:
            probe = self._weighted(rows[:8], local[:8], weight[:8])
            self._linear = bool(torch.allclose(probe.float(), weighted[:8].float(), rtol=1e-4, atol=1e-6))
        if not self._linear:
            weighted = self._weighted(rows, local, weight)
        call.out.index_add_(0, token, weighted.to(call.out.dtype))

    def _weighted(self, rows: torch.Tensor, local: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Each row through its one expert with its own weight (as the module weighs it)."""
        out = type(self.experts).forward(self.experts, rows, local[:, None], weight[:, None].to(rows.dtype))
        return out.reshape(-1, out.shape[-1])

    def _fill(self, start: int, stop: int) -> None:
        count = stop - start
        for module, attr, shape, dtype in self._params:
            rows = shape[0] // self.num_experts * count
            module._parameters[attr] = torch.nn.Parameter(
                torch.empty((rows, *shape[1:]), dtype=dtype, device="meta"), requires_grad=False
            )
        self._set_count(count)
        room, self._room = self._room, []  # handed over: the load frees what it does not reuse
        self._load(self._items(start, stop), room)
        for module, attr, _, _ in self._params:
            param = module._parameters[attr]
            if param is None or param.is_meta:
                raise CheckpointError(f"{self.label}: experts {start}-{stop - 1} did not load {attr}; rerun with"
                                      " MOESLIM_EXPERT_CHUNK unset on a machine that holds whole layers")  # fmt: skip
            if kind := nonfinite(param.detach()):
                raise CheckpointError(f"{self.label}, experts {start}-{stop - 1}: non-finite values ({kind}) in"
                                      f" {attr}; the checkpoint is corrupt: re-download it")  # fmt: skip

    def _unload(self, recycle: bool = False) -> None:
        """Put the parameters back on the meta device; with ``recycle``, their memory is kept as ``_room`` for the
        next chunk, which is then written over it instead of into fresh pages (zeroed by the kernel, faulted in
        one by one: about as long as converting the weights)."""
        self._room = [p.data for m, a, _, _ in self._params if (p := m._parameters[a]) is not None and not p.is_meta]
        self._room = self._room if recycle else []
        for module, attr, shape, dtype in self._params:
            module._parameters[attr] = torch.nn.Parameter(
                torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False
            )
        self._set_count(self.num_experts)

    def _set_count(self, count: int) -> None:
        """Experts modules that size views by ``num_experts`` (DBRX's) see the chunk's count."""
        for module in self.experts.modules():
            if isinstance(getattr(module, "num_experts", None), int):
                module.__dict__["num_experts"] = count


@dataclass(frozen=True)
class ExpertTensors:
    """A MoE layer's routed-expert tensors as dense items: each expert's own, and the fused ones."""

    block: str
    per_expert: tuple[tuple[Item, ...], ...]
    fused: tuple[Item, ...]
    num_experts: int

    def chunk(self, start: int, stop: int) -> list[Item]:
        """Experts ``start`` to ``stop``, named and shaped as experts ``0..stop-start`` of a checkpoint with that
        many: per-expert tensors renamed, fused ones sliced along dim 0 (bytes ``start..stop`` of it)."""
        out: list[Item] = [
            dataclasses.replace(item, name=_renamed(item.name, self.block, j, j - start))
            for j in range(start, stop) if self.per_expert
            for item in self.per_expert[j]
        ]  # fmt: skip
        return out + [_sliced(item, self.num_experts, start, stop) for item in self.fused]


def _width(calls: Sequence[Call]) -> int:
    return int(calls[0].hidden.shape[-1]) if calls else 0


def _choices(calls: Sequence[Call]) -> int:
    return max((int(c.index.shape[1]) for c in calls), default=0)


def _pad(t: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """``(rows, choices)`` widened to ``k`` choices with ``fill`` (an index past the routed experts, or weight 0)."""
    return t if t.shape[1] == k else torch.cat([t, t.new_full((t.shape[0], k - t.shape[1]), fill)], dim=1)


def expert_tensors(
    layer: MoeLayer, num_experts: int, dense: Callable[[Iterable[str]], list[Item]]
) -> ExpertTensors | None:
    """The layer's expert tensors (``dense``: on-disk names to dense items), or None where they cannot be read a
    chunk at a time (experts on a dim other than 0, or not every expert stored)."""
    if layer.dims or len(layer.per_expert) not in (0, num_experts) or (not layer.per_expert and not layer.fused):
        return None
    fused = tuple(dense(layer.fused))
    try:
        for item in fused:
            _sliced(item, num_experts, 0, 1)
    except ValueError:
        return None
    per_expert = tuple(tuple(dense(names)) for names in layer.per_expert)
    return ExpertTensors(layer.block, per_expert, fused, num_experts)


def expert_names(layer: MoeLayer) -> set[str]:
    """The on-disk tensors of a layer's routed experts."""
    return {n for names in layer.per_expert for n in names} | set(layer.fused)


def _renamed(name: str, block: str, expert: int, to: int) -> str:
    """``name`` (under ``block``) with its expert number ``expert`` replaced by ``to``."""
    parts = name[len(block) :].split(".")
    at = parts.index(str(expert))
    parts[at] = str(to)
    return block + ".".join(parts)


def _sliced(item: Item, num_experts: int, start: int, stop: int) -> Item:
    """Experts ``start..stop`` of a fused tensor holding ``num_experts`` along dim 0 (rows of each, DBRX)."""
    if isinstance(item, TensorInfo):
        return _rows(item, num_experts, start, stop)
    parts = {role: _rows(info, num_experts, start, stop) for role, info in item.parts.items()}
    return dataclasses.replace(item, parts=parts, shape=_chunk_shape(item.shape, num_experts, start, stop))


def _rows(info: TensorInfo, num_experts: int, start: int, stop: int) -> TensorInfo:
    if not info.shape or info.shape[0] % num_experts:
        raise ValueError(f"{info.name} does not hold {num_experts} experts along dim 0")
    per = info.nbytes // num_experts
    shape = _chunk_shape(info.shape, num_experts, start, stop)
    return dataclasses.replace(info, shape=shape, start=info.start + start * per, end=info.start + stop * per)


def _chunk_shape(shape: tuple[int, ...], num_experts: int, start: int, stop: int) -> tuple[int, ...]:
    if not shape or shape[0] % num_experts:
        raise ValueError(f"shape {list(shape)} does not hold {num_experts} experts along dim 0")
    return (shape[0] // num_experts * (stop - start), *shape[1:])
