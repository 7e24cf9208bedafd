"""Routed experts streamed from disk a chunk at a time (``stream/chunks.py``) give the whole-layer path's results:
statistics, plans, corrected tensors and validation metrics, on fixtures of every routing kind (softmax top-k,
sigmoid with groups and a correction bias plus shared experts, fused on-disk experts with biases), with a chunk
of one expert; and a streamed layer never holds more experts than its chunk.

Tolerance: float sums and matrix products over other row counts round differently (measured: 7e-7 relative on
statistics, 3e-6 on validation metrics); statistics are compared to 1e-5 relative, metrics to 1e-4, corrected
tensors to 1e-4 relative of their largest value. Counts and kept sets are exact. The reconstruction criterion's
removal order is not compared: experts whose removal changes the output by the same amount up to rounding (those
no token chose) swap places.

Every calibratable family of the installed transformers is compared with a chunk of one expert in
``test_every_family.py`` (statistics against the family's own full forward).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from moeslim.calibrate.capture import FIELDS, Statistics
from moeslim.calibrate.collect import calibrate_layers
from moeslim.families.table import text_config
from moeslim.layout import resolve_layout
from moeslim.source import open_checkpoint
from moeslim.stream.chunks import ExpertChunks
from moeslim.stream.dequant import fp8_dense
from moeslim.stream.runner import LayerRunner
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "fixtures" / "trained"
DATA = ["--samples", "4", "--seq-len", "16", "--batch-size", "2"]


def _source(name: str, built: Callable[[str], Path]) -> Path:
    return TRAINED / name if (TRAINED / name).is_dir() else built(name)


def _slim(src: Path, out: Path, capsys, monkeypatch, chunk: int | None) -> dict:  # noqa: ANN001
    if chunk is None:
        monkeypatch.delenv("MOESLIM_EXPERT_CHUNK", raising=False)
    else:
        monkeypatch.setenv("MOESLIM_EXPERT_CHUNK", str(chunk))
    keep = resolve_layout(open_checkpoint(src)).num_experts // 2
    code, _, err = run_cli(["slim", str(src), "--keep", str(keep), "--out", str(out), *DATA], capsys)
    assert code == 0, err
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return {
        "plan": json.loads((out / "moeslim_plan.json").read_text()),
        "validation": json.loads((out / "validation.json").read_text()),
        "tensors": tensors,
    }


@pytest.mark.parametrize("name", ["tiny-deepseek-16e", "gpt_oss"])
def test_default_slim_with_one_expert_at_a_time_equals_whole_layers(
    name: str, built: Callable[[str], Path], tmp_path: Path, capsys, monkeypatch
) -> None:
    src = _source(name, built)
    whole = _slim(src, tmp_path / "whole", capsys, monkeypatch, None)
    chunked = _slim(src, tmp_path / "chunked", capsys, monkeypatch, 1)
    kept = [(entry["layer"], entry["kept"]) for entry in whole["plan"]["layers"]]
    assert kept == [(entry["layer"], entry["kept"]) for entry in chunked["plan"]["layers"]]
    assert whole["plan"]["criterion"] == chunked["plan"]["criterion"]
    assert sorted(whole["tensors"]) == sorted(chunked["tensors"])
    for key, value in whole["tensors"].items():
        other = chunked["tensors"][key]
        scale = float(np.abs(value.astype(np.float64)).max()) or 1.0
        assert np.abs(value.astype(np.float64) - other.astype(np.float64)).max() <= 1e-4 * scale, key
    a, b = whole["validation"], chunked["validation"]
    for metric in ("kl_mean", "kl_p95", "top1_agreement", "perplexity_original", "perplexity_pruned"):
        assert b[metric] == pytest.approx(a[metric], rel=1e-4, abs=1e-7), metric
    for x, y in zip(a["layers"], b["layers"], strict=True):
        assert y["relative_error"] == pytest.approx(x["relative_error"], rel=1e-4)


@pytest.mark.parametrize(
    ("name", "chunk"), [("tiny-qwen3-64e", 1), ("tiny-qwen3-64e", 5), ("gpt_oss", 3), ("deepseek_v3_fp8", 3)]
)
def test_statistics_streamed_in_chunks_equal_whole_layers(name: str, chunk: int, built: Callable[[str], Path]) -> None:
    """A chunk size that does not divide the experts (64 = 12 × 5 + 4, 8 = 2 × 3 + 2) leaves a short last chunk;
    the statistics are those of whole layers, and no chunk ever holds more than ``chunk`` experts' weights."""
    src = _source(name, built)
    ckpt = open_checkpoint(src)
    layout = resolve_layout(ckpt)
    vocab = int(text_config(ckpt.config)["vocab_size"])
    tokens = torch.randint(3, min(200, vocab), (8, 16), generator=torch.Generator().manual_seed(1))
    widest: list[int] = []

    def run(size: int | None, monkeypatch: pytest.MonkeyPatch) -> Statistics:
        runner = LayerRunner(ckpt, layout, expert_chunk=size)
        cls = type(next(iter(runner.parts.values())).experts)
        forward = cls.forward

        def recording(module: torch.nn.Module, hidden: object, index: object, weight: object, *args: object) -> object:
            # three named arguments, as the experts module's own (moeslim tells routed experts by them)
            # the experts' weights present whenever the module computes (dim 0: one slice per expert here)
            widest.append(max((p.shape[0] for p in module.parameters() if not p.is_meta), default=0))
            return forward(module, hidden, index, weight, *args)

        monkeypatch.setattr(cls, "forward", recording)
        try:
            return calibrate_layers(runner, tokens, 2, Statistics(layout.num_experts))
        finally:
            runner.close()
            monkeypatch.undo()

    with pytest.MonkeyPatch.context() as monkeypatch:
        whole = run(None, monkeypatch)
    assert max(widest) == layout.num_experts  # the recording sees the weights
    widest.clear()
    with pytest.MonkeyPatch.context() as monkeypatch:
        chunked = run(chunk, monkeypatch)
    assert widest and max(widest) == chunk, widest
    for index in whole.layers:
        a, b = whole.total(index), chunked.total(index)
        assert np.array_equal(a["count"], b["count"]), index
        for field in FIELDS:
            np.testing.assert_allclose(b[field], a[field], rtol=1e-5, atol=1e-9, err_msg=f"{index} {field}")


