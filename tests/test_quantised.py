"""Quantised checkpoints (FP8 block-scaled, MXFP4, compressed-tensors int4 and FP8) calibrate and validate as the same
model dequantised ahead of time does.

Each quantised fixture has a twin (``<name>_dense``) whose weights were dequantised when the fixture was built,
by code that is not moeslim's: the fixtures' own inverse of their quantisers (FP8, MXFP4) and compressed-tensors'
own decompression (``qwen3_moe_int4``: int4 experts, int4 q/k/v with zero points, FP8 o_proj). The twin is an ordinary float checkpoint without ``quantization_config``.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.naive_quantized.base import (
    FloatQuantizationCompressor,
    IntQuantizationCompressor,
)
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors.torch import load_file, save_file
from transformers.integrations.finegrained_fp8 import Fp8Dequantize

from moeslim.source import open_checkpoint
from moeslim.stream.dequant import fp8_dense, packed_dense, scaled_dense
from tests.conftest import run_cli, tree_digest

QUANTISED = {"deepseek_v3_fp8": 8, "gpt_oss_mxfp4": 4, "qwen3_moe_int4": 4}  # fixture → --keep
SMALL = ["--samples", "4", "--seq-len", "16", "--batch-size", "2"]


@pytest.fixture()
def calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"w{i % 90} the of and" for i in range(1000)))
    return path


# ---- the arithmetic, against the quantisers' own code ---------------------------------------------------------


def _int4_case(bits: int, symmetric: bool, strategy: str, rows: int, cols: int, dtype: torch.dtype) -> dict:
    """A random weight packed by compressed-tensors itself, with scales (and zero points) from its ranges."""
    gen = torch.Generator().manual_seed(bits * 1000 + rows * 10 + cols)
    weight = torch.randn(rows, cols, generator=gen).to(dtype)
    groups = weight.float().reshape(
        rows, -1 if strategy == "channel" else cols // 16, 16 if strategy == "group" else cols
    )
    top = 2 ** (bits - 1) - 1
    state: dict[str, torch.Tensor] = {"weight": weight}
    if symmetric:
        state["weight_scale"] = (groups.abs().amax(-1) / top).to(dtype)
    else:
        low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = ((high - low) / (2**bits - 1)).to(dtype)
        state["weight_scale"] = scale
        zero = torch.round(-low / scale.float()) - 2 ** (bits - 1)
        state["weight_zero_point"] = zero.clamp(-(2 ** (bits - 1)), top).to(torch.int8)
    args = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        strategy=strategy,
        group_size=16 if strategy == "group" else None,
    )
    return {"state": state, "scheme": QuantizationScheme(targets=["Linear"], weights=args)}


@pytest.mark.parametrize(
    ("bits", "symmetric", "strategy", "rows", "dtype"),
    list(
        itertools.product((2, 3, 4, 8), (True, False), ("group", "channel"), (13, 40), (torch.float32, torch.bfloat16))
    ),
)
def test_packed_codes_equal_compressed_tensors_decompression(
    bits: int, symmetric: bool, strategy: str, rows: int, dtype: torch.dtype
) -> None:
    # 3 bits straddle int32 words; 13 rows leave zero points a ragged last word (asymmetric)
    case = _int4_case(bits, symmetric, strategy, rows, 48, dtype)
    packed = PackedQuantizationCompressor.compress(case["state"], case["scheme"])
    reference = PackedQuantizationCompressor.decompress(dict(packed), case["scheme"])["weight"]
    ours = packed_dense(
        packed["weight_packed"], packed["weight_scale"], tuple(packed["weight_shape"].tolist()), bits,
        packed.get("weight_zero_point"),
    )  # fmt: skip
    assert ours.dtype == reference.dtype and torch.equal(ours, reference)


@pytest.mark.parametrize(
    ("kind", "symmetric", "strategy", "dtype"),
    [
        (kind, symmetric, strategy, dtype)
        for kind, symmetric, strategy, dtype in itertools.product(
            ("float", "int"), (True, False), ("tensor", "channel", "group", "block"), (torch.float32, torch.bfloat16)
        )
        if symmetric or kind == "int"  # float8 has no zero points
    ],
)
def test_scaled_codes_equal_compressed_tensors_decompression(
    kind: str, symmetric: bool, strategy: str, dtype: torch.dtype
) -> None:
    rows, cols = 40, 48  # blocks of 16: the last block row is cut short (40 = 16 + 16 + 8)
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1)).to(dtype)
    shape = {"tensor": (1,), "channel": (rows, 1), "group": (rows, cols // 16), "block": (3, 3)}[strategy]
    scale = (torch.rand(shape, generator=torch.Generator().manual_seed(2)) / 50 + 0.01).to(dtype)
    state = {"weight": weight, "weight_scale": scale}
    if not symmetric:
        state["weight_zero_point"] = torch.randint(-20, 20, shape, generator=torch.Generator().manual_seed(3)).to(
            torch.int8
        )
    args = QuantizationArgs(
        num_bits=8, type=kind, symmetric=symmetric, strategy=strategy,
        group_size=16 if strategy == "group" else None, block_structure=[16, 16] if strategy == "block" else None,
    )  # fmt: skip
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressor = FloatQuantizationCompressor if kind == "float" else IntQuantizationCompressor
    stored = compressor.compress(state, scheme)
    reference = compressor.decompress(dict(stored), scheme)["weight"]
    ours = scaled_dense(
        stored["weight"],
        stored["weight_scale"],
        stored.get("weight_zero_point"),
        (16, 16) if strategy == "block" else (),
    )
    assert ours.dtype == reference.dtype and torch.equal(ours, reference)


def test_fp8_blocks_equal_transformers_dequantisation_and_cut_ragged_edges() -> None:
    gen = torch.Generator().manual_seed(0)
    codes = (torch.randn(64, 48, generator=gen) * 100).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(4, 3, generator=gen) + 0.5  # 16×16 blocks
    reference = Fp8Dequantize(None).convert({"weight": codes, "weight_scale_inv": scale_inv})["weight"]
    if isinstance(reference, list):  # transformers 5.16 takes a bare "weight" key as a chain pattern: a list of one
        (reference,) = reference
    assert torch.equal(fp8_dense(codes, scale_inv, (16, 16)), reference.float())
    # 20 rows in blocks of 16: rows 0-15 take scale row 0, rows 16-19 scale row 1 (not 10 rows each)
    ragged = torch.ones(20, 16, dtype=torch.float8_e4m3fn)
    dense = fp8_dense(ragged, torch.tensor([[2.0], [3.0]]), (16, 16))
    assert dense[:16].eq(2.0).all() and dense[16:].eq(3.0).all()
    # ue8m0 scales: bytes 128 and 125 are 2^(128-127) = 2 and 2^(125-127) = 0.25; as float8_e8m0fnu, the same
    exponents = torch.tensor([[128], [125]], dtype=torch.uint8)
    for scales in (exponents, exponents.view(torch.float8_e8m0fnu)):
        dense = fp8_dense(ragged, scales, (16, 16))
        assert dense[:16].eq(2.0).all() and dense[16:].eq(0.25).all()


# ---- calibration and validation, against the dequantised twins ------------------------------------------------


def _calibrate(src: Path, out: Path, calib: Path, capsys) -> dict[str, torch.Tensor]:
    code, _, err = run_cli(["calibrate", str(src), "--out", str(out), "--calib", str(calib), *SMALL], capsys)
    assert code == 0, err
    return load_file(out / "stats.safetensors")


@pytest.mark.parametrize("name", list(QUANTISED))
def test_statistics_and_plans_equal_the_dequantised_twin(name: str, built, calib: Path, tmp_path: Path, capsys) -> None:
    src, twin = built(name), built(f"{name}_dense")
    before = tree_digest(src)
    ours = _calibrate(src, tmp_path / "q", calib, capsys)
    reference = _calibrate(twin, tmp_path / "d", calib, capsys)
    assert ours.keys() == reference.keys() and any(k.endswith("count") for k in ours)
    for key, value in reference.items():
        np.testing.assert_allclose(
            ours[key].double().numpy(), value.double().numpy(), rtol=1e-5, atol=1e-7, err_msg=key
        )

    kept = {}
    for label, folder in (("q", src), ("d", twin)):
        out = tmp_path / f"pruned-{label}"
        args = ["slim", str(folder), "--keep", str(QUANTISED[name]), "--calib", str(calib), *SMALL, "--out", str(out)]
        code, _, err = run_cli([*args, "--no-validate"], capsys)
        assert code == 0, err
        plan = json.loads((out / "moeslim_plan.json").read_text())
        kept[label] = ([entry["kept"] for entry in plan["layers"]], plan["criterion"])
    assert kept["q"] == kept["d"]  # the same default (auto) choice and the same experts
    assert tree_digest(src) == before

    pruned, source = open_checkpoint(tmp_path / "pruned-q"), open_checkpoint(src)
    quantised = [n for n, t in pruned.tensors.items() if t.dtype in ("F8_E4M3", "U8", "I32")]  # codes
    assert quantised, "the pruned checkpoint stays quantised"
    config = json.loads((tmp_path / "pruned-q" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((src / "config.json").read_text())["quantization_config"]
    for n in quantised:  # same dtypes, every code a byte of the source's (the surgery tests check which bytes)
        assert pruned.tensors[n].dtype == source.tensors[n].dtype


def test_validation_of_quantised_pairs_equals_the_dequantised_twins(built, calib: Path, tmp_path: Path, capsys) -> None:
    for name, keep in QUANTISED.items():
        reports = []
        for folder in (built(name), built(f"{name}_dense")):
            out = tmp_path / f"{folder.name}-pruned"
            args = ["slim", str(folder), "--keep", str(keep), "--criterion", "router-norm", "--no-validate"]
            assert run_cli([*args, "--out", str(out)], capsys)[0] == 0
            code, _, err = run_cli(
                ["validate", str(folder), str(out), "--samples", "4", "--seq-len", "32", "--generations", "0"], capsys
            )
            assert code == 0, err
            reports.append(json.loads((out / "validation.json").read_text()))
        quantised, dense = reports
        for key in ("kl_mean", "kl_p95", "top1_agreement", "perplexity_original", "perplexity_pruned"):
            assert quantised[key] == pytest.approx(dense[key], rel=1e-6, abs=1e-9), (name, key)
        assert quantised["scored_tokens"] == dense["scored_tokens"] > 0 and quantised["kl_mean"] > 0
        errors = [
            (e["relative_error"], f["relative_error"])
            for e, f in zip(quantised["layers"], dense["layers"], strict=True)
        ]
        assert errors and all(a == pytest.approx(b, rel=1e-6) for a, b in errors)


@pytest.mark.parametrize("name", list(QUANTISED))
def test_weight_norm_reads_the_dequantised_weights(name: str, built) -> None:
    from moeslim.criteria import weight_norm
    from moeslim.layout import resolve_layout

    scores = []
    for folder in (built(name), built(f"{name}_dense")):
        ckpt = open_checkpoint(folder)
        scores.append(weight_norm(ckpt, resolve_layout(ckpt)))
    assert scores[0].keys() == scores[1].keys()
    for index, values in scores[1].items():
        np.testing.assert_allclose(scores[0][index], values, rtol=1e-6)
        assert np.ptp(values) > 0  # the experts differ: a norm of zeros or of scales alone would not


# ---- broken quantised checkpoints -------------------------------------------------------------------------------


def _rewrite(folder: Path, change) -> None:
    """Apply ``change(tensors)`` to every shard of ``folder`` (in place, keeping names and files)."""
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        change(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})


def test_a_nan_scale_names_the_layer_expert_and_tensor(built, calib: Path, tmp_path: Path, capsys) -> None:
    src = Path(shutil.copytree(built("deepseek_v3_fp8"), tmp_path / "src"))
    bad = "model.layers.2.mlp.experts.5.up_proj.weight_scale_inv"

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        if bad in tensors:
            tensors[bad] = tensors[bad].clone()
            tensors[bad][0, 0] = float("nan")

    _rewrite(src, poison)
    code, _, err = run_cli(["calibrate", str(src), "--out", str(tmp_path / "s"), "--calib", str(calib), *SMALL], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "layer 2, expert 5: non-finite values (nan) in " + bad in err


def test_scales_that_do_not_fit_the_blocks_are_one_line(built, calib: Path, tmp_path: Path, capsys) -> None:
    src = Path(shutil.copytree(built("deepseek_v3_fp8"), tmp_path / "src"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [8, 8]  # the scales are per 16×16 block
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(["calibrate", str(src), "--out", str(tmp_path / "s"), "--calib", str(calib), *SMALL], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "not one scale per [8, 8] block" in err and "quantization_config does not match its weights" in err
    assert not (tmp_path / "s").exists() or not (tmp_path / "s" / "stats.json").exists()


def _companions(folder: Path) -> list[str]:
    """One tensor of each kind that a quantised weight is stored as (codes, scales, shape, zero points), per
    suffix and dtype, from every decoder layer's experts and attention."""
    ckpt = open_checkpoint(folder)
    kinds: dict[tuple[str, str, bool], str] = {}
    for name, info in ckpt.tensors.items():
        suffix = name.rpartition(".")[2]
        if info.dtype in ("F8_E4M3", "U8", "I32", "I64") or "scale" in suffix or suffix.endswith("_blocks"):
            kinds.setdefault((suffix, info.dtype, ".experts." in name), name)
    return sorted(kinds.values())


