"""Quantised checkpoints seen as the dense tensors they stand for, each computed when it is loaded.

Calibration and validation run the model's own transformers code on dense weights in the compute dtype. A
quantised weight is stored as several on-disk tensors (the codes and their scales); here each such group is one
``Packed`` item named as the unquantised checkpoint would name the weight, with its dense shape, and dequantised
only when the layer that holds it is loaded (one tensor at a time: memory stays one dense layer). Surgery never
comes here: it copies the quantised bytes as they are.

Formats:

- ``fp8`` (DeepSeek-V3, Qwen3-FP8, GLM-4.x-FP8): ``P.weight`` (float8) and ``P.weight_scale_inv`` (float32, one
  value per ``weight_block_size`` block, ceil-divided; a single value when the config names no block):
  ``weight = float(fp8) * scale_inv`` of its block.
- ``mxfp4`` (gpt-oss): fused ``P_blocks`` (uint8 ``[E, rows, G, 16]``, two FP4 codes per byte) and ``P_scales``
  (uint8 E8M0 exponents ``[E, rows, G]``), dequantised by transformers' own ``convert_moe_packed_tensors`` into
  ``P`` ``[E, 32·G, rows]``, an expert at a time.
- ``compressed-tensors`` ``pack-quantized`` (int4/int8 w4a16 releases): ``P.weight_packed`` (int32, ``32/bits``
  codes per word, low bits first, offset by ``2^(bits-1)``), ``P.weight_scale`` (per group of columns, per row or
  per tensor), ``P.weight_shape`` and, when asymmetric, ``P.weight_zero_point`` (packed along rows):
  ``weight = (code - zero) * scale``, computed in the scale's dtype as compressed-tensors does.
- ``compressed-tensors`` ``float-quantized`` / ``int-quantized`` / ``naive-quantized`` (FP8-dynamic and int8
  releases, the FP8 half of mixed ones): ``P.weight`` (float8 or int8 codes) and ``P.weight_scale`` (per tensor,
  row, group of columns or ``block_structure`` block), with the same arithmetic.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from moeslim.errors import CheckpointError
from moeslim.quant import (
    COMPANIONS,
    FP8_EXTRA,
    PACKED_PARTS,
    READABLE,
    SCALED_PARTS,
    quantization_config,
    unreadable,
)
from moeslim.shards import TensorInfo
from moeslim.source import Checkpoint
from moeslim.stream.packs import AWQ, GPTQ, NVFP4, int_group, nvfp4_group, pack_dense

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip

FP8, MXFP4, PACKED, SCALED = "fp8", "mxfp4", "compressed-tensors", "compressed-tensors-scaled"
PACKS = (NVFP4, GPTQ, AWQ)  # formats whose arithmetic is in packs.py (NVFP4: quant_method "modelopt")


@dataclass(frozen=True)
class Packed:
    """A dense weight stored quantised: the name and shape it has unquantised, and the on-disk tensors it is
    computed from (``parts``, by role: ``"codes"``, ``"scales"``, ``"shape"``, ``"zeros"``)."""

    name: str
    shape: tuple[int, ...]
    method: str
    parts: dict[str, TensorInfo]
    sources: tuple[str, ...]  # every on-disk tensor this item stands for (companions read past included)
    block: tuple[int, ...] = ()  # FP8: rows × columns per scale; packed: bits per code
    dtype: str = "F32"  # of what ``Reader.dense`` returns: float32, or a packed weight's scale dtype


Item = TensorInfo | Packed


class Reader:
    """Reads on-disk tensors with ``pread`` into fresh memory (not a memory map: the file's pages are not counted
    in RSS), and dense weights from their quantised parts. Close it (or use it as a context manager)."""

    def __init__(self) -> None:
        self._fds: dict[object, int] = {}
        self._scratch: torch.Tensor | None = None  # int16 room for FP8 decoding, reused from weight to weight

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def raw(self, info: TensorInfo, row: int | None = None) -> torch.Tensor:
        """The on-disk tensor ``info`` as stored, or only its ``row`` along dim 0."""
        if row is not None:
            size = info.nbytes // info.shape[0]
            start = info.start + row * size
            info = TensorInfo(info.name, info.file, info.dtype, info.shape[1:], start, start + size)
        return read(self._fd(info.file), info)

    def _fd(self, file: str | os.PathLike[str]) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def dense_into(self, item: Item, out: torch.Tensor) -> None:
        """Write ``item`` dense into ``out`` (its shape, any floating dtype): the values ``dense`` gives, converted
        to ``out``'s dtype, without a dense copy on the way where it can (an unquantised tensor is converted
        straight from the file's pages; an FP8 weight into a float32 ``out`` is decoded and scaled in place)."""
        if isinstance(item, TensorInfo):
            self._convert(item, out)
        elif item.method == FP8 and out.dtype == torch.float32 and out.is_contiguous() and out.device.type == "cpu":
            with self._mapped(item.parts["codes"]) as codes:
                self._scratch = fp8_into(codes, self.raw(item.parts["scales"]), item.block, out, self._scratch)
        else:
            out.copy_(self.dense(item))

    def _convert(self, info: TensorInfo, out: torch.Tensor) -> None:
        """``out.copy_`` of the on-disk tensor ``info``, read from a private map of its bytes."""
        with self._mapped(info) as source:
            out.copy_(source)

    @contextlib.contextmanager
    def _mapped(self, info: TensorInfo) -> Iterator[torch.Tensor]:
        """The on-disk tensor ``info`` over a private map of the file's pages (no copy into fresh memory, and the
        pages counted in RSS only while mapped). The tensor must not outlive the context (the map is closed)."""
        if info.dtype not in TORCH_DTYPES:
            raise CheckpointError(f"{info.name} is stored as {info.dtype}, which calibration cannot read")
        dtype = TORCH_DTYPES[info.dtype]
        if not info.nbytes:
            yield torch.empty(info.shape, dtype=dtype)
            return
        fd = self._fd(info.file)
        if os.fstat(fd).st_size < info.end:
            raise OSError(f"{info.file} ends inside tensor {info.name}")
        start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(fd, info.end - start, offset=start, access=mmap.ACCESS_COPY) as pages:
            count = info.nbytes // dtype.itemsize
            tensor = torch.frombuffer(pages, dtype=dtype, offset=info.start - start, count=count).view(info.shape)
            try:
                yield tensor
            finally:
                del tensor  # the map can close only once no tensor exports it

    def dense(self, item: Item, expert: int | None = None) -> torch.Tensor:
        """``item`` as a dense tensor (float32, or the scales' dtype for packed integers); with ``expert``, only
        that expert's slice of a fused tensor."""
        if isinstance(item, TensorInfo):
            return self.raw(item, expert)
        if item.method == MXFP4:
            return self._mxfp4(item, expert)
        if item.method in PACKS:
            dense = pack_dense(item.method, item.shape, item.block, {r: self.raw(i) for r, i in item.parts.items()},
                               item.name)  # fmt: skip
            return dense if expert is None else dense[expert]
        codes, scales = self.raw(item.parts["codes"]), self.raw(item.parts["scales"])
        zeros = self.raw(item.parts["zeros"]) if "zeros" in item.parts else None
        if item.method == FP8:
            dense = fp8_dense(codes, scales, item.block)
        elif item.method == SCALED:
            dense = scaled_dense(codes, scales, zeros, item.block)
        else:
            dense = packed_dense(codes, scales, item.shape, item.block[0], zeros)
        return dense if expert is None else dense[expert]

    def _mxfp4(self, item: Packed, expert: int | None) -> torch.Tensor:
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        experts = range(item.shape[0]) if expert is None else [expert]
        out = torch.empty((len(experts), *item.shape[1:]), dtype=torch.float32)
        for k, j in enumerate(experts):  # an expert at a time: the conversion's temporaries stay one expert
            blocks, scales = (self.raw(item.parts[role], j).unsqueeze(0) for role in ("codes", "scales"))
            out[k] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)[0]
        return out if expert is None else out[0]


