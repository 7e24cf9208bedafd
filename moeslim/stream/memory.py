"""Memory before any work: a pass holds one decoder layer (in the compute dtype, plus what loading converts
beside it), or its resident part and a chunk of its routed experts, and the hidden states. One plan per pass
(``plan_memory``) spends one budget (``--max-memory``, else what this process may allocate) on both: whole layers
or chunks, and how many bytes of hidden states stay in RAM before the rest spill to disk. A pass that cannot fit
is refused in one line, with what it needs, before a byte of weights is read. Running out anyway (another process
took the memory) is one line too (``out_of_memory``).
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from moeslim.errors import DeviceError
from moeslim.layout import Layout, decoder_layer_of
from moeslim.quant import DROPPED_WHEN_DENSE, packed_codes
from moeslim.source import Checkpoint
from moeslim.units import human_bytes

#: a loaded layer's peak over its final form: each weight is written once into its place (``dequant.dense_into``), so
#: little is held beside it; measured 1.02 × for bf16 layers whole and in chunks and 1.05 × for FP8 chunks at real
#: widths (benchmarks/README.md, load rates), with a margin for what loading allocates transiently
LOAD_FACTOR = 1.1
BASE_BYTES = 400 * 2**20  # Python, torch and transformers imported: ~365 MiB measured
#: routed experts streamed from disk are read about this many bytes at a time: a chunk's overhead is one experts
#: call per recorded call, so small chunks cost little time and keep memory near the layer's resident part
CHUNK_BYTES = 2**30
#: address space glibc reserves for a thread's malloc arena (HEAP_MAX_SIZE on 64-bit): it counts under ``ulimit -v``
ARENA_BYTES = 64 * 2**20
#: hidden-state batches in RAM whatever the bound: the one being run (read back from disk when spilled), its output
WORKING_BATCHES = 2
#: a chunked layer's copies of one stream that stay in RAM: its experts' recorded inputs and their outputs
RECORDED = 2


def layer_bytes(ckpt: Checkpoint, layout: Layout, element_size: int) -> tuple[int, int]:
    """``(decoder layer, its bytes)`` of the largest decoder layer once loaded in a dtype of ``element_size``
    bytes, from the headers: quantised tensors count at their dense size (a packed int4 or FP8 weight becomes a
    ``element_size``-byte tensor of its unpacked shape; their scales are not kept)."""
    sizes: dict[int, int] = {}
    codes = packed_codes(ckpt.config)
    for name, info in ckpt.tensors.items():
        index = decoder_layer_of(name, layout.family.layers_name)
        if index is None:
            continue
        sizes[index] = sizes.get(index, 0) + _dense_elements(name, info.shape, info.dtype, codes) * element_size
    if not sizes:
        return 0, 0
    index = max(sizes, key=lambda i: (sizes[i], -i))
    return index, sizes[index]


def _dense_elements(name: str, shape: tuple[int, ...], dtype: str, codes: dict[str, dict[str, int]]) -> int:
    """Elements of the dense tensor an on-disk tensor stands for: packed codes unpack (``codes``, the checkpoint's
    ``packed_codes``: int4 in I32 × 8, int8 × 4; MXFP4 blocks in U8: × 2), scales and other companions are dropped
    once dequantised."""
    if name.endswith(DROPPED_WHEN_DENSE):
        return 0
    per = next((kinds.get(dtype, 1) for suffix, kinds in codes.items() if name.endswith(suffix)), 1)
    return math.prod(shape) * per


def available_bytes() -> int | None:
    """What this process may still allocate: the least of the machine's available memory, its control group's
    room and its address-space limit (``ulimit -v``); None where none of them can be read."""
    bounds = [b for b in (_meminfo_available(), _cgroup_room(), _address_space_room()) if b is not None]
    return min(bounds) if bounds else None


def _meminfo_available() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def _cgroup_room() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def _address_space_room() -> int | None:
    """Room under ``ulimit -v`` (which counts address space, not memory used), less what the threads a pass starts
    will reserve (``threads_address_space``)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        size = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
    return max(0, soft - size - threads_address_space())


