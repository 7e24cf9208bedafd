"""Quantised experts in the module naming: ``mlp.experts.gate_up_proj`` stored as FP8 or NVFP4 codes with companions
named after it (``gate_up_proj_scale_inv``; ``gate_up_proj_weight_scale``, ``_weight_scale_2``, ``_input_scale``), as
transformers' quantisers name them in memory. No public release ships them (FP8 and NVFP4 MoE releases are
per-expert), so they are not dequantised: calibration and ``weight-norm`` refuse them in one line, before any weight
is read. A data-free prune slices each companion with one slice per expert on dim 0 as raw bytes, with its weight;
one value for every expert (a per-tensor scale) stays whole; any other companion is refused in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeslim.families.tiny import save_module_form, tiny_model
from moeslim.layout import resolve_layout
from moeslim.names import PLAN_NAME
from moeslim.source import open_checkpoint
from tests.conftest import distinct, run_cli

ROOT = Path(__file__).resolve().parents[1]
E, BLOCK = 8, 16
FP8 = {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK], "activation_scheme": "dynamic"}
NVFP4 = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}


def _fp8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``[E, rows, cols]`` as FP8 codes and one float32 scale per block (codes are not checked against values here:
    surgery moves bytes)."""
    e, rows, cols = weight.shape
    scales = torch.rand(e, -(-rows // BLOCK), -(-cols // BLOCK), generator=torch.Generator().manual_seed(5)) + 0.5
    return {"": weight.to(torch.float8_e4m3fn), "_scale_inv": scales}


def _nvfp4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``[E, rows, cols]`` as NVFP4 bytes (two codes a byte), block scales per 16 columns, a global scale per expert
    and one input scale for all experts."""
    e, rows, cols = weight.shape
    gen = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 256, (e, rows, cols // 2), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(e, rows, cols // 16, generator=gen) + 0.5).to(torch.float8_e4m3fn)
    return {"": codes, "_weight_scale": scale, "_weight_scale_2": torch.rand(e, generator=gen),
            "_input_scale": torch.tensor(0.5)}  # fmt: skip


def _release(tmp_path: Path, quantise, config: dict) -> Path:  # noqa: ANN001
    """A tiny Qwen3-MoE in the module naming whose fused experts are quantised by ``quantise``."""
    src = tmp_path / "src"
    save_module_form(distinct(tiny_model("qwen3_moe", E)), src)
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        for suffix, tensor in quantise(tensors.pop(name)).items():
            tensors[name + suffix] = tensor.contiguous()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**raw, "quantization_config": config}))
    return src


def _rows(path: Path, name: str, rows: list[int] | None = None) -> bytes:
    ckpt = open_checkpoint(path)
    info = ckpt.tensors[name]
    with open(info.file, "rb") as f:
        f.seek(info.start)
        data = f.read(info.nbytes)
    if rows is None:
        return data
    row = info.nbytes // info.shape[0]
    return b"".join(data[r * row : (r + 1) * row] for r in rows)


@pytest.mark.parametrize(("quantise", "config"), [(_fp8, FP8), (_nvfp4, NVFP4)], ids=["fp8", "nvfp4"])
def test_a_data_free_prune_slices_the_companions_as_bytes(quantise, config: dict, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    src, out = _release(tmp_path, quantise, config), tmp_path / "out"
    layout = resolve_layout(open_checkpoint(src))
    sliced = {n for layer in layout.layers for n in layer.quantised if n in layer.fused}
    assert sliced and not any(n.endswith("_input_scale") for n in sliced)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # validation would run, but for these experts
        shutil.copy(ROOT / "fixtures" / "trained" / "tiny-mixtral-16e" / name, src / name)
    code, _, err = run_cli(["slim", str(src), "--keep", "4", "--criterion", "router-norm", "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "validation.json").read_text())["summary"]
    assert summary.startswith("structure checked; numeric comparison skipped: ") and "fused module naming" in summary
    kept = {e["layer"]: e["kept"] for e in json.loads((out / PLAN_NAME).read_text())["layers"]}
    before = open_checkpoint(src)
    for layer in layout.layers:
        for name in layer.fused:  # codes and companions: the kept experts' slices, in plan order, byte for byte
            assert _rows(out, name) == _rows(src, name, kept[layer.index]), name
            assert open_checkpoint(out).tensors[name].shape[0] == 4
    whole = [n for n in before.tensors if n.endswith("_input_scale")]
    assert all(_rows(out, n) == _rows(src, n) for n in whole)  # one value for every expert: left as it was
    assert len(whole) == (2 * len(layout.layers) if config is NVFP4 else 0)
    after = resolve_layout(open_checkpoint(out))  # the output reads again, companions with their weights
    assert (
        after.num_experts == 4 and {n for layer in after.layers for n in layer.quantised if n in layer.fused} == sliced
    )


@pytest.mark.parametrize("command", [["calibrate"], ["slim", "--keep", "4", "--criterion", "weight-norm"]])
def test_reading_them_is_refused_in_one_line(command: list[str], tmp_path: Path, capsys) -> None:
    src = _release(tmp_path, _fp8, FP8)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a tokenizer, so that only the experts are refused
        shutil.copy(ROOT / "fixtures" / "trained" / "tiny-mixtral-16e" / name, src / name)
    code, _, err = run_cli([command[0], str(src), *command[1:], "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "fp8 experts in the fused module naming (model.layers.0.mlp.experts.down_proj_scale_inv)" in err, err
    assert "router-norm" in err and "per-expert release" in err, err
    assert not (tmp_path / "out").exists()


def test_a_companion_without_an_expert_slice_on_dim_0_is_refused(tmp_path: Path, capsys) -> None:
    def across(weight: torch.Tensor) -> dict[str, torch.Tensor]:  # one scale per row, experts on dim 1
        return {"": weight.to(torch.float8_e4m3fn), "_scale_inv": torch.ones(weight.shape[1], weight.shape[0])}

    src = _release(tmp_path, across, {"quant_method": "fp8"})
    code, _, err = run_cli(["slim", str(src), "--keep", "4", "--criterion", "router-norm", "--no-validate", "--out",
                            str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "without one slice per expert on dim 0" in err and "per-expert release" in err, err
    assert not (tmp_path / "out").exists()