class Deferred:
    """A quantised weight (or a part of an on-disk tensor, or one under another name) handed to transformers'
    loading conversion in place of a safetensors slice: read and dequantised only when the conversion materialises
    it (``tensor[...]``), so the layer's weights are not all held dense at once before they are converted."""

    def __init__(self, item: Item, reader: Reader) -> None:
        self.item, self.reader = item, reader

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.reader.dense(self.item)[index]

    def get_dtype(self) -> str:
        return self.item.dtype

    def get_shape(self) -> list[int]:
        return list(self.item.shape)


def read(fd: int, info: TensorInfo) -> torch.Tensor:
    """The tensor ``info`` of the open file ``fd``, read with ``pread`` into fresh memory."""
    buffer = bytearray(info.nbytes)
    view, done = memoryview(buffer), 0
    while done < info.nbytes:
        n = os.preadv(fd, [view[done:]], info.start + done)
        if n == 0:
            raise OSError(f"{info.file} ends inside tensor {info.name}")
        done += n
    if info.dtype not in TORCH_DTYPES:
        raise CheckpointError(f"{info.name} is stored as {info.dtype}, which calibration cannot read")
    if not buffer:
        return torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype])
    return torch.frombuffer(buffer, dtype=TORCH_DTYPES[info.dtype]).view(info.shape)