def threads_address_space() -> int:
    """Address space the threads of a pass reserve: each its stack (``ulimit -s``) and a malloc arena of glibc's
    ``ARENA_BYTES``, for transformers' loading pool (up to 4), torch's one per core, and the read-ahead. Measured on
    2 cores: 405 MB more address space at the end of a calibration of a 2 MB fixture than when it planned, for
    this estimate's 377 MB; without it a run under ``ulimit -v`` planned whole layers and died starting a thread."""
    import resource

    stack, _ = resource.getrlimit(resource.RLIMIT_STACK)
    stack = 8 * 2**20 if stack == resource.RLIM_INFINITY else stack
    cores = os.cpu_count() or 1
    return (min(4, cores) + cores + 1) * (stack + ARENA_BYTES)


@dataclass(frozen=True)
class LayerSplit:
    """A decoder layer's bytes once loaded: ``resident`` (all but the routed experts) and ``per_expert`` (one routed
    expert's share of them), each the largest over the checkpoint's layers; ``experts`` routed experts a layer;
    ``outside`` what is loaded of the tensors outside the decoder layers (input embedding, or final norm and output
    head) while no layer is."""

    index: int
    whole: int
    resident: int
    per_expert: int
    experts: int
    outside: int = 0


def layer_split(ckpt: Checkpoint, layout: Layout, element_size: int) -> LayerSplit:
    """The largest decoder layer and how it divides into what stays resident and its routed experts (the largest
    expert: a fused tensor counts 1/E of its bytes to each)."""
    index, whole = layer_bytes(ckpt, layout, element_size)
    codes = packed_codes(ckpt.config)

    def dense(name: str) -> int:
        info = ckpt.tensors[name]
        return _dense_elements(name, info.shape, info.dtype, codes) * element_size

    e = max(1, layout.num_experts)
    experts: set[str] = set()
    per_expert = 0
    for layer in layout.layers:
        if layer.mtp:
            continue
        fused = sum(dense(n) for n in layer.fused) // e
        largest = max((sum(dense(n) for n in names) for names in layer.per_expert), default=0)
        per_expert = max(per_expert, fused + largest)
        experts |= set(layer.fused) | {n for names in layer.per_expert for n in names}
    resident: dict[int, int] = {}
    outside: list[int] = []
    for name in ckpt.tensors:
        i = decoder_layer_of(name, layout.family.layers_name)
        if i is None:
            outside.append(dense(name))
        elif name not in experts:
            resident[i] = resident.get(i, 0) + dense(name)
    return LayerSplit(index, whole, max(resident.values(), default=0), per_expert, e, _between(outside))


def _between(sizes: list[int]) -> int:
    """Bytes of the tensors outside the layers in memory at once: the input embedding and an untied output head,
    both (vocab, hidden), are loaded at different times (the embedding is dropped once the tokens are embedded), so
    the largest counts once and its twins not at all; the rest (norms) count whole."""
    largest = max(sizes, default=0)
    return largest + sum(size for size in sizes if size < largest)


@dataclass(frozen=True)
class States:
    """The hidden states a pass holds: ``total`` bytes of one stream (every calibration batch), ``batch`` bytes of
    one batch, ``streams`` streams at once (validation: the original's and the pruned model's), and whether the
    store may ``spill`` to disk past a bound (calibration and correction do; validation's streams stay in RAM)."""

    total: int
    batch: int
    streams: int = 1
    spill: bool = True


@dataclass(frozen=True)
class MemoryPlan:
    """How a pass spends its budget: ``chunk`` routed experts read at a time (None: whole layers) and
    ``spill_after`` bytes of hidden states kept in RAM before the rest go to disk (None: no bound)."""

    chunk: int | None
    spill_after: int | None


@dataclass(frozen=True)
class Budget:
    """What a pass may spend on weights and hidden states: ``room`` bytes (None: unknown, no bound), from
    ``--max-memory`` where ``max_memory`` (its value, the whole process) is given."""

    room: int | None
    max_memory: int | None = None


