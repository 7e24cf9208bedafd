"""One ``inf`` or ``nan`` in a checkpoint stops `moeslim calibrate` and `moeslim validate` with one line naming the
layer, the expert and the on-disk tensor; a validation whose numbers come out non-finite fails, never reports NaN."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeslim.source import open_checkpoint
from tests.conftest import run_cli, tree_digest

pytestmark = pytest.mark.slow

TRAINED = Path(__file__).resolve().parents[1] / "fixtures" / "trained" / "tiny-mixtral-16e"  # per-expert tensors
CALIBRATE = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "--reconstruction-tokens", "0"]
VALIDATE = ["--samples", "4", "--seq-len", "16", "--generations", "0"]
EXPERT_W1 = "model.layers.2.block_sparse_moe.experts.5.w1.weight"


def edited(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` whose (single) weights file is rewritten after ``edit``."""
    model = Path(shutil.copytree(src, dst))
    files = {info.file for info in open_checkpoint(model).tensors.values()}
    assert len(files) == 1
    path = files.pop()
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return model


def poke(name: str, value: float, index: int = 7) -> Callable[[dict[str, torch.Tensor]], None]:
    """An edit putting ``value`` at flat ``index`` of tensor ``name``."""

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name].view(-1)[index] = value

    return edit


def one_line(code: int, err: str, expected: str) -> None:
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err == f"moeslim: error: {expected}\n"


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_a_non_finite_expert_weight_is_named_by_calibrate_and_validate(
    value: float, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = edited(TRAINED, tmp_path / "model", poke(EXPERT_W1, value))
    before = tree_digest(model)
    expected = (
        f"layer 2, expert 5: non-finite values ({value}) in {EXPERT_W1}; the checkpoint is corrupt: re-download it,"
        " or drop that expert with a --plan and --no-validate"
    )
    code, _, err = run_cli(["calibrate", str(model), "--out", str(tmp_path / "stats"), *CALIBRATE], capsys)
    one_line(code, err, expected)
    for original, pruned in ((model, TRAINED), (TRAINED, model)):  # either side of the comparison
        code, _, err = run_cli(["validate", str(original), str(pruned), *VALIDATE], capsys)
        one_line(code, err, expected)
    assert tree_digest(model) == before


def test_a_fused_expert_tensor_names_the_expert_by_its_row(
    built: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """gpt-oss stores experts fused on disk (``[E, H, 2I]``): the expert is the non-finite row."""
    name = "model.layers.1.mlp.experts.gate_up_proj"

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][3, 0, 1] = float("nan")
        tensors[name][6, 2, 0] = float("-inf")

    model = edited(built("gpt_oss"), tmp_path / "model", edit)
    code, _, err = run_cli(["calibrate", str(model), "--out", str(tmp_path / "stats"), *CALIBRATE], capsys)
    one_line(
        code, err,
        f"layer 1, experts 3, 6: non-finite values (inf and nan) in {name}; the checkpoint is corrupt:"
        " re-download it, or drop those experts with a --plan and --no-validate",
    )  # fmt: skip


def test_a_non_finite_attention_weight_names_the_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = "model.layers.1.self_attn.q_proj.weight"
    model = edited(TRAINED, tmp_path / "model", poke(name, float("-inf")))
    code, _, err = run_cli(["validate", str(TRAINED), str(model), *VALIDATE], capsys)
    one_line(code, err, f"layer 1: non-finite values (inf) in {name}; the checkpoint is corrupt: re-download it")


def test_a_weight_beyond_float16_is_named_with_the_way_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1e5 is finite in the float32 checkpoint but not in float16 (largest 65504): the dtype is at fault."""
    model = edited(TRAINED, tmp_path / "model", poke("model.layers.1.post_attention_layernorm.weight", 1e5))
    code, _, err = run_cli(
        ["calibrate", str(model), "--out", str(tmp_path / "stats"), *CALIBRATE, "--dtype", "float16"], capsys
    )
    one_line(
        code, err,
        "layer 1: model.layers.1.post_attention_layernorm.weight is finite in the checkpoint but not once converted"
        " to float16 (its values exceed that dtype's range); use --dtype float32",
    )  # fmt: skip


def test_validation_that_overflows_float16_fails_instead_of_reporting_nan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Layer 1's MLP input scaled by 3000: every weight fits float16, its activations do not."""

    def scale(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.1.post_attention_layernorm.weight"] *= 3000

    model = edited(TRAINED, tmp_path / "model", scale)
    code, _, err = run_cli(["validate", str(model), str(model), *VALIDATE, "--dtype", "float16"], capsys)
    one_line(
        code, err,
        "validation computed non-finite values (relative_error nan) after layer 1 in float16: the activations"
        " overflow that dtype; rerun with --dtype float32",
    )  # fmt: skip
    assert not (model / "validation.json").exists()
    code, out, err = run_cli(["validate", str(model), str(model), *VALIDATE], capsys)  # float32: finite, exact
    assert code == 0, err
    assert "nan" not in out.lower()
