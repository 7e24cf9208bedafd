"""Loading writes each weight once, into its final place: ``Reader.dense_into`` converts an on-disk tensor (from the
file's pages) or an FP8 weight (decoded and scaled in place) into a slice of a fused parameter, bit for bit what
torch's own conversion gives; and fused expert parameters reuse the memory of the ones just dropped (the previous
chunk of a streamed layer, the previous layer of a whole-layer pass) instead of fresh pages.

References are torch's own conversions (``Tensor.to``, torch's float8 → float32), not moeslim's code.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moeslim.layout import resolve_layout
from moeslim.shards import TensorInfo, read_header
from moeslim.source import open_checkpoint
from moeslim.stream.chunks import ExpertChunks
from moeslim.stream.dequant import FP8, Packed, Reader
from moeslim.stream.runner import LayerRunner

TRAINED = Path(__file__).resolve().parents[1] / "fixtures" / "trained"
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _shard(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    save_file(tensors, str(path))
    return read_header(path)[0]


def _garbage(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A buffer that already holds values, as a reused one does: NaN wherever nothing is written."""
    return torch.full(shape, float("nan"), dtype=dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN where NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize(("source", "target"), list(itertools.product(FLOATS, FLOATS)))
def test_a_plain_tensor_is_converted_into_its_slice_as_torch_converts_it(
    source: torch.dtype, target: torch.dtype, tmp_path: Path
) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(6, 40, generator=gen) * torch.logspace(-8, 6, 40)).to(source)  # under- and overflowing
    info = _shard(tmp_path / "w.safetensors", {"pad": torch.ones(3, dtype=torch.int8), "w": weight})["w"]
    out = _garbage((3, 6, 40), target)  # the middle expert's slot of a fused parameter
    with Reader() as reader:
        reader.dense_into(info, out[1])
    assert _same(out[1], weight.to(target))
    assert out[0].isnan().all() and out[2].isnan().all()  # nothing written outside the slot


def _fp8(tmp_path: Path, codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, ...]) -> Packed:
    infos = _shard(tmp_path / "fp8.safetensors", {"w": codes, "w_scale_inv": scales})
    return Packed("w", tuple(codes.shape), FP8, {"codes": infos["w"], "scales": infos["w_scale_inv"]}, ("w",), block)


def _per_element(scales: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    rows, cols = shape
    return scales.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]


@pytest.mark.parametrize("shape", [(64, 48), (40, 56)])  # whole 16 × 16 blocks; rows and columns cut short
@pytest.mark.parametrize("target", FLOATS)
def test_fp8_weights_are_decoded_and_scaled_in_place_as_torch_dequantises_them(
    shape: tuple[int, int], target: torch.dtype, tmp_path: Path
) -> None:
    """Every one of the 256 e4m3 codes (NaN ones included), each block times its own scale; a float32 slot takes the
    in-place route, others the dense one converted."""
    gen = torch.Generator().manual_seed(1)
    codes = torch.arange(256, dtype=torch.uint8).repeat(shape[0] * shape[1] // 256 + 1)[: shape[0] * shape[1]]
    codes = codes[torch.randperm(codes.numel(), generator=gen)].view(shape).view(torch.float8_e4m3fn)
    block = (16, 16)
    scales = torch.rand(-(-shape[0] // 16), -(-shape[1] // 16), generator=gen) * 1e-2
    reference = codes.float() * _per_element(scales, block, codes.shape)  # torch's float8 → float32, one rounding
    item = _fp8(tmp_path, codes, scales, block)
    out = _garbage((2, *shape), target)
    with Reader() as reader:
        reader.dense_into(item, out[1])
        reader.dense_into(item, out[0])  # the decoding room reused for a second weight
    assert _same(out[1], reference.to(target)) and _same(out[0], out[1])
    assert out.isnan().sum() == 2 * (codes.view(torch.uint8) & 0x7F).eq(0x7F).sum()  # only the NaN codes


def test_fp8_with_one_scale_and_e5m2_codes(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(32, 32, generator=gen) * 30
    for dtype, scales in ((torch.float8_e4m3fn, torch.tensor([[0.125]])), (torch.float8_e5m2, torch.rand(2, 2) + 1)):
        codes = values.to(dtype)
        item = _fp8(tmp_path, codes, scales, (16, 16))
        out = _garbage((32, 32), torch.float32)
        with Reader() as reader:
            reader.dense_into(item, out)
        factor = scales if scales.numel() == 1 else _per_element(scales, (16, 16), codes.shape)
        assert _same(out, codes.float() * factor), dtype


def _fused(runner: LayerRunner, index: int) -> dict[str, torch.Tensor]:
    experts = runner.parts[index].experts
    return {n: p for n, p in experts.named_parameters() if not p.is_meta}


def test_the_next_layer_and_the_next_chunk_are_written_into_the_memory_just_dropped() -> None:
    """Whole layers: layer 1's fused experts take layer 0's memory (the values are checked bit for bit by
    test_behaviour.py's record). Chunks: every chunk after the first is written where the one before was, and a
    sweep's end hands the memory back."""
    ckpt = open_checkpoint(TRAINED / "tiny-qwen3-64e")
    layout = resolve_layout(ckpt)
    first, second = (layer.index for layer in layout.layers[:2])
    assert second == first + 1
    runner = LayerRunner(ckpt, layout)
    try:
        seen = []
        for index, _ in runner.layers(first, second + 1):
            seen.append({n: p.data_ptr() for n, p in _fused(runner, index).items()})
        assert seen[0] and seen[0] == seen[1]
        assert runner._room == []  # nothing held once the pass is over
    finally:
        runner.close()

    runner = LayerRunner(ckpt, layout, expert_chunk=16)
    try:
        with runner.loaded(first):
            experts = runner.experts_of(first)
            assert isinstance(experts, ExpertChunks)
            pointers = [{n: p.data_ptr() for n, p in _fused(runner, first).items()} for _ in experts.chunks(range(64))]
            assert len(pointers) == 4 and pointers[0] and all(p == pointers[0] for p in pointers)
            assert experts._room == []
    finally:
        runner.close()
