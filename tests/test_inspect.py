"""``moeslim inspect``: the report describes the fixture as built, and its projection is what slim writes."""

from __future__ import annotations

import json
from pathlib import Path

from moeslim.source import open_checkpoint
from tests.conftest import run_cli


def test_inspect_json_describes_deepseek_v3_fixture(built, capsys) -> None:
    src = built("deepseek_v3_fp8")
    code, out, err = run_cli(["inspect", str(src), "--json", "--keep", "8"], capsys)
    assert code == 0, err
    r = json.loads(out)
    # built with first_k_dense_replace=1, 3 layers, 1 MTP layer, 16 experts in 4 groups, top-2 of 2 groups
    assert (r["family"], r["moe_layers"], r["dense_layers"], r["mtp_layers"]) == ("deepseek_v3", [1, 2], [0], [3])
    assert (r["experts_per_layer"], r["top_k"], r["n_group"], r["topk_group"], r["shared_experts"]) == (16, 2, 4, 2, 1)
    assert r["quantisation"] == ["fp8", "fp8-block"] and "F8_E4M3" in r["dtypes"]
    assert r["total_bytes"] == open_checkpoint(src).total_bytes


def test_projected_size_is_what_slim_writes(built, tmp_path: Path, capsys) -> None:
    for name, keep in (("gpt_oss_mxfp4", 4), ("deepseek_v3", 8), ("qwen2_moe", 2)):
        src = built(name)
        _, out, _ = run_cli(["inspect", str(src), "--json", "--keep", str(keep)], capsys)
        projected = json.loads(out)["projected_bytes"]
        args = ["slim", str(src), "--keep", str(keep), "--criterion", "router-norm", "--out", str(tmp_path / name)]
        code, _, err = run_cli(args, capsys)
        assert code == 0, err
        assert open_checkpoint(tmp_path / name).total_bytes == projected


def test_inspect_text_report(built, capsys) -> None:
    code, out, _ = run_cli(["inspect", str(built("llama4_text"))], capsys)
    assert code == 0
    assert "layers        4: MoE 1, 3; dense 0, 2; MTP -" in out  # interleave_moe_layer_step=2
    assert "8 per MoE layer, top-1, 1 shared" in out