def budget(max_memory: int | None) -> Budget:
    """The budget of a pass: ``--max-memory`` (the whole process) less the imports' ``BASE_BYTES``, else what this
    process may still allocate (``available_bytes``: the imports already hold theirs). A ``--max-memory`` above
    what the process may allocate is lowered to it, with a note: a plan for memory that is not there would die
    mid-run, the failure this plan exists to avoid, while a refusal would stop runs that fit in what is there
    (the lower budget only chunks or spills more)."""
    room = available_bytes()
    if max_memory is None:
        return Budget(room)
    asked = max(0, max_memory - BASE_BYTES)
    if room is not None and asked > room:
        print(
            f"moeslim: note: --max-memory {human_bytes(max_memory)} is more than this process may allocate"
            f" ({human_bytes(room + BASE_BYTES)} with its imports); planning for that",
            file=sys.stderr,
        )
        return Budget(room, max_memory)
    return Budget(asked, max_memory)


def needs(split: LayerSplit, states: States, chunk: int | None) -> int:
    """The least budget for a pass of whole layers (``chunk`` None) or of ``chunk`` routed experts at a time, with
    every spillable hidden state spilled. Whatever the bound, ``WORKING_BATCHES`` batches are in RAM (the one being
    run, read back from disk when spilled, and its output). A chunked layer also holds ``RECORDED`` copies of one
    stream (``chunks.py``: its experts' recorded inputs and their outputs, for every batch), which cannot spill."""
    return max(_weights(split, chunk), _outside(split, states)) + _held(states, chunk is not None)


def _held(states: States, chunked: bool) -> int:
    """Bytes of hidden states in RAM whatever the bound."""
    recorded = RECORDED * states.total if chunked else 0
    return WORKING_BATCHES * states.batch + recorded + (0 if states.spill else states.streams * states.total)


def _weights(split: LayerSplit, chunk: int | None) -> int:
    """Bytes of weights in use: the whole layer, or its resident part and ``chunk`` routed experts."""
    if chunk is None:
        return int(split.whole * LOAD_FACTOR)
    return int(split.resident * LOAD_FACTOR) + min(chunk, split.experts) * _per_expert(split)


def _outside(split: LayerSplit, states: States) -> int:
    """Bytes of the embedding or head in use, between the layers: each stream is a model's, and validation loads
    both models' heads at once (measured: a calibration given --max-memory 0.5GB beside a 205 MB embedding peaked
    at 684 MB before this counted)."""
    return int(split.outside * LOAD_FACTOR) * states.streams


