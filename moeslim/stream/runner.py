"""Layer-by-layer forward through the model's own transformers code, one decoder layer resident at a time.

The model is instantiated on the meta device; each decoder layer's on-disk tensors are turned into its
in-memory form by transformers' own loading code (``convert_and_load_state_dict_in_model``), except that
per-expert tensors are written into the fused expert parameters one expert at a time (``fuse.py``, the same
values at a third of the memory); the layer runs over all cached hidden states batch by batch, and is
dropped back to meta. The arguments each layer receives (attention masks, rotary embeddings, positions) are captured
from one run of the model's own forward with the layers stubbed out, so masks and rotary are the model's.
While a layer computes, a background thread reads the next layer's bytes into the page cache.

This module uses transformers internals (pinned by the ``transformers>=5,<6`` range, covered by tests that
compare against an ordinary full forward).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import logging as hf_logging

from moeslim.errors import CheckpointError, DeviceError
from moeslim.families.table import calibration_refused
from moeslim.layout import Layout, MoeLayer
from moeslim.shards import TensorInfo
from moeslim.source import Checkpoint
from moeslim.stream.activations import Activations
from moeslim.stream.chunks import ExpertChunks, ExpertTensors, Resident, expert_names, expert_tensors
from moeslim.stream.dequant import TORCH_DTYPES, Deferred, Item, Reader, dense_items
from moeslim.stream.finite import check_finite
from moeslim.stream.fuse import Fusion, fill, fused_shape, plan_fusions
from moeslim.stream.modules import MoeParts, loaded_names, moe_parts, takes_routing
from moeslim.stream.ranks import SINGLE, Ranks, divides_experts
from moeslim.stream.stub import LayerProtocolError, layer_inputs, layer_list_name
from moeslim.stream.stub import decoder_of as find_decoder

READ_CHUNK = 16 * 2**20


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} asked for a GPU but torch sees no CUDA device; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"--device {name!r} is not a device torch knows (use cpu, cuda or cuda:N)") from e


class LayerRunner:
    """Runs a checkpoint's decoder layers in order over cached hidden states."""

    def __init__(
        self, ckpt: Checkpoint, layout: Layout, device: str = "cpu", dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False, expert_chunk: int | None = None, ranks: Ranks = SINGLE,
    ) -> None:  # fmt: skip
        self.ckpt, self.layout, self.device, self.dtype = ckpt, layout, resolve_device(device), dtype
        self.expert_chunk = expert_chunk  # routed experts read this many at a time (None: whole layers)
        self.ranks = ranks if divides_experts(ranks) else SINGLE  # the ranks dividing each layer's experts
        self.model = meta_model(ckpt.root, dtype, trust_remote_code)
        self._load_config = LoadStateDictConfig(
            device_map={"": self.device},
            dtype=dtype,
            weight_mapping=get_model_conversion_mapping(self.model),  # type: ignore[arg-type]
        )
        self._materialize_buffers()
        self.decoder = decoder_of(self.model)
        self._decoder_name = next(f"{n}." if n else "" for n, m in self.model.named_modules() if m is self.decoder)
        self._layers_attr = layer_list_name(self.decoder) or "layers"  # "layers"; DBRX: "blocks"
        self._stack = f"{layout.family.layers_name}."  # the layer list, as tensor names spell it
        self.prefix = layout.layers[0].block.split(self._stack)[0]  # on-disk decoder prefix, e.g. "model."
        self._kwargs: dict[int, dict[int, list[dict[str, Any]]]] = {}  # batch → sequence length → per layer
        self._moe = {layer.index: layer for layer in layout.layers}
        self.parts = moe_parts(self.model, layout)  # MoE modules, found from the checkpoint's tensor names
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeslim-prefetch")
        self._full_gc = ckpt.total_bytes >= FULL_COLLECTION_BYTES * max(1, layout.num_hidden_layers)
        self._experts: dict[int, Resident | ExpertChunks] = {}  # the loaded MoE layer's routed experts
        self._room: list[torch.Tensor] = []  # the last unloaded layer's expert parameters, for the next to reuse
        self._replaying = False

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return cast(torch.nn.ModuleList, getattr(self.decoder, self._layers_attr))

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    def embed(
        self, tokens: torch.Tensor, batch_size: int, store: Activations | None = None, only: list[int] | None = None
    ) -> Activations:
        """The first decoder layer's input for ``tokens`` ``(samples, seq)``, in batches (those numbered ``only``, if
        given), from the model's own forward (embedding scale, hyper-connection streams and all), appended to
        ``store`` (default: a new one, in memory); also captures each layer's call arguments."""
        self._load_embedding()
        store = Activations() if store is None else store
        batches = tokens.split(batch_size)
        for ids in batches if only is None else [batches[b] for b in only]:
            first, kwargs = self._capture_layer_kwargs(ids.to(self.device))
            self._kwargs.setdefault(ids.shape[0], {}).setdefault(ids.shape[1], kwargs)
            store.append(first)
        return store

    def capture(self, tokens: torch.Tensor, batch_size: int) -> None:
        """Load the input embedding and capture each layer's call arguments (masks, rotary) for every batch
        shape of ``tokens``; what ``embed`` does besides embedding, for a run that starts from saved hidden states."""
        self._load_embedding()
        for ids in tokens.split(batch_size):
            if ids.shape[1] not in self._kwargs.get(ids.shape[0], {}):
                kwargs = self._capture_layer_kwargs(ids.to(self.device))[1]
                self._kwargs.setdefault(ids.shape[0], {})[ids.shape[1]] = kwargs

    def _load_embedding(self) -> None:
        names = self._before_layers_names()
        self._load(names)
        check_finite(self.model, self.ckpt, names)

    def layers(
        self, start: int = 0, stop: int | None = None, unloaded: Callable[[int], None] = lambda index: None
    ) -> Iterator[tuple[int, torch.nn.Module]]:
        """Yield ``(index, layer)`` for layers ``start`` to ``stop`` (default: the last) with that layer's weights
        loaded; it is unloaded when the caller moves on, and ``unloaded(index)`` follows, before the next layer
        loads. Layers outside the range are never read."""
        indices = range(start, self.num_layers if stop is None else stop)
        pending: Future[None] | None = self._warm(start) if indices else None
        try:
            for i in indices:
                if pending is not None:
                    pending.result()
                pending = self._warm(i + 1) if i + 1 < indices.stop else None
                layer = self._load_layer(i)
                try:
                    yield i, layer
                finally:
                    self._unload_layer(i, layer, recycle=i + 1 < indices.stop)
                unloaded(i)
        finally:
            self._room = []

    @torch.no_grad()
    def forward(
        self, index: int, layer: torch.nn.Module, store: Activations, update: bool = True,
        batches: Iterable[int] | None = None,
    ) -> None:  # fmt: skip
        """Run ``layer`` over the cached batches (all by default); with ``update`` outputs replace inputs."""
        batches = list(range(len(store)) if batches is None else batches)
        with self.replaying(index, layer, [functools.partial(store.__getitem__, b) for b in batches]):
            for b in batches:
                out = self.run(index, layer, store[b])
                if update:
                    store[b] = out

    @torch.no_grad()
    def run(self, index: int, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``index`` (loaded) on ``hidden`` ``(batch, seq, hidden)``: its output hidden states."""
        hidden = hidden.to(self.device)
        out = layer(hidden, **self.layer_kwargs(hidden, index))
        return cast(torch.Tensor, out[0] if isinstance(out, tuple) else out)

    def experts_of(self, index: int) -> Resident | ExpertChunks:
        """The routed experts of loaded MoE layer ``index``: resident, or streamed from disk a chunk at a time."""
        return self._experts[index]

    @contextlib.contextmanager
    def replaying(
        self, index: int, layer: torch.nn.Module, inputs: Sequence[Callable[[], torch.Tensor]],
        around: Callable[[int], contextlib.AbstractContextManager[object]] | None = None,
    ) -> Iterator[None]:  # fmt: skip
        """Where layer ``index`` streams its experts, run it over ``inputs`` (each under ``around(k)``, if given)
        and sweep the experts' chunks once over all of them, so that runs of the layer within the context, over
        the same inputs in the same order, get its experts' outputs without reading them again (``chunks.py``).
        Elsewhere, and inside another such context, nothing is done."""
        experts = self._experts.get(index)
        if not isinstance(experts, ExpertChunks) or self._replaying:
            yield
            return

        def record() -> None:
            for k, hidden in enumerate(inputs):
                with around(k) if around is not None else contextlib.nullcontext():
                    self.run(index, layer, hidden())

        self._replaying = True
        try:
            with experts.replaying(record):
                yield
        finally:
            self._replaying = False

    def layer_kwargs(self, hidden: torch.Tensor, index: int) -> dict[str, Any]:
        """The call arguments (masks, rotary) of decoder layer ``index`` for the batch of hidden states ``hidden``:
        those captured for its number of sequences (and, where token sets of several lengths were embedded, as
        validation's beside calibration's, for its sequence length: dimension 1)."""
        by_length = self._kwargs[hidden.shape[0]]
        kwargs = next(iter(by_length.values())) if len(by_length) == 1 else by_length[hidden.shape[1]]
        return kwargs[index]

    @contextlib.contextmanager
    def loaded(self, index: int) -> Iterator[torch.nn.Module]:
        """Decoder layer ``index`` with its weights loaded, unloaded on exit (no read-ahead)."""
        layer = self._load_layer(index)
        try:
            yield layer
        finally:
            self._unload_layer(index, layer)

    def unload_embedding(self) -> None:
        """Drop the input embedding back to meta once ``embed`` has run (it is a vocab × hidden matrix)."""
        self.model.get_input_embeddings().to("meta")
        _release_memory(self._full_gc)

    def load_head(self) -> None:
        """Load what follows the decoder layers (final norm, ``lm_head``); a tied ``lm_head`` loads the embedding."""
        embedding = set(self._embedding_names())
        names = [n for n in self._outside_layers() if n not in embedding]
        self._load(names)
        head, embed = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if isinstance(head, torch.nn.Linear) and head.weight.is_meta:
            tied = sorted(embedding)
            self._load(tied)
            names += tied
            head.weight = embed.weight  # tie_word_embeddings: the checkpoint stores the matrix once
        check_finite(self.model, self.ckpt, names)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, len(positions), vocab)`` of the last layer's ``hidden`` ``(batch, seq, hidden)``.

        The model's own forward runs on ``inputs_embeds=hidden`` with every decoder layer stubbed to return
        ``hidden``, so the final norm, ``lm_head`` and any logit scaling are the model's code (the input
        embedding is not used); ``positions`` are passed as ``logits_to_keep``. Needs ``load_head`` first.
        """
        hidden = hidden.to(self.device)

        def stub(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return hidden

        for layer in self.decoder_layers:
            layer.forward = stub
        try:
            out = self.model(inputs_embeds=hidden, use_cache=False, logits_to_keep=positions.to(self.device))
        finally:
            for layer in self.decoder_layers:
                del layer.forward
        return cast(torch.Tensor, out.logits)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _load_layer(self, index: int) -> torch.nn.Module:
        """Decoder layer ``index`` with its weights loaded and checked finite; a MoE layer's routed experts are
        loaded too, or, with ``expert_chunk``, left on disk to be read a chunk at a time (``chunks.py``)."""
        names = self._layer_names(index)
        moe, parts = self._moe.get(index), self.parts.get(index)
        streamed = self._streamed(moe, parts) if moe is not None and parts is not None else None
        if streamed is not None:
            skip = expert_names(cast(MoeLayer, moe))
            names = [n for n in names if n not in skip]
        self._load(names)
        _release_memory(self._full_gc)  # the conversion's temporaries: cycles to collect, heap to hand back
        layer = self.decoder_layers[index]
        prefix = f"{self._decoder_name}{self._layers_attr}.{index}."
        check_finite(layer, self.ckpt, names, prefix=prefix, index=index, moe=moe)
        if parts is not None:
            e = self.layout.num_experts
            self._experts[index] = (
                Resident(parts.experts, e)
                if streamed is None
                else ExpertChunks(
                    parts.experts,
                    e,
                    self.expert_chunk or e,
                    lambda start, stop: self._fetched(streamed[0].chunk(start, stop)),
                    self._load_items,
                    f"layer {index}",
                    self.ranks,
                    streamed[1],
                )
            )
        return layer

    def _streamed(self, moe: MoeLayer, parts: MoeParts) -> tuple[ExpertTensors, list[str]] | None:
        """Where the layer's routed experts are to be read a chunk at a time: their tensors, and the parameters of
        the experts module they load into; else None."""
        if not (self.expert_chunk or self.ranks.world > 1) or moe.mtp or not takes_routing(parts.experts):
            return None
        e = self.layout.num_experts

        def dense(names: Iterable[str]) -> list[Item]:
            names = list(names)
            self.ckpt.fetch([n for n in names if n.endswith("weight_shape")])  # read to group a packed weight
            return dense_items(self.ckpt, names)

        tensors = expert_tensors(moe, e, dense)
        if tensors is None:
            return None
        params = self._expert_params(parts, tensors)
        for name in params:  # each must hold the experts along dim 0 (LongCat's under transformers 5.16 holds more
            param = parts.experts.get_parameter(name)  # rows than routed experts)
            if not param.dim() or param.shape[0] % e:
                return None
        return tensors, params

    def _expert_params(self, parts: MoeParts, tensors: ExpertTensors) -> list[str]:
        """The experts module's parameters (names below it) that the layer's routed-expert tensors load into: by
        the names of the dense weights (a quantised weight's scales load into nothing of their own)."""
        module = next(name for name, m in self.model.named_modules() if m is parts.experts)
        names = sorted({item.name for part in (*tensors.per_expert, tensors.fused) for item in part})
        targets = loaded_names(self.model, names).values()
        return sorted({t[len(module) + 1 :] for t in targets if t.startswith(f"{module}.")})

    def _fetched(self, items: list[Item]) -> list[Item]:
        """``items`` once their bytes are readable (a Hub source read in place downloads them now)."""
        if self.ckpt.fetcher is not None:
            infos = [i for item in items for i in ([item] if isinstance(item, TensorInfo) else item.parts.values())]
            self.ckpt.fetcher.fetch([(i.file, i.start, i.end) for i in infos])
        return items

    def _unload_layer(self, index: int, layer: torch.nn.Module, recycle: bool = False) -> None:
        """Drop layer ``index`` back to meta; with ``recycle`` (the next layer loads next), resident experts'
        memory is kept for the next MoE layer's experts to be written into (``_fuse``), not handed back to the
        kernel and faulted in again zeroed (which takes about as long as converting the weights)."""
        experts = self._experts.pop(index, None)
        if isinstance(experts, ExpertChunks):
            experts.release()
        elif recycle and experts is not None and index + 1 in self._moe:
            self._room = [p.data for p in experts.experts.parameters() if not p.is_meta]
        layer.to("meta")
        _release_memory(self._full_gc)

    def _warm(self, index: int) -> Future[None]:
        """Read layer ``index``'s bytes into the page cache in the background."""
        return self._pool.submit(_warm, self.ckpt, self._layer_names(index))

    def _layer_names(self, index: int) -> list[str]:
        head = f"{self.prefix}{self._stack}{index}."
        return [n for n in self.ckpt.tensors if n.startswith(head)]

    def _embedding_names(self) -> list[str]:
        """The on-disk tensors of the input embedding (``embed_tokens``, DBRX's ``wte``), by where they load."""
        embedding = self.model.get_input_embeddings()
        module = next(n for n, m in self.model.named_modules() if m is embedding)
        outside = self._outside_layers()
        return [n for n, target in loaded_names(self.model, outside).items() if target.startswith(f"{module}.")]

    def _before_layers_names(self) -> list[str]:
        """The input embedding's tensors and the decoder's other tensors outside its layers (norms, all small): its
        forward may use any of them before the first layer (Inkling under transformers 5.16 normalises the
        embeddings with ``embed_norm``, a sibling of ``embed_tokens``). The output head is outside the decoder."""
        own = loaded_names(self.model, self._outside_layers()).items()
        return sorted({*self._embedding_names(), *(n for n, target in own if target.startswith(self._decoder_name))})

    def _outside_layers(self) -> list[str]:
        return [n for n in self.ckpt.tensors if not n.startswith(f"{self.prefix}{self._stack}")]

    def _load(self, names: list[str]) -> None:
        """Load on-disk tensors ``names`` into the model. Quantised weights are dequantised as they are read
        (``dequant.py``). Per-expert tensors that transformers would stack into fused parameters are read into
        them one expert at a time (``fuse.py``); the rest go through transformers' conversion, unquantised ones
        as lazy slices, as ``from_pretrained`` does, so each is read only when converted."""
        self.ckpt.fetch(names)  # a Hub source read in place downloads them now (remote/store.py)
        room, self._room = self._room, []
        self._load_items(dense_items(self.ckpt, names), room)

    def _load_items(self, items: list[Item], room: list[torch.Tensor] | None = None) -> None:
        """Load dense ``items`` (on-disk tensors, quantised groups) into the model; see ``_load``. Fused parameters
        are written into tensors of ``room`` (memory of parameters just dropped) where one fits; the rest of
        ``room`` is freed before anything else loads."""
        room = [] if room is None else room
        fusions, rest = plan_fusions(self._load_config.weight_mapping or [], items)
        for fusion in fusions:
            if not self._fuse(fusion, room):
                rest += [item for part in fusion.parts for item in part]
        room.clear()
        if not rest:
            return
        with contextlib.ExitStack() as stack:
            stack.enter_context(no_progress_bars())  # stderr stays for our one-line messages
            reader = stack.enter_context(Reader())
            whole = [item for item in rest if self.ckpt.tensors.get(item.name) == item]  # as the file names it
            files = {f: stack.enter_context(safe_open(f, framework="pt")) for f in {item.file for item in whole}}
            state: dict[str, Any] = {item.name: Deferred(item, reader) for item in rest}
            state |= {item.name: files[item.file].get_slice(item.name) for item in whole}
            info = convert_and_load_state_dict_in_model(self.model, state, self._load_config)[0]
        errors = getattr(info, "conversion_errors", None) or info.mismatched_keys or info.unexpected_keys
        if errors:
            first = sorted(errors)[0]
            raise CheckpointError(f"transformers could not load {first} into the model; the checkpoint does not match")

    def _fuse(self, fusion: Fusion, room: list[torch.Tensor]) -> bool:
        """Build the fused parameter ``fusion.target`` in place (in a tensor of ``room`` of its shape, dtype and
        device, taken out of it, if there is one); False when the model has no such parameter."""
        owner, _, attr = fusion.target.rpartition(".")
        try:
            module = self.model.get_submodule(owner)
        except AttributeError:
            return False
        param = module._parameters.get(attr)
        if param is None or tuple(param.shape) != fused_shape(fusion):
            return False
        fits = [k for k, t in enumerate(room) if t.shape == param.shape and t.dtype == param.dtype]  # same device
        data = room.pop(fits[0]) if fits else torch.empty(param.shape, dtype=param.dtype, device=self.device)
        fill(fusion, data)
        module._parameters[attr] = torch.nn.Parameter(data, requires_grad=False)
        return True

    def _materialize_buffers(self) -> None:
        """Non-persistent buffers (rotary frequencies) are not in the checkpoint: compute them on the device."""
        modules = {}
        for key, buffer in self.model.named_non_persistent_buffers():
            owner, _, name = key.rpartition(".")
            module = self.model.get_submodule(owner)
            module.register_buffer(name, torch.empty_like(buffer, device=self.device), persistent=False)
            modules[owner] = module
        with torch.no_grad():
            for module in modules.values():
                self.model._init_weights(module)

    def _capture_layer_kwargs(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """The first layer's input for ``ids`` and each layer's keyword arguments, from the model's own forward."""
        try:
            return layer_inputs(self.decoder, ids)
        except LayerProtocolError as e:
            raise calibration_refused(self.layout.family.name, str(e)) from e


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers draws a "Loading weights" bar per load; a layer-by-layer run would draw hundreds."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


FULL_COLLECTION_BYTES = 64 * 2**20  # layers at least this big get a full garbage collection after each use


def _release_memory(full: bool = True) -> None:
    """Collect garbage and give freed heap back to the OS (glibc keeps it otherwise, and RSS would grow). A full
    collection walks every object of torch and transformers (~0.2 s); for small layers the young generations,
    where a load's temporaries are, suffice."""
    gc.collect() if full else gc.collect(1)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (see ``stub.decoder_of``)."""
    decoder = find_decoder(model)
    if decoder is None:
        raise CheckpointError(f"cannot find the decoder layers of {type(model).__name__}")
    return decoder


def meta_model(root: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> Any:
    """The model of the checkpoint in ``root``, built from its config on the meta device (no memory), in eval mode."""
    from moeslim.stream.build import model_class

    config = _config(root, trust_remote_code)
    cls = model_class(config)
    with torch.device("meta"):
        if cls is AutoModelForCausalLM:
            model = cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            model = cls._from_config(config, dtype=dtype)
    return model.eval()


def _config(root: Path, trust_remote_code: bool) -> Any:
    try:
        return AutoConfig.from_pretrained(root, trust_remote_code=trust_remote_code)
    except ValueError as e:  # unknown model_type without remote code
        raise CheckpointError(
            f"transformers does not know this model's architecture ({e}); calibration runs the model's code,"
            " pass --trust-remote-code if you trust it, or use a data-free --criterion"
        ) from e


def _warm(ckpt: Checkpoint, names: list[str]) -> None:
    """Read the bytes of ``names`` once so the next load comes from the page cache (no memory kept)."""
    ckpt.fetch(names)  # a Hub source read in place downloads the next layer while this one runs
    buffer = memoryview(bytearray(READ_CHUNK))
    for file, start, end in sorted((ckpt.tensors[n].file, ckpt.tensors[n].start, ckpt.tensors[n].end) for n in names):
        fd = os.open(file, os.O_RDONLY)
        try:
            while start < end:
                start += os.preadv(fd, [buffer[: min(READ_CHUNK, end - start)]], start) or end
        finally:
            os.close(fd)


def load_on_meta(ckpt: Checkpoint, names: list[str], trust_remote_code: bool = False) -> tuple[Any, Any, int]:
    """The checkpoint's model on the meta device with tensors ``names`` (quantised ones at their dequantised names
    and shapes) fed through transformers' loading conversion as meta tensors of their header shapes: no weight is
    read. Returns the model, transformers' loading report (missing, unexpected, mismatched keys, conversion
    errors) and the number of tensors fed."""
    model = meta_model(ckpt.root, torch.float32, trust_remote_code)
    state = {
        item.name: torch.empty(item.shape, dtype=TORCH_DTYPES.get(item.dtype, torch.uint8), device="meta")
        for item in dense_items(ckpt, names)
    }
    config = LoadStateDictConfig(
        device_map={"": "meta"},
        dtype=torch.float32,
        weight_mapping=get_model_conversion_mapping(model),  # type: ignore[arg-type]
    )
    with no_progress_bars():
        info = convert_and_load_state_dict_in_model(model, state, config)[0]
    return model, info, len(state)
