"""Memory before any work: a decoder layer that cannot fit is refused in one line with what it needs, before a
weight is read; the dense size of a quantised layer is that of its dequantised twin."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from moeslim.layout import resolve_layout
from moeslim.quant import packed_codes
from moeslim.shards import read_header
from moeslim.source import open_checkpoint
from moeslim.stream.memory import LOAD_FACTOR, is_out_of_memory, layer_bytes
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_layer_bytes_is_the_sum_of_the_largest_layers_tensors() -> None:
    ckpt = open_checkpoint(ROOT / "fixtures" / "trained" / "tiny-mixtral-16e")
    layout = resolve_layout(ckpt)
    index, size = layer_bytes(ckpt, layout, 4)
    per_layer = {
        i: sum(shape.numel() * 4 for n, shape in _tensors(ckpt).items() if n.startswith(f"model.layers.{i}."))
        for i in range(layout.num_hidden_layers)
    }
    assert size == max(per_layer.values()) and per_layer[index] == size  # float32: 4 bytes an element


def test_a_packed_word_holds_32_over_the_configs_bits_codes() -> None:
    def codes(quant: dict) -> dict:
        return packed_codes({"model_type": "qwen3_moe", "quantization_config": quant})

    # an int32 word of b-bit codes holds 32 / b of them: GPTQ 8-bit 4, 2-bit 16; AWQ spells bits w_bit
    assert codes({"quant_method": "gptq", "bits": 8})[".qweight"] == {"I32": 4}
    assert codes({"quant_method": "gptq", "bits": 2})[".qweight"] == {"I32": 16}
    assert codes({"quant_method": "awq", "w_bit": 4})[".qweight"] == {"I32": 8}
    # compressed-tensors: the fewest bits of its groups (8-bit and 4-bit groups: 4-bit's 8 a word, 16 an int64)
    groups = {"a": {"weights": {"num_bits": 8}}, "b": {"weights": {"num_bits": 4}}}
    assert codes({"quant_method": "compressed-tensors", "config_groups": groups})[".weight_packed"] == {
        "I32": 8, "I64": 16
    }  # fmt: skip
    only8 = {"a": {"weights": {"num_bits": 8}}}
    assert codes({"quant_method": "compressed-tensors", "config_groups": only8})[".weight_packed"] == {
        "I32": 4, "I64": 8
    }  # fmt: skip
    assert codes({})[".qweight"] == {"I32": 8} and codes({})["_blocks"] == {"U8": 2}  # unsaid: 4-bit; MXFP4 2 a byte


def _tensors(ckpt) -> dict:  # noqa: ANN001
    from safetensors import safe_open

    out = {}
    for shard in ckpt.shards:
        with safe_open(ckpt.root / shard, framework="pt") as f:
            out.update({n: f.get_slice(n).get_shape() for n in f.keys()})  # noqa: SIM118
    return {n: torch.Size(s) for n, s in out.items()}


@pytest.mark.parametrize("name", ["qwen3_moe_int4", "deepseek_v3_fp8", "gpt_oss_mxfp4"])
def test_a_quantised_layer_counts_as_its_dequantised_twin(built, name: str) -> None:
    quantised, dense = (open_checkpoint(built(n)) for n in (name, f"{name}_dense"))
    assert layer_bytes(quantised, resolve_layout(quantised), 2) == layer_bytes(dense, resolve_layout(dense), 2)


def _huge_layer(src: Path, out: Path, gigabytes: int) -> Path:
    """A copy of ``src`` whose layer 0 expert 0 ``w1`` is ``gigabytes`` GB of float32 zeros in a sparse file (no disk
    used): the headers say a layer no machine here can hold."""
    shutil.copytree(src, out)
    shard = out / "model.safetensors"
    header, _ = read_header(shard)
    name = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    rows = gigabytes * 10**9 // (4 * 1024)
    entries, offset = {}, 0
    for t in sorted(header.values(), key=lambda t: t.start):
        shape = [rows, 1024] if t.name == name else list(t.shape)
        size = rows * 1024 * 4 if t.name == name else t.end - t.start
        entries[t.name] = {"dtype": t.dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries).encode()
    text += b" " * (-len(text) % 8)
    shard.unlink()
    with open(shard, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    return out


def test_a_layer_that_cannot_fit_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    model = _huge_layer(ROOT / "fixtures" / "trained" / "tiny-mixtral-16e", tmp_path / "huge", gigabytes=200)
    code, _, err = run_cli(
        ["calibrate", str(model), "--out", str(tmp_path / "stats"), "--samples", "4", "--seq-len", "16"], capsys
    )
    assert code == 2 and err.count("\n") == 1, err
    # 200 GB of float32 weights × LOAD_FACTOR while loading (× 1.1: "needs about 220" GB and more)
    assert (
        f"decoder layer 0 needs about {int(200 * LOAD_FACTOR) // 10}" in err
        and "GB in float32" in err
        and "--dtype bfloat16" in err
    ), err
    assert not (tmp_path / "stats" / "stats.json").exists()


def test_torchs_failed_allocation_is_told_apart() -> None:
    with pytest.raises(RuntimeError) as caught:
        torch.empty(2**62, dtype=torch.uint8)  # more than any machine: torch's CPU allocator refuses
    assert is_out_of_memory(caught.value)
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert is_out_of_memory(MemoryError())