def plan_memory(split: LayerSplit, states: States, budget: Budget, dtype: str, chunk: int | None = None) -> MemoryPlan:
    """One pass's plan within ``budget`` for weights and hidden states together. The policy:

    1. whole layers when the largest layer (× ``LOAD_FACTOR``) and the working batches fit; the hidden states
       stay in RAM up to what is left, the rest spill. Whole layers come first even when most hidden states then
       spill: results are bit-identical to an unbounded run, and spilling costs one sequential write and read of
       the hidden states per layer. Chunking would not spare that I/O where it matters: a chunked layer holds
       its hidden states twice over (``needs``), so it keeps them all in RAM only where the routed experts
       outweigh the hidden states by more than two to one, and there the spilled bytes are under half of the
       layer's own bytes, read from disk anyway;
    2. else routed experts in chunks: as many as fit beside the layer's resident part and the recorded hidden
       states, at most all of them and about ``CHUNK_BYTES`` at a time; the store gets what is left;
    3. else refused in one line, before any work: the memory it needs and what to pass.

    ``chunk`` (or ``MOESLIM_EXPERT_CHUNK``) forces a chunk size, refused likewise where it does not fit. With
    an unknown budget (nothing could be read) whole layers run with the hidden states unbounded."""
    if chunk is None and (forced := os.environ.get("MOESLIM_EXPERT_CHUNK", "").strip()):
        chunk = _positive(forced)
    room = budget.room
    if room is None:
        return MemoryPlan(chunk, None)
    if chunk is None and needs(split, states, None) <= room:
        return _plan(split, states, room, None)
    if chunk is None:
        per, free = _per_expert(split), room - _held(states, True)
        fits = (free - _weights(split, 0)) // per if split.per_expert and _outside(split, states) <= free else 0
        chunk = int(min(fits, split.experts, max(1, CHUNK_BYTES // per))) if fits >= 1 else None
    if chunk is None or needs(split, states, chunk) > room:
        raise _refusal(split, states, budget, dtype, chunk or 1)
    return _plan(split, states, room, chunk)


def plan_pass(
    ckpt: Checkpoint, layout: Layout, element_size: int, dtype: str, states: States, max_memory: int | None = None
) -> MemoryPlan:
    """The memory plan of one pass over ``ckpt`` in a dtype of ``element_size`` bytes (named ``dtype``): its largest
    decoder layer planned within ``budget(max_memory)``."""
    return plan_memory(layer_split(ckpt, layout, element_size), states, budget(max_memory), dtype)


def _plan(split: LayerSplit, states: States, room: int, chunk: int | None) -> MemoryPlan:
    return MemoryPlan(chunk, room - needs(split, states, chunk) if states.spill else None)


def _per_expert(split: LayerSplit) -> int:
    return max(1, int(split.per_expert * LOAD_FACTOR))


def _refusal(split: LayerSplit, states: States, budget: Budget, dtype: str, chunk: int) -> DeviceError:
    """The one line for a pass that does not fit: what it needs, against ``--max-memory`` (both with the imports'
    ``BASE_BYTES``) or against what this process may still allocate, and what to do: raise ``--max-memory`` where
    the machine has the memory, else hold less."""
    need, free = needs(split, states, chunk), available_bytes()
    weights = max(_weights(split, chunk), _outside(split, states))
    many = "one" if chunk == 1 else chunk
    if _weights(split, chunk) >= _outside(split, states):
        subject, why = f"decoder layer {split.index} needs", f"its routed experts read {many} at a time: "
    else:
        subject, why = (
            "the input embedding or output head needs",
            f"more than the layer with {many} of its experts at a time: ",
        )
    what = f"{why}{human_bytes(weights)} of weights, {human_bytes(need - weights)} of hidden states"
    if budget.max_memory is None:
        head = f"about {human_bytes(need)} in {dtype} ({what}) beside Python and torch"
        limit = f"this process may allocate {human_bytes(budget.room or 0)} more"
    else:
        what += f", {human_bytes(BASE_BYTES)} for Python and torch"
        head = f"about {human_bytes(need + BASE_BYTES)} in {dtype} ({what})"
        limit = f"--max-memory is {human_bytes(budget.max_memory)}"
    if budget.max_memory is not None and (free is None or need <= free):
        fixes = [f"pass --max-memory {math.ceil((need + BASE_BYTES) / 1e7) / 100:.2f}GB or more"]
    else:
        fixes = ["pass --dtype bfloat16 (half the memory)"] if dtype == "float32" else []
        if need - weights > 0.1 * need:
            fixes.append("fewer --samples or a shorter --seq-len")
        fixes.append(
            f"{'or ' if fixes else ''}run with more memory (a higher ulimit -v or cgroup limit, or a larger machine)"
        )
    return DeviceError(f"{subject} {head}, and {limit}; {', '.join(fixes)}")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise DeviceError(f"MOESLIM_EXPERT_CHUNK={text!r} is not a whole number of experts of 1 or more; unset it")
    return int(text)


def out_of_memory(where: str = "") -> DeviceError:
    """The one line for an allocation that failed while running (``MemoryError``, torch's allocator, a thread
    that could not start), ``where`` it happened if known."""
    return DeviceError(
        f"out of memory{' ' + where if where else ''}; free memory, pass --dtype bfloat16, a lower --batch-size or"
        " --max-memory, or run with more memory (a higher ulimit -v or cgroup limit, or a larger machine)"
    )


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation: Python's, torch's CPU or CUDA allocator's, a thread's stack and
    arena, or the mapping of a library being imported (the last two: what fails first under ``ulimit -v``)."""
    if isinstance(error, MemoryError):
        return True
    text = str(error)
    if isinstance(error, ImportError):
        return "failed to map segment" in text
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("can't allocate memory", "out of memory", "can't start new thread")
    )
