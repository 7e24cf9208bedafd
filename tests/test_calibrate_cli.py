"""`moeslim calibrate` and calibrated `slim`: statistics file, reuse, resume, progressive, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeslim.calibrate.capture import LayerStats, collect
from moeslim.layout import resolve_layout
from moeslim.source import open_checkpoint
from moeslim.stream.masking import drop_experts_of
from moeslim.stream.modules import moe_parts
from moeslim.stream.tokens import load_calibration
from tests.conftest import run_cli, tree_digest

pytestmark = pytest.mark.slow

WORDS = " ".join(f"w{i % 90}" for i in range(4000))  # words the fixture tokenizer maps to ids (or unk)
SMALL = ["--samples", "4", "--seq-len", "16", "--batch-size", "2"]


@pytest.fixture()
def calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(WORDS)
    return path


def _calibrate(src: Path, out: Path, calib: Path, capsys, *extra: str) -> tuple[int, str, str]:
    return run_cli(["calibrate", str(src), "--out", str(out), "--calib", str(calib), *SMALL, *extra], capsys)


def test_stats_file_feeds_slim_and_records_provenance(built, calib: Path, tmp_path: Path, capsys) -> None:
    src = built("qwen3_moe")
    code, out, err = _calibrate(src, tmp_path / "stats", calib, capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert meta["layers_done"] == [0, 1, 2] and meta["calibration"]["tokens"] == 64  # 4 × 16
    arrays = load_file(tmp_path / "stats" / "stats.safetensors")
    counts = arrays["layers.1.a.count"] + arrays["layers.1.b.count"]
    assert counts.sum() == 64 * 2  # every token routed to top-2 experts

    code, _, err = run_cli(
        ["slim", str(src), "--keep", "4", "--criterion", "frequency", "--stats", str(tmp_path / "stats"),
         "--out", str(tmp_path / "pruned")], capsys,
    )  # fmt: skip
    assert code == 0, err
    plan = json.loads((tmp_path / "pruned" / "moeslim_plan.json").read_text())
    assert plan["calibration"]["digest"] == meta["calibration"]["digest"]
    assert set(plan["calibration"]["stability"]) == {"0", "1", "2"}
    for entry in plan["layers"]:  # frequency: the most selected experts are kept
        c = arrays[f"layers.{entry['layer']}.a.count"] + arrays[f"layers.{entry['layer']}.b.count"]
        assert min(c[entry["kept"]]) >= max(np.delete(c, entry["kept"]))


def test_interrupted_calibration_resumes_to_the_same_statistics(built, calib: Path, tmp_path: Path, capsys) -> None:
    src = built("mixtral")
    assert _calibrate(src, tmp_path / "full", calib, capsys)[0] == 0
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    meta_path = tmp_path / "cut" / "stats.json"
    meta = json.loads(meta_path.read_text())
    meta["layers_done"] = [0]  # as if stopped after the first layer
    meta_path.write_text(json.dumps(meta))
    code, _, err = _calibrate(src, tmp_path / "cut", calib, capsys)
    assert code == 0, err
    full, cut = (load_file(tmp_path / d / "stats.safetensors") for d in ("full", "cut"))
    assert full.keys() == cut.keys() and all(np.array_equal(full[k], cut[k]) for k in full)


def test_progressive_calibrates_each_layer_on_the_pruned_ones_before(
    built, calib: Path, tmp_path: Path, capsys
) -> None:
    src = built("olmoe")
    code, _, err = run_cli(
        ["slim", str(src), "--keep", "4", "--criterion", "gate-mass", "--progressive", "--calib", str(calib),
         *SMALL, "--out", str(tmp_path / "p")], capsys,
    )  # fmt: skip
    assert code == 0, err
    plan = json.loads((tmp_path / "p" / "moeslim_plan.json").read_text())
    kept = {e["layer"]: tuple(e["kept"]) for e in plan["layers"]}
    assert plan["calibration"]["progressive"] is True
    # reference: the original model with layers 0-1 routing only to their kept experts; layer 2's gate mass
    tokens = load_calibration(str(calib), AutoTokenizer.from_pretrained(src), samples=4, seq_len=16, seed=0).tokens
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    stats = LayerStats(8)
    layout = resolve_layout(open_checkpoint(src))
    masked = drop_experts_of(model, layout, {0: kept[0], 1: kept[1], 2: tuple(range(8))})
    with masked, torch.no_grad(), collect(moe_parts(model, layout)[2], stats, "softmax"):
        for b in range(0, 4, 2):
            model(input_ids=tokens[b : b + 2])
    np.testing.assert_allclose(plan["layers"][2]["scores"], stats["gate_mass"], rtol=1e-5)


def _broken_calib(tmp_path: Path) -> Path:
    (tmp_path / "empty.txt").write_text("")
    return tmp_path / "empty.txt"


def _fails(code: int, err: str, message: str) -> None:
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_bad_calibration_input(built, calib: Path, tmp_path: Path, capsys) -> None:
    src = built("qwen3_moe")
    before = tree_digest(src)
    code, _, err = _calibrate(src, tmp_path / "s1", _broken_calib(tmp_path), capsys)
    _fails(code, err, "empty")
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    code, _, err = _calibrate(src, tmp_path / "s2", short, capsys)
    _fails(code, err, "--samples")
    assert tree_digest(src) == before

    no_tok = Path(shutil.copytree(src, tmp_path / "notok"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / f).unlink()
    code, _, err = _calibrate(no_tok, tmp_path / "s3", calib, capsys)
    _fails(code, err, "tokenizer")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is present")
def test_cuda_without_gpu_is_one_line(built, calib: Path, tmp_path: Path, capsys) -> None:
    code, _, err = _calibrate(built("qwen3_moe"), tmp_path / "s", calib, capsys, "--device", "cuda")
    _fails(code, err, "--device cuda asked for a GPU but torch sees no CUDA device")


def test_stats_of_another_model_are_refused(built, calib: Path, tmp_path: Path, capsys) -> None:
    assert _calibrate(built("olmoe"), tmp_path / "stats", calib, capsys)[0] == 0
    code, _, err = run_cli(
        ["slim", str(built("qwen3_moe")), "--keep", "4", "--criterion", "reap", "--stats", str(tmp_path / "stats"),
         "--out", str(tmp_path / "o")], capsys,
    )  # fmt: skip
    _fails(code, err, "collected on another model")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("quant", "method"),
    [
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "gptq 3-bit"),  # 2, 4 and 8 bits are read
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "awq gemv 4-bit"),  # the GEMM layout is read
        ({"quant_method": "modelopt", "quant_algo": "W4A8_AWQ"}, "modelopt W4A8_AWQ"),  # NVFP4 is read
        (
            {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"},
            "compressed-tensors nvfp4-pack-quantized",
        ),
    ],
)
def test_unreadable_quantisation_is_refused_with_the_way_out(
    built, calib: Path, tmp_path: Path, capsys, quant: dict, method: str
) -> None:
    src = Path(shutil.copytree(built("qwen3_moe"), tmp_path / "src"))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    code, _, err = run_cli(["slim", str(src), "--keep", "4", "--out", str(tmp_path / "o")], capsys)
    _fails(code, err, f"calibration cannot dequantise {method} checkpoints yet (it reads fp8 block-scaled, mxfp4")
    assert "use a data-free --criterion such as router-norm" in err
    assert not (tmp_path / "o").exists()
