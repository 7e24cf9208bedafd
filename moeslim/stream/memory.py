"""Memory before any work: a pass holds one decoder layer (in the compute dtype, plus what loading converts
beside it) and the hidden states; a layer that cannot fit in the memory this process may use is refused in one
line, with what it needs, before a byte of weights is read. Running out anyway (another process took the memory)
is one line too (``out_of_memory``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from moeslim.errors import DeviceError
from moeslim.layout import Layout, decoder_layer_of
from moeslim.quant import DROPPED_WHEN_DENSE, packed_codes
from moeslim.source import Checkpoint

#: loading converts a layer beside its final form (fused experts, dequantised copies); measured 1.3 × a layer at
#: OLMoE's widths (benchmarks/README.md, "Calibration: streaming against an in-memory forward")
LOAD_FACTOR = 1.3
BASE_BYTES = 400 * 2**20  # Python, torch and transformers imported: ~365 MiB measured
GB = 1e9
#: routed experts streamed from disk are read about this many bytes at a time: a chunk's overhead is one experts
#: call per recorded call, so small chunks cost little time and keep memory near the layer's resident part
CHUNK_BYTES = 2**30


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
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        size = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
    return max(0, soft - size)


@dataclass(frozen=True)
class LayerSplit:
    """A decoder layer's bytes once loaded: ``resident`` (all but the routed experts) and ``per_expert`` (one routed
    expert's share of them), each the largest over the checkpoint's layers; ``experts`` routed experts a layer."""

    index: int
    whole: int
    resident: int
    per_expert: int
    experts: int


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
    for name in ckpt.tensors:
        i = decoder_layer_of(name, layout.family.layers_name)
        if i is not None and name not in experts:
            resident[i] = resident.get(i, 0) + dense(name)
    return LayerSplit(index, whole, max(resident.values(), default=0), per_expert, e)


def check_fits(
    ckpt: Checkpoint, layout: Layout, element_size: int, hidden_bytes: int, dtype: str, chunk: int | None = None
) -> int | None:
    """How many routed experts a pass reads at a time: None for whole layers, where the largest decoder layer
    (× ``LOAD_FACTOR``) and ``hidden_bytes`` of hidden states fit in what this process may allocate, else the most
    that fit beside the layer's resident part (its experts' inputs and outputs held too: three times the hidden
    states). ``chunk`` (``MOESLIM_EXPERT_CHUNK``) forces a size. A layer that cannot fit one expert at a time is
    refused in one line, before any work, with the memory it needs."""
    if chunk is None and (forced := os.environ.get("MOESLIM_EXPERT_CHUNK", "").strip()):
        chunk = _positive(forced)
    split = layer_split(ckpt, layout, element_size)
    room = available_bytes()
    whole = int(split.whole * LOAD_FACTOR) + hidden_bytes + BASE_BYTES
    if chunk is not None or room is None or whole <= room + BASE_BYTES:  # room excludes the imports, already here
        return chunk
    fixed = int(split.resident * LOAD_FACTOR) + 3 * hidden_bytes
    per = max(1, int(split.per_expert * LOAD_FACTOR))
    fits = (room - fixed) // per if split.per_expert else 0
    if fits >= 1:
        return int(min(fits, split.experts, max(1, CHUNK_BYTES // per)))
    needed = fixed + per + BASE_BYTES
    fixes = [" pass --dtype bfloat16 (half the memory)"] if element_size > 2 else []
    if 3 * hidden_bytes > 0.1 * needed:
        fixes.append(" lower --max-memory (hidden states past it go to disk) or --samples")
    weights = (split.resident + split.per_expert) / GB
    raise DeviceError(
        f"decoder layer {split.index} needs about {needed / GB:.2f} GB in {dtype} ({weights:.2f} GB of weights with"
        f" its routed experts read one at a time, plus {3 * hidden_bytes / GB:.2f} GB of hidden states), and this"
        f" process may use {room / GB:.2f} GB;{','.join(fixes)}{', or' if fixes else ''} run on a machine with more"
        " memory"
    )


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise DeviceError(f"MOESLIM_EXPERT_CHUNK={text!r} is not a whole number of experts of 1 or more; unset it")
    return int(text)


def out_of_memory(where: str) -> DeviceError:
    """The one line for an allocation that failed while running (``MemoryError``, torch's allocator)."""
    return DeviceError(
        f"out of memory {where}; free memory, pass --dtype bfloat16, a lower --batch-size or --max-memory,"
        " or run on a machine with more memory"
    )


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation: Python's, or torch's CPU or CUDA allocator's."""
    if isinstance(error, MemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)
