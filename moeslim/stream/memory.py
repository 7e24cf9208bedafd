"""Memory before any work: a pass holds one decoder layer (in the compute dtype, plus what loading converts
beside it) and the hidden states; a layer that cannot fit in the memory this process may use is refused in one
line, with what it needs, before a byte of weights is read. Running out anyway (another process took the memory)
is one line too (``out_of_memory``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from moeslim.errors import DeviceError
from moeslim.layout import Layout, decoder_layer_of
from moeslim.quant import DROPPED_WHEN_DENSE, PACKED_CODES
from moeslim.source import Checkpoint

#: loading converts a layer beside its final form (fused experts, dequantised copies); measured 1.3 × a layer at
#: OLMoE's widths (benchmarks/README.md, "Calibration: streaming against an in-memory forward")
LOAD_FACTOR = 1.3
BASE_BYTES = 400 * 2**20  # Python, torch and transformers imported: ~365 MiB measured
GB = 1e9


def layer_bytes(ckpt: Checkpoint, layout: Layout, element_size: int) -> tuple[int, int]:
    """``(decoder layer, its bytes)`` of the largest decoder layer once loaded in a dtype of ``element_size``
    bytes, from the headers: quantised tensors count at their dense size (a packed int4 or FP8 weight becomes a
    ``element_size``-byte tensor of its unpacked shape; their scales are not kept)."""
    sizes: dict[int, int] = {}
    for name, info in ckpt.tensors.items():
        index = decoder_layer_of(name, layout.family.layers_name)
        if index is None:
            continue
        sizes[index] = sizes.get(index, 0) + _dense_elements(name, info.shape, info.dtype) * element_size
    if not sizes:
        return 0, 0
    index = max(sizes, key=lambda i: (sizes[i], -i))
    return index, sizes[index]


def _dense_elements(name: str, shape: tuple[int, ...], dtype: str) -> int:
    """Elements of the dense tensor an on-disk tensor stands for: packed codes unpack (int4 in I32: × 8; MXFP4
    blocks in U8: × 2), scales and other companions are dropped once dequantised."""
    if name.endswith(DROPPED_WHEN_DENSE):
        return 0
    per = next((kinds.get(dtype, 1) for suffix, kinds in PACKED_CODES.items() if name.endswith(suffix)), 1)
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


def check_fits(ckpt: Checkpoint, layout: Layout, element_size: int, hidden_bytes: int, dtype: str) -> None:
    """Refuse, before any work, a pass whose largest decoder layer (× ``LOAD_FACTOR``) and ``hidden_bytes`` of
    hidden states cannot fit in what this process may allocate."""
    room = available_bytes()
    index, size = layer_bytes(ckpt, layout, element_size)
    needed = int(size * LOAD_FACTOR) + hidden_bytes + BASE_BYTES
    if room is None or needed <= room + BASE_BYTES:  # the imports are already in memory: room excludes them
        return
    fixes = [" pass --dtype bfloat16 (half the memory)"] if element_size > 2 else []
    if hidden_bytes > 0.1 * needed:
        fixes.append(" lower --max-memory (hidden states past it go to disk) or --samples")
    raise DeviceError(
        f"decoder layer {index} needs about {needed / GB:.2f} GB in {dtype} ({size / GB:.2f} GB of weights, loaded"
        f" one layer at a time, plus {hidden_bytes / GB:.2f} GB of hidden states), and this process may use"
        f" {room / GB:.2f} GB;{','.join(fixes)}{', or' if fixes else ''} run on a machine with more memory"
    )


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