def fp8_dense(codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    """``codes`` (float8 ``[rows, cols]``) times the scale of its block (``scale_inv[r // bm, c // bn]``)."""
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    fp8_into(codes, scale_inv, block, out)
    return out


def fp8_into(
    codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, ...], out: torch.Tensor,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor | None:  # fmt: skip
    """``fp8_dense`` written into ``out`` (float32, contiguous, ``codes``' shape), the codes decoded once into it and
    scaled there: each element written twice, no dense temporary. ``scratch`` (int16, any size) is room the
    decoding may reuse; returns the room it used, to be passed again for the next weight."""
    scales = torch.exp2(scale_inv.float() - 127) if scale_inv.dtype == torch.uint8 else scale_inv.to(torch.float32)
    # ue8m0 scales (DeepSeek-V3.2 style) are stored as bytes: the exponent of a power of two, biased by 127
    if codes.dtype == torch.float8_e4m3fn:
        scratch = _room(scratch, codes.numel(), codes.device)
        half = scratch[: codes.numel()].view(codes.shape)
        out.copy_(_e4m3_as_half(codes, half))  # float16 → float32: exact, vectorised
        scales = scales * E4M3_FACTOR
    else:
        out.copy_(codes)
    if scales.numel() == 1:
        out.mul_(scales.reshape(()))
        return scratch
    rows, cols = codes.shape
    whole = len(block) == 2 and not (rows % block[0] or cols % block[1])
    if whole and scales.shape == (rows // block[0], cols // block[1]):
        # each block times its scale by broadcasting: no per-element copy of the scales
        out.view(scales.shape[0], block[0], scales.shape[1], block[1]).mul_(scales[:, None, :, None])
    else:
        out.mul_(_per_element(scales, block, codes.shape))
    return scratch


def _room(scratch: torch.Tensor | None, numel: int, device: torch.device) -> torch.Tensor:
    if scratch is None or scratch.numel() < numel or scratch.device != device:
        return torch.empty(numel, dtype=torch.int16, device=device)
    return scratch


E4M3_FACTOR = 256.0  # _e4m3_as_half's values are this many times smaller than the codes'


def _e4m3_as_half(codes: torch.Tensor, half: torch.Tensor | None = None) -> torch.Tensor:
    """float8 e4m3 codes as float16 values ``E4M3_FACTOR`` times smaller (exact for every finite code), written in
    ``half`` (int16 of the codes' shape) if given.

    torch's own float8 → float32 conversion runs at about 35 M elements/s on a CPU core; this is a few integer
    passes: the sign moves from bit 7 to bit 15 and exponent and mantissa from bits 6..0 to bits 13..7, which is
    float16's layout with an exponent bias 8 larger (15 against 7); subnormals map to subnormals alike."""
    signed = codes.view(torch.int8)
    half = signed.to(torch.int16) if half is None else half.copy_(signed)  # sign-extended: bits 15..7 the sign
    half <<= 7  # bits 13..7 the code's exponent and mantissa, bits 15 and 14 the sign
    half &= -16512  # 0xBF80: clear bit 14 and the low bits
    values = half.view(torch.float16)
    # e4m3fn's NaN codes (0x7F, 0xFF: all of bits 6..0 set), which the layout above makes finite, are the largest
    # code read as int8 and as uint8: two reductions over bytes find them
    if signed.numel() and (int(signed.max()) == 0x7F or int(signed.view(torch.uint8).max()) == 0xFF):
        values[(signed & 0x7F) == 0x7F] = float("nan")
    return values


def _per_element(scale: torch.Tensor, block: tuple[int, ...], shape: torch.Size) -> torch.Tensor:
    """Each element's value of a per-block ``scale`` (blocks ``block`` rows × columns, the last ones cut short)."""
    rows, cols = shape
    return scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]


def scaled_dense(
    codes: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor | None = None, block: tuple[int, ...] = ()
) -> torch.Tensor:
    """compressed-tensors' dequantisation of integer or float8 ``codes`` ``[rows, cols]``: ``(code - zero) * scale``
    in the scale's dtype; the scale per tensor, per row, per group of ``cols / scale.shape[-1]`` columns, or with
    ``block``, per block."""
    rows, cols = codes.shape
    values = codes.to(scale.dtype)
    if block:
        if zeros is not None:
            values = values - _per_element(zeros, block, codes.shape).to(scale.dtype)
        return values * _per_element(scale, block, codes.shape)
    scale = scale.reshape(rows, -1) if scale.numel() > 1 else scale.reshape(1, 1)
    values = values.reshape(rows, scale.shape[-1], -1)
    if zeros is not None:
        values = values - zeros.to(scale.dtype).reshape(scale.shape).unsqueeze(-1)
    return (values * scale.unsqueeze(-1)).reshape(rows, cols)


def packed_dense(
    packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...], bits: int, zeros: torch.Tensor | None
) -> torch.Tensor:
    """A compressed-tensors ``pack-quantized`` weight ``[rows, cols]``: codes unpacked from int32 words (element i
    at bit ``i·bits``, offset by ``2^(bits-1)``; zero points packed along rows), then ``scaled_dense``."""
    rows, cols = shape
    zero = None if zeros is None else unpack(zeros.t().contiguous(), bits, rows).t()
    return scaled_dense(unpack(packed, bits, cols), scale, zero)


