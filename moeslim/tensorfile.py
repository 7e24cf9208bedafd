"""safetensors files that moeslim writes from tensors in memory: the correction's patches and calibration's resume
boundaries.

Written by Python through ``safefs.write_atomic`` rather than by safetensors' own writer: a failed write (a full
disk) is then an ``OSError`` naming the file and its error number, which the CLI says in one line, the previous
file stays whole and no partial file is left; and each tensor's bytes go to the file as they lie in memory,
never copied whole into one buffer (a layer's corrected experts are gigabytes at real widths).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moeslim.safefs import write_all, write_atomic
from moeslim.stream.dequant import TORCH_DTYPES

_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
# safetensors' own order of its dtypes: its writer puts the tensors of a later dtype first, then by name; kept so
# that a file written here is byte for byte the one ``safetensors.torch.save_file`` writes (the plan records the
# sha256 of the correction's patches)
_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
          "F64", "I64", "U64")  # fmt: skip


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (any device, dtype in ``TORCH_DTYPES``) to ``path`` as one safetensors file, in one step."""
    names = sorted(tensors, key=lambda n: (-_ORDER.index(_NAMES[tensors[n].dtype]), n))
    flat = {name: tensors[name].detach().to("cpu").contiguous().reshape(-1) for name in names}
    header = _header({name: (_NAMES[t.dtype], list(tensors[name].shape), t.nbytes) for name, t in flat.items()},
                     metadata)  # fmt: skip

    def write(fd: int) -> None:
        write_all(fd, header)
        for t in flat.values():
            if t.numel():
                write_all(fd, t.view(torch.uint8).numpy().data)

    write_atomic(path, write)


def _header(entries: dict[str, tuple[str, list[int], int]], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces so the data starts 8-byte aligned; the tensors'
    bytes follow in the order given."""
    doc: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape, nbytes) in entries.items():
        doc[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw
