"""MoE releases quantised as they are published besides FP8, MXFP4 and compressed-tensors: ModelOpt NVFP4 and
GPTQ / AWQ int packs, pruned as raw bytes and calibrated by dequantising each layer.

The quantisers here are the test's own, written from the formats' descriptions (``moeslim/stream/packs.py`` says
them): each returns the on-disk tensors and the values they stand for, computed from the integer codes before
packing. A tiny Qwen3-MoE has every projection of its decoder layers (experts and attention) quantised so; its
twin holds those values as ordinary float32 weights. moeslim must read the packs as the twin's values exactly,
calibrate both to the same statistics, slice the packs as bytes (the kept experts' tensors unchanged, renamed),
and its pruned output must be the pruned twin once dequantised, which loads strictly and gives the logits of the
twin whose routers cannot reach the dropped experts.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from safetensors.torch import load_file, save_file
from transformers import Qwen3MoeForCausalLM

from moeslim.calibrate.capture import FIELDS
from moeslim.criteria import weight_norm
from moeslim.layout import resolve_layout
from moeslim.names import PLAN_NAME
from moeslim.pipeline import SlimOptions, slim
from moeslim.source import open_checkpoint
from moeslim.stream import packs
from moeslim.stream.dequant import Packed, Reader, dense_items
from moeslim.stream.masking import drop_experts_of
from moeslim.stream.memory import layer_bytes
from moeslim.stream.packs import nvfp4_dense, unpack_columns, unpack_rows
from moeslim.validate.structure import check_structure
from tests.conftest import run_cli, streamed_statistics

PROJECTION = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp\.experts\.\d+)\.\w+_proj\.weight$")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
GROUP = 16


# ---- the test's quantisers: on-disk tensors and the values they stand for -------------------------------------


def _words(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """``codes`` (ints < 2^bits) packed into int32 words along ``dim``, element k of a word at bit ``k·bits``."""
    per = 32 // bits
    moved = codes.long().movedim(dim, -1)
    grouped = moved.reshape(*moved.shape[:-1], -1, per)
    words = (grouped << (torch.arange(per) * bits)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement, as int32 stores it
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def nvfp4(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """ModelOpt NVFP4: a global scale so that block scales fit float8, codes to the nearest E2M1 value."""
    rows, cols = weight.shape
    scale_2 = weight.abs().max() / (6 * 448)
    blocks = weight.reshape(rows, cols // 16, 16)
    scale = (blocks.abs().amax(-1) / (6 * scale_2)).to(torch.float8_e4m3fn)
    per_block = scale.float() * scale_2
    scaled = blocks / per_block.unsqueeze(-1)
    index = (scaled.abs().unsqueeze(-1) - E2M1).abs().argmin(-1)  # nearest magnitude
    negative = (scaled < 0).long()
    values = (E2M1[index] * (1 - 2 * negative) * per_block.unsqueeze(-1)).reshape(rows, cols)
    codes = (index | negative << 3).reshape(rows, cols)
    packed = (codes[:, 0::2] | codes[:, 1::2] << 4).to(torch.uint8)
    parts = {"weight": packed, "weight_scale": scale, "weight_scale_2": scale_2.reshape(()).float(),
             "input_scale": torch.tensor(0.01)}  # fmt: skip
    return parts, values


def gptq(weight: torch.Tensor, bits: int, v2: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """GPTQ with activation order (each input row's group from ``g_idx``, a permutation), symmetric zero points
    ``2^(bits-1)`` stored less one (original format) or asymmetric ones stored as they are (``gptq_v2``)."""
    out, cols = weight.shape
    gen = torch.Generator().manual_seed(cols + out)
    g_idx = torch.empty(cols, dtype=torch.int32)
    g_idx[torch.randperm(cols, generator=gen)] = (torch.arange(cols) // GROUP).to(torch.int32)
    top = 2**bits - 1
    groups = cols // GROUP
    scale, zero = torch.empty(groups, out), torch.empty(groups, out)
    for g in range(groups):
        w = weight[:, g_idx == g]
        if v2:
            low, high = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
            scale[g] = ((high - low) / top).half().float()
            zero[g] = torch.round(-low / scale[g]).clamp(0, top)
        else:
            scale[g] = (w.abs().amax(1) / (top // 2)).half().float()
            zero[g] = 2 ** (bits - 1)
    codes = (torch.round(weight.t() / scale[g_idx.long()]) + zero[g_idx.long()]).clamp(0, top)  # [in, out]
    values = ((codes - zero[g_idx.long()]) * scale[g_idx.long()]).t().half().float()
    stored = zero - (0 if v2 else 1)
    parts = {"qweight": _words(codes, bits, 0), "qzeros": _words(stored, bits, 1), "scales": scale.half(),
             "g_idx": g_idx}  # fmt: skip
    return parts, values


def awq(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """AutoAWQ GEMM: 4-bit, asymmetric per group of input rows, packed along the output dim in AWQ's order."""
    wt = weight.t()  # [in, out]
    rows, out = wt.shape
    grouped = wt.reshape(rows // GROUP, GROUP, out)
    low, high = grouped.amin(1).clamp(max=0), grouped.amax(1).clamp(min=0)
    scale = ((high - low) / 15).half().float()
    zero = torch.round(-low / scale).clamp(0, 15)
    per_row = torch.arange(rows) // GROUP
    codes = (torch.round(wt / scale[per_row]) + zero[per_row]).clamp(0, 15)
    values = ((codes - zero[per_row]) * scale[per_row]).t().half().float()

    def interleave(x: torch.Tensor) -> torch.Tensor:  # nibble i of each eight holds column AWQ_ORDER[i]
        return x.reshape(x.shape[0], -1, 8)[..., AWQ_ORDER].reshape(x.shape)

    parts = {"qweight": _words(interleave(codes), 4, 1), "qzeros": _words(interleave(zero), 4, 1),
             "scales": scale.half()}  # fmt: skip
    return parts, values


FORMATS: dict[str, tuple[Callable[[torch.Tensor], tuple[dict, torch.Tensor]], dict]] = {
    "nvfp4": (nvfp4, {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                      "exclude_modules": ["lm_head", "model.layers.*.mlp.gate"]}),
    "gptq": (lambda w: gptq(w, 4, v2=False), {"quant_method": "gptq", "bits": 4, "group_size": GROUP,
                                               "desc_act": True, "sym": True, "checkpoint_format": "gptq"}),
    "gptq_v2_8bit": (lambda w: gptq(w, 8, v2=True), {"quant_method": "gptq", "bits": 8, "group_size": GROUP,
                                                      "desc_act": True, "sym": False, "checkpoint_format": "gptq_v2"}),
    "awq": (awq, {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}),
}  # fmt: skip


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """``release(format)`` → (the quantised checkpoint, its dequantised twin), built once per module from one tiny
    Qwen3-MoE with distinct random weights."""
    from moeslim.families.tiny import tiny_model

    root = tmp_path_factory.mktemp("releases")
    model = tiny_model("qwen3_moe", 8)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(root / "base")
    base = load_file(root / "base" / "model.safetensors")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in cache:
            quantise, config = FORMATS[name]
            quantised, twin = root / name, root / f"{name}_dense"
            for folder in (quantised, twin):
                shutil.copytree(root / "base", folder)
            q, d = {}, {}
            for key, value in base.items():
                if not PROJECTION.match(key):
                    q[key] = d[key] = value
                    continue
                parts, values = quantise(value)
                prefix = key.removesuffix(".weight")
                q.update({f"{prefix}.{part}": tensor.contiguous() for part, tensor in parts.items()})
                d[key] = values.contiguous()
            save_file(q, quantised / "model.safetensors", metadata={"format": "pt"})
            save_file(d, twin / "model.safetensors", metadata={"format": "pt"})
            raw = json.loads((quantised / "config.json").read_text())
            (quantised / "config.json").write_text(json.dumps({**raw, "quantization_config": config}, indent=2))
            if name == "nvfp4":  # what ModelOpt writes beside config.json
                (quantised / "hf_quant_config.json").write_text(json.dumps({"quantization": config}))
            cache[name] = (quantised, twin)
        return cache[name]

    return get


# ---- the arithmetic ---------------------------------------------------------------------------------------------


def test_codes_unpack_as_hand_packed_words_say() -> None:
    # GPTQ qweight: rows packed along dim 0, row k of a word at bit 4k: 0x76543210 holds rows 0..7 = 0..7
    word = torch.tensor([[0x76543210]], dtype=torch.int32)
    assert unpack_rows(word, 4)[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    # AWQ: nibble i holds column AWQ_ORDER[i]; columns 0..7 holding 0..7 pack as nibbles 0,2,4,6,1,3,5,7
    word = torch.tensor([[0x75316420]], dtype=torch.int32)
    assert unpack_columns(word, 4, packs.AWQ_ORDER)[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    # a word with the sign bit set: 0xF0000000 is int32 -268435456; its top nibble is 15
    assert unpack_rows(torch.tensor([[-268435456]], dtype=torch.int32), 4)[:, 0].tolist() == [0] * 7 + [15]
    # NVFP4 byte 0x9A: low nibble 0xA = sign 1, code 2 → -1.0; high 0x9 = sign 1, code 1 → -0.5; block scale
    # 2.0 (exact in float8) times global 0.25 → each value × 0.5
    byte = torch.tensor([[0x9A] + [0] * 7], dtype=torch.uint8)
    dense = nvfp4_dense(byte, torch.tensor([[2.0]]).to(torch.float8_e4m3fn), torch.tensor(0.25))
    assert dense[0, :2].tolist() == [-0.5, -0.25] and dense[0, 2:].eq(0).all()


def test_e2m1_codes_decode_as_compressed_tensors_decodes_them() -> None:
    every = torch.arange(256, dtype=torch.uint8).reshape(16, 16)  # every byte, i.e. every pair of codes
    ones = torch.ones(16, 2).to(torch.float8_e4m3fn)
    reference = unpack_fp4_from_uint8(every, 16, 32, dtype=torch.float32)
    assert torch.equal(nvfp4_dense(every, ones, torch.tensor(1.0)), reference)


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_packed_weight_reads_as_the_quantisers_values(name: str, release) -> None:
    quantised, twin = release(name)
    ckpt, dense = open_checkpoint(quantised), load_file(twin / "model.safetensors")
    items = dense_items(ckpt, list(ckpt.tensors))
    packed = [item for item in items if isinstance(item, Packed)]
    assert len(packed) == sum(1 for n in dense if PROJECTION.match(n)) > 0  # every projection, one item each
    assert {item.name for item in items} == set(dense)  # the names and nothing else: scales are absorbed
    with Reader() as reader:
        for item in packed:
            assert item.shape == tuple(dense[item.name].shape)
            assert torch.equal(reader.dense(item).float(), dense[item.name]), item.name


# ---- calibration, surgery, the pruned model ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FORMATS))
def test_statistics_and_weight_norms_equal_the_dequantised_twin(name: str, release) -> None:
    quantised, twin = release(name)
    ours, reference = streamed_statistics(quantised), streamed_statistics(twin)
    assert sorted(ours.layers) == sorted(reference.layers) and ours.layers
    for index in reference.layers:
        a, b = ours.total(index), reference.total(index)
        assert np.array_equal(a["count"], b["count"]) and a["count"].sum() > 0, index
        for field in FIELDS:
            np.testing.assert_allclose(a[field], b[field], rtol=1e-6, atol=1e-9, err_msg=f"{index} {field}")
    scores = [weight_norm(c, resolve_layout(c)) for c in map(open_checkpoint, (quantised, twin))]
    for index, values in scores[1].items():
        np.testing.assert_allclose(scores[0][index], values, rtol=1e-6)
        assert np.ptp(values) > 0


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_memory_check_counts_a_packed_layer_as_its_dequantised_twin(name: str, release) -> None:
    """A GPTQ 8-bit word holds 4 codes, not 8: counted as 4-bit, its layer was twice its dense size."""
    quantised, twin = (open_checkpoint(p) for p in release(name))
    assert layer_bytes(quantised, resolve_layout(quantised), 2) == layer_bytes(twin, resolve_layout(twin), 2)


def _raw(ckpt, name: str) -> bytes:
    info = ckpt.tensors[name]
    with open(info.file, "rb") as f:
        f.seek(info.start)
        return f.read(info.nbytes)


@pytest.mark.parametrize("name", list(FORMATS))
def test_packs_are_sliced_as_bytes_and_dequantise_to_the_pruned_twin(name: str, release, tmp_path: Path) -> None:
    quantised, twin = release(name)
    out, twin_out = tmp_path / "q", tmp_path / "d"
    slim(SlimOptions(quantised, keep=4, out=out, criterion="random", seed=7, validation=None))
    slim(SlimOptions(twin, out=twin_out, plan=out / PLAN_NAME, validation=None))  # the same experts
    kept = {e["layer"]: e["kept"] for e in json.loads((out / PLAN_NAME).read_text())["layers"]}
    before, after = open_checkpoint(quantised), open_checkpoint(out)
    layout = resolve_layout(before)
    for layer in layout.layers:  # every tensor of a kept expert (codes, scales, zeros, g_idx): its bytes, renamed
        for new, old in enumerate(kept[layer.index]):
            for n in layer.per_expert[old]:
                renamed = n.replace(f".experts.{old}.", f".experts.{new}.")
                assert after.tensors[renamed].dtype == before.tensors[n].dtype
                assert _raw(after, renamed) == _raw(before, n), renamed
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == FORMATS[name][1]
    assert [config[k] for k in ("num_experts", "num_local_experts") if k in config] == [4]
    if name == "nvfp4":
        assert (out / "hf_quant_config.json").read_bytes() == (quantised / "hf_quant_config.json").read_bytes()
    check_structure(after)  # the packs' dense names and shapes load into transformers' model of the new config

    pruned_twin = load_file(twin_out / "model.safetensors")
    with Reader() as reader:
        items = dense_items(after, list(after.tensors))
        assert {item.name for item in items} == set(pruned_twin)
        for item in items:
            if isinstance(item, Packed):
                assert torch.equal(reader.dense(item).float(), pruned_twin[item.name]), item.name
    model, info = Qwen3MoeForCausalLM.from_pretrained(twin_out, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    original = Qwen3MoeForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), drop_experts_of(original, resolve_layout(open_checkpoint(twin)), kept):
        expected = original(input_ids=ids).logits
    with torch.no_grad():
        actual = model.eval()(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "victim"), [("gptq", "qzeros"), ("awq", "scales"), ("nvfp4", "weight_scale_2")])
def test_a_pack_missing_a_part_is_refused_in_one_line(name: str, victim: str, release, tmp_path: Path, capsys) -> None:
    quantised, _ = release(name)
    src = Path(shutil.copytree(quantised, tmp_path / "src"))
    tensors = load_file(src / "model.safetensors")
    gone = f"model.layers.1.mlp.experts.3.down_proj.{victim}"
    del tensors[gone]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"w{i % 90} the of and" for i in range(400)))
    args = ["calibrate", str(src), "--out", str(tmp_path / "s"), "--calib", str(calib), "--samples", "2",
            "--seq-len", "16"]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "model.layers.1.mlp.experts.3.down_proj" in err and victim in err and "incomplete" in err, err