def unpack(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` signed ``bits``-bit codes of each row of int32 ``words`` (densely packed, low first)."""
    as_int = words.to(torch.int64) & 0xFFFFFFFF
    per_row = words.shape[-1] * 32 // bits
    positions = torch.arange(min(count, per_row)) * bits
    word, offset = positions // 32, positions % 32
    low = (as_int[..., word] >> offset) & ((1 << bits) - 1)
    spill = (offset + bits - 32).clamp(min=0)  # codes that straddle two words (bits that do not divide 32)
    if bool((spill > 0).any()):
        nxt = as_int[..., (word + 1).clamp(max=words.shape[-1] - 1)]
        low = low | ((nxt & ((1 << spill) - 1)) << (bits - spill))
    return (low - (1 << (bits - 1))).to(torch.int32)


def dense_items(ckpt: Checkpoint, names: Iterable[str]) -> list[Item]:
    """The dense tensors that the on-disk tensors ``names`` stand for, in their order: unquantised tensors as
    they are, each quantised group as one ``Packed``. Raises ``CheckpointError`` for a format not handled here."""
    names = list(names)
    quant = quantization_config(ckpt.config)
    method = str(quant.get("quant_method", "")) if quant else ""
    present = set(names)
    taken: set[str] = set()
    items: list[Item] = []
    with Reader() as reader:  # reads compressed-tensors' weight_shape
        for name in names:
            if name in taken:
                continue
            item = _group(ckpt, name, present, method, quant, reader) if method else None
            if item is None:
                info = ckpt.tensors[name]
                if info.dtype.startswith("F8") or (method and name.endswith(COMPANIONS)):
                    raise CheckpointError(
                        f"{name} ({info.dtype}) has no quantised weight or scale to go with it; the checkpoint is"
                        " incomplete or its quantization_config does not match it: re-download it"
                    )
                items.append(info)
                taken.add(name)
            else:
                items.append(item)
                taken.update(item.sources)
    return items


def _group(ckpt: Checkpoint, name: str, present: set[str], method: str, quant: dict, reader: Reader) -> Packed | None:
    """The quantised group that on-disk tensor ``name`` belongs to, or None when it is a plain tensor."""
    t = ckpt.tensors
    if method == FP8:
        extras = [name.removesuffix(e) + ".weight" for e in FP8_EXTRA if name.endswith(e)]  # met before the weight
        base = extras[0] if extras else name.removesuffix("_scale_inv") if name.endswith(".weight_scale_inv") else name
        scale = base + "_scale_inv"
        if scale not in present or base not in present:
            return None
        block = tuple(int(b) for b in quant.get("weight_block_size") or ())
        module = base.removesuffix(".weight")
        extra = tuple(module + s for s in FP8_EXTRA if module + s in present)
        _check_fp8(t[base], t[scale], block)
        return Packed(base, t[base].shape, FP8, {"codes": t[base], "scales": t[scale]}, (base, scale, *extra), block)
    if method == MXFP4:
        stem = name.removesuffix("_blocks").removesuffix("_scales")
        blocks, scales = stem + "_blocks", stem + "_scales"
        if stem == name or blocks not in present or scales not in present:
            return None
        b = t[blocks]
        if len(b.shape) != 4 or b.dtype != "U8" or t[scales].shape != b.shape[:-1]:
            raise CheckpointError(f"{blocks} is not MXFP4 blocks [experts, rows, groups, 16] with matching scales")
        shape = (b.shape[0], b.shape[2] * b.shape[3] * 2, b.shape[1])
        return Packed(stem, shape, MXFP4, {"codes": b, "scales": t[scales]}, (blocks, scales))
    if method == PACKED:
        prefix = next((name.removesuffix(s) for s in PACKED_PARTS + SCALED_PARTS if name.endswith(s)), None)
        if prefix is None:
            return None
        if prefix + ".weight_packed" in present:
            return _packed(ckpt, prefix, present, quant, reader)
        if prefix + ".weight" in present and prefix + ".weight_scale" in present:
            return _scaled(ckpt, prefix, present, quant)
        return None
    if method in PACKS or method == "modelopt":
        unknown = unreadable(ckpt.config)
        if unknown:
            raise CheckpointError(f"calibration cannot dequantise {unknown} checkpoints (it reads {READABLE});"
                                  " use a data-free --criterion such as router-norm")  # fmt: skip
        if method == "modelopt":
            pack = nvfp4_group(t, name, present, quant)
        else:
            pack = int_group(t, name, present, method, quant)
        if pack is None:
            return None
        dtype = pack.parts["scales"].dtype if pack.method != NVFP4 else "F32"
        block = (pack.bits, pack.group, pack.zero_offset)
        return Packed(pack.name, pack.shape, pack.method, pack.parts, pack.sources, block, dtype)
    raise CheckpointError(
        f"calibration cannot dequantise {method} checkpoints yet (it reads {READABLE});"
        " use a data-free --criterion such as router-norm"
    )


def _check_fp8(codes: TensorInfo, scale: TensorInfo, block: tuple[int, ...]) -> None:
    if math.prod(scale.shape) == 1:
        return
    rows, cols = codes.shape[-2:]
    want = (math.ceil(rows / block[0]), math.ceil(cols / block[1])) if len(block) == 2 else None
    if len(codes.shape) != 2 or want is None or tuple(scale.shape) != want:
        raise CheckpointError(
            f"{scale.name} has shape {list(scale.shape)}, not one scale per {list(block) or '?'} block of"
            f" {codes.name} {list(codes.shape)}; the checkpoint's quantization_config does not match its weights"
        )


def _packed(ckpt: Checkpoint, prefix: str, present: set[str], quant: dict, reader: Reader) -> Packed:
    t = ckpt.tensors
    if prefix + ".weight_g_idx" in t:
        raise CheckpointError(
            f"{prefix}.weight_g_idx: activation-ordered groups are not dequantised yet; use a data-free --criterion"
        )
    missing = [prefix + n for n in (".weight_scale", ".weight_shape") if prefix + n not in present]
    if missing:
        raise CheckpointError(
            f"{prefix}.weight_packed has no {missing[0].rpartition('.')[2]} beside it; the checkpoint is incomplete:"
            " re-download it"
        )
    parts = {"codes": t[prefix + ".weight_packed"], "scales": t[prefix + ".weight_scale"]}
    if prefix + ".weight_zero_point" in present:
        parts["zeros"] = t[prefix + ".weight_zero_point"]
    shape_info = t[prefix + ".weight_shape"]
    shape = tuple(int(v) for v in reader.raw(shape_info).tolist())
    words = parts["codes"].shape
    weights = _weights_of(quant, prefix)
    _check_zero_points(weights, prefix, present)
    bits = _bits(weights, words[-1], shape[-1] if len(shape) == 2 else 0)
    fits = len(shape) == 2 and words[0] == shape[0] and words[1] == math.ceil(shape[1] * bits / 32)
    if not fits or parts["codes"].dtype != "I32":
        raise CheckpointError(
            f"{prefix}.weight_packed {list(words)} does not hold a {list(shape)} weight of {bits}-bit codes"
        )
    sources = tuple(prefix + s for s in PACKED_PARTS if prefix + s in present)
    scale_dtype = parts["scales"].dtype
    return Packed(prefix + ".weight", shape, PACKED, parts | {"shape": shape_info}, sources, (bits,), scale_dtype)


def _scaled(ckpt: Checkpoint, prefix: str, present: set[str], quant: dict) -> Packed:
    """A compressed-tensors weight stored as float8 or int8 codes beside its scale (``float-quantized``)."""
    t = ckpt.tensors
    codes, scale = t[prefix + ".weight"], t[prefix + ".weight_scale"]
    parts = {"codes": codes, "scales": scale}
    if prefix + ".weight_zero_point" in present:
        parts["zeros"] = t[prefix + ".weight_zero_point"]
    rows, cols = codes.shape if len(codes.shape) == 2 else (0, 0)
    weights = _weights_of(quant, prefix)
    _check_zero_points(weights, prefix, present)
    block = tuple(int(b) for b in weights.get("block_structure") or ()) if weights.get("strategy") == "block" else ()
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1])) if block else None
    per_block = grid is not None and tuple(scale.shape) == grid and scale.shape[0] != rows
    fits = (
        per_block or math.prod(scale.shape) == 1 or (scale.shape[0] == rows and cols % math.prod(scale.shape[1:]) == 0)
    )
    if not rows or not fits:
        raise CheckpointError(
            f"{scale.name} has shape {list(scale.shape)}, which is no tensor, row, group or block scale of"
            f" {codes.name} {list(codes.shape)}; the checkpoint's quantization_config does not match its weights"
        )
    sources = tuple(prefix + s for s in SCALED_PARTS if prefix + s in present)
    return Packed(prefix + ".weight", codes.shape, SCALED, parts, sources, block if per_block else (), scale.dtype)


def _weights_of(quant: dict, module: str) -> dict:
    """The ``weights`` settings of the config group that quantises ``module`` (compressed-tensors' matching: a
    ``re:`` target matched from the start of the module name, else a class-name target such as ``Linear``, which
    every quantised projection is); ``{}`` when no group says."""
    groups = [g for g in (quant.get("config_groups") or {}).values() if isinstance(g, dict)]
    by_name = [g for g in groups if any(_matches(str(t), module) for t in g.get("targets") or ())]
    by_class = [g for g in groups if any(not str(t).startswith("re:") for t in g.get("targets") or ())]
    found = (by_name or by_class or [{}])[0].get("weights")
    return found if isinstance(found, dict) else {}


def _matches(target: str, module: str) -> bool:
    """Whether a ``re:`` target names ``module``."""
    if not target.startswith("re:"):
        return False
    try:
        return re.match(target[3:], module) is not None
    except re.error as e:
        raise CheckpointError(f"quantization_config target {target!r} is not a regular expression ({e})") from e


def _bits(weights: dict, words: int, cols: int) -> int:
    """Bits per code: the group's, else what the packed width implies."""
    if weights.get("num_bits"):
        return int(weights["num_bits"])
    return next((b for b in (4, 8, 2, 3, 5, 6, 7, 1) if cols and math.ceil(cols * b / 32) == words), 4)


def _check_zero_points(weights: dict, prefix: str, present: set[str]) -> None:
    if weights.get("symmetric") is False and prefix + ".weight_zero_point" not in present:
        raise CheckpointError(
            f"{prefix} is quantised asymmetrically by its config but has no weight_zero_point; the checkpoint is"
            " incomplete: re-download it"
        )