@pytest.mark.parametrize("name", list(QUANTISED))
def test_every_missing_piece_of_a_quantised_weight_is_one_line(
    name: str, built, calib: Path, tmp_path: Path, capsys
) -> None:
    source = built(name)
    dropped = _companions(source)
    assert len(dropped) >= 2
    for k, victim in enumerate(dropped):
        src = Path(shutil.copytree(source, tmp_path / f"src{k}"))

        def drop(tensors: dict[str, torch.Tensor], victim: str = victim) -> None:
            tensors.pop(victim, None)

        _rewrite(src, drop)
        index = src / "model.safetensors.index.json"
        if index.exists():
            data = json.loads(index.read_text())
            data["weight_map"].pop(victim)
            index.write_text(json.dumps(data))
        out = tmp_path / f"s{k}"
        code, _, err = run_cli(["calibrate", str(src), "--out", str(out), "--calib", str(calib), *SMALL], capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (victim, err)
        assert not (out / "stats.json").exists()


def test_fp8_activation_scales_travel_with_their_weight_in_any_order() -> None:
    from moeslim.shards import TensorInfo
    from moeslim.source import Checkpoint
    from moeslim.stream.dequant import Packed, dense_items

    folder = Path("/nonexistent")  # headers only: nothing is read
    specs = [("a.input_scale", "F32", (1,)), ("a.weight", "F8_E4M3", (16, 16)), ("a.weight_scale_inv", "F32", (1, 1))]
    for order in itertools.permutations(specs):
        tensors = {n: TensorInfo(n, folder, d, s, 0, 0) for n, d, s in order}
        config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}
        items = dense_items(Checkpoint(folder, config, tensors, (), {}), list(tensors))
        assert len(items) == 1 and isinstance(items[0], Packed) and items[0].name == "a.weight"
        assert set(items[0].sources) == set(tensors)