def test_a_streamed_run_holds_no_whole_layer_of_experts(built: Callable[[str], Path]) -> None:
    """With a chunk, the layer's experts module is loaded as chunk-sized parameters and left on the meta device
    between chunks: after the run, nothing of it is resident."""
    ckpt = open_checkpoint(TRAINED / "tiny-qwen3-64e")
    layout = resolve_layout(ckpt)
    runner = LayerRunner(ckpt, layout, expert_chunk=4)
    try:
        with runner.loaded(layout.layers[0].index):
            experts = runner.experts_of(layout.layers[0].index)
            assert isinstance(experts, ExpertChunks)
            assert all(p.is_meta for p in runner.parts[layout.layers[0].index].experts.parameters())
            seen = [chunk.stop - chunk.start for chunk in experts.chunks(range(layout.num_experts))]
    finally:
        runner.close()
    assert seen == [4] * (layout.num_experts // 4)


def test_fp8_dequantisation_is_exact_for_every_code() -> None:
    """The integer route from float8 e4m3 to float16 gives torch's own conversion for all 256 codes (NaN aside),
    with block scales applied by broadcasting as by repetition."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(2, 128)
    scales = torch.tensor([[0.5, 3.0]])  # one block of 2 × 64 each
    dense = fp8_dense(codes.repeat(1, 1), scales, (2, 64))
    expected = codes.to(torch.float32) * scales.repeat_interleave(2, 0).repeat_interleave(64, 1)
    finite = ~expected.isnan()
    assert torch.equal(dense[finite], expected[finite])
    assert dense[~finite].isnan().all()


def test_a_non_finite_expert_read_in_a_chunk_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """An inf in one expert's weights, met while its chunk is read, is a corrupt checkpoint in one line naming the
    layer and the chunk's experts, as whole layers name it."""
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file

    src = tmp_path / "src"
    shutil.copytree(TRAINED / "tiny-deepseek-16e", src)
    shard = next(src.glob("*.safetensors"))
    tensors = load_torch(str(shard))
    name = next(n for n in sorted(tensors) if ".mlp.experts.5." in n and n.endswith("up_proj.weight"))
    tensors[name][0, 0] = float("inf")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    monkeypatch.setenv("MOESLIM_EXPERT_CHUNK", "2")
    code, _, err = run_cli(["calibrate", str(src), "--out", str(tmp_path / "stats"), *DATA], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    layer = name.split(".")[2]
    assert f"layer {layer}, experts 4-5: non-finite values (inf)" in lines[0], err
    assert not (tmp_path / "stats").exists()
