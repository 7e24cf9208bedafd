"""``moeslim validate`` and the validation at the end of ``slim``: exactness, agreement with a full-model
forward, ranking of plans, the structural check, exit codes and the report in the model card."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moeslim.cli import main
from moeslim.layout import resolve_layout
from moeslim.source import open_checkpoint
from moeslim.stream.context import load_tokenizer
from moeslim.surgery.files import copy_files, extra_files
from moeslim.surgery.mapping import plan_outputs
from moeslim.surgery.writer import plan_shards, write_checkpoint
from moeslim.validate.heldout import load_heldout
from moeslim.validate.run import ValidateOptions, plan_calibration, validate
from tests.conftest import run_cli

TRAINED = Path(__file__).resolve().parents[1] / "fixtures" / "trained" / "tiny-mixtral-16e"
QUICK = ValidateOptions(samples=4, seq_len=64, batch_size=3, generations=0)  # 3 does not divide 4: a short batch
QUICK_CLI = ["--samples", "4", "--seq-len", "64", "--generations", "0"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The trained fixture pruned to 8 of 16 experts: by the default criterion and by a random plan."""
    root = tmp_path_factory.mktemp("validate")
    out = {"random": root / "random", "default": root / "default"}
    for name, extra in (("random", ["--criterion", "random", "--seed", "0"]),
                        ("default", [])):  # fmt: skip
        saved, sys.argv = sys.argv, ["moeslim", "slim", str(TRAINED), "--keep", "8", "--out", str(out[name]), *extra]
        try:
            main()  # the real entry point, in-process (capsys is function-scoped)
        finally:
            sys.argv = saved
    return out


def test_self_validation_is_exactly_zero() -> None:
    report = validate(TRAINED, TRAINED, QUICK)
    assert report["kl_mean"] == 0.0 and report["kl_p95"] == 0.0 and report["top1_agreement"] == 1.0
    assert report["perplexity_original"] == report["perplexity_pruned"]
    assert [e["relative_error"] for e in report["layers"]] == [0.0] * 4
    assert report["scored_tokens"] == 4 * 63  # every position with a next token


def test_keeping_every_expert_is_exactly_zero(tmp_path: Path) -> None:
    """Surgery with all 16 experts kept (renumbered onto themselves) must validate as the same model."""
    ckpt = open_checkpoint(TRAINED)
    layout = resolve_layout(ckpt)
    outputs = plan_outputs(ckpt, layout, {i: tuple(range(16)) for i in layout.moe_indices})
    write_checkpoint(tmp_path, plan_shards(outputs, "5GB"), {"format": "pt"})
    copy_files(TRAINED, extra_files(TRAINED, ckpt.shards)[0], tmp_path)  # tokenizer and the like
    shutil.copy(TRAINED / "config.json", tmp_path)  # the expert count is unchanged
    report = validate(TRAINED, tmp_path, QUICK)
    assert (report["kl_mean"], report["kl_p95"], report["top1_agreement"]) == (0.0, 0.0, 1.0)


@torch.no_grad()
def reference(original: Path, pruned: Path, tokens: torch.Tensor) -> dict:
    """The report's metrics from two whole models loaded by transformers, computed independently."""
    logp, outputs = [], []
    for folder in (original, pruned):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        layers: list[torch.Tensor] = []
        hooks = [layer.register_forward_hook(lambda m, i, o, keep=layers.append: keep(o[0] if isinstance(o, tuple) else o))
                 for layer in model.model.layers]  # fmt: skip
        logits = model(input_ids=tokens).logits[:, :-1]
        for h in hooks:
            h.remove()
        logp.append(torch.log_softmax(logits.double(), -1))
        outputs.append(layers)
    a, b = logp
    kl_rows = (a.exp() * (a - b)).sum(-1).numpy()  # (sequences, positions)
    kl = kl_rows.flatten()
    targets = tokens[:, 1:, None]
    nll = [-x.gather(-1, targets)[..., 0].mean(-1).numpy() for x in (a, b)]  # (sequences,) each
    return {
        "per_sequence": {"kl": kl_rows.mean(-1), "nll_original": nll[0], "nll_pruned": nll[1]},
        "kl_mean": kl.mean(),
        "kl_p95": np.percentile(kl, 95),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).double().mean().item(),
        "perplexity_original": math.exp(-a.gather(-1, targets).mean().item()),
        "perplexity_pruned": math.exp(-b.gather(-1, targets).mean().item()),
        "errors": [float((y - x).norm() / x.norm()) for x, y in zip(*outputs, strict=True)],
    }


def assert_matches_reference(original: Path, pruned: Path, opts: ValidateOptions) -> dict:
    report = validate(original, pruned, opts)
    ckpt = open_checkpoint(pruned)
    held = load_heldout(opts.calib, load_tokenizer(ckpt), plan_calibration(pruned), samples=opts.samples,
                        seq_len=opts.seq_len, seed=opts.seed)  # fmt: skip
    assert held.digest == report["data"]["digest"]  # the same tokens as the report's
    ref = reference(original, pruned, held.tokens)
    for key in ("kl_mean", "kl_p95", "top1_agreement", "perplexity_original", "perplexity_pruned"):
        assert report[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key
    for key, values in ref["per_sequence"].items():  # paired values, one per held-out sequence, in order
        assert report["per_sequence"][key] == pytest.approx(values.tolist(), rel=1e-6, abs=1e-9), key
    moe = {e["layer"]: e["relative_error"] for e in report["layers"]}
    for i, error in moe.items():
        assert error == pytest.approx(ref["errors"][i], rel=1e-5), i
    return report


def test_streaming_equals_full_models_on_the_trained_fixture(pruned: dict[str, Path]) -> None:
    report = assert_matches_reference(TRAINED, pruned["random"], QUICK)
    assert report["kl_mean"] > 0.05  # a real difference was measured, not two copies


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_streaming_equals_full_models_across_families(built, family: str, tmp_path: Path, capsys) -> None:
    """Shared experts, grouped sigmoid routing with an MTP layer, fused experts with biases."""
    src = built(family)
    keep = {"qwen2_moe": "4", "deepseek_v3": "8", "gpt_oss": "4"}[family]  # 4 groups of 4: 2 per group
    code, _, err = run_cli(["slim", str(src), "--keep", keep, "--out", str(tmp_path / "o"), "--no-validate"], capsys)
    assert code == 0, err
    assert_matches_reference(src, tmp_path / "o", QUICK)


def test_random_plan_ranks_clearly_worse_than_the_default_criterion(pruned: dict[str, Path]) -> None:
    reports = {name: json.loads((folder / "validation.json").read_text()) for name, folder in pruned.items()}
    default, random = reports["default"], reports["random"]
    # seeded runs on this fixture, 8 × 128 held-out tokens: default (ean, calibrated on 64 × 256 stdlib tokens)
    # 0.146 mean KL, top-1 0.756, ppl 38.5; random seed 0: 0.614, 0.488, 64.2 (original ppl 36.4)
    assert random["kl_mean"] > 2 * default["kl_mean"]
    assert random["top1_agreement"] < default["top1_agreement"]
    assert random["perplexity_pruned"] > default["perplexity_pruned"]
    # the default criterion calibrated on stdlib files: validation read none of them (verified by digest)
    assert default["data"]["disjoint_from_calibration"] is True
    assert random["data"]["disjoint_from_calibration"] is None  # data-free: nothing to avoid


def test_report_is_saved_and_shown_in_the_card(pruned: dict[str, Path]) -> None:
    report = json.loads((pruned["random"] / "validation.json").read_text())
    assert (report["original"], report["pruned"]) == (str(TRAINED), ".")  # no temporary folder names
    assert len(report["generations"]) == 3 and all(g["original"] for g in report["generations"])
    card = (pruned["random"] / "README.md").read_text()
    assert f"| KL(original ‖ pruned), mean per token | {report['kl_mean']:.4g} |" in card
    assert "| top-1 agreement |" in card and "held-out tokens" in card


def test_cli_table_json_and_max_kl_exit_codes(pruned: dict[str, Path], tmp_path: Path, capsys) -> None:
    folder = pruned["random"]
    args = ["validate", str(TRAINED), str(folder), *QUICK_CLI, "--json", str(tmp_path / "r.json")]
    code, out, err = run_cli([*args, "--max-kl", "100"], capsys)
    assert code == 0, err
    assert "top-1 agreement" in out and "relative error (cumulative)" in out
    assert json.loads((tmp_path / "r.json").read_text())["kl_mean"] > 0
    code, out, err = run_cli([*args, "--max-kl", "0.01"], capsys)
    assert code == 1
    assert err.count("\n") == 1 and "exceeds --max-kl 0.01" in err
    code, _, err = run_cli(["validate", str(TRAINED), str(tmp_path / "nowhere")], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("moeslim: error:")


def broken_copy(src: Path, dst: Path, drop: str | None = None, **config: int) -> Path:
    shutil.copytree(src, dst)
    if drop:
        tensors = load_file(dst / "model.safetensors")
        del tensors[drop]
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    data = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**data, **config}))
    return dst


@pytest.mark.parametrize(
    ("drop", "config", "expected"),
    [
        ("model.layers.1.block_sparse_moe.experts.3.w2.weight", {},
         "missing model.layers.1.block_sparse_moe.experts.3.w2.weight (layer 1, expert 3)"),
        (None, {"num_local_experts": 16},
         "missing model.layers.0.block_sparse_moe.experts.8.w1.weight (layer 0, expert 8)"),
        (None, {"num_local_experts": 6},
         "holds model.layers.0.block_sparse_moe.experts.6.w1.weight (layer 0, expert 6) but config.json says 6"),
        ("model.layers.2.self_attn.q_proj.weight", {},
         "missing model.layers.2.self_attn.q_proj.weight (layer 2), which transformers expects"),
        (None, {"num_experts_per_tok": 9}, "config.json routes each token to top-k 9 of 8 experts"),
    ],
)  # fmt: skip
def test_structural_check_names_layer_and_tensor(
    pruned: dict[str, Path], tmp_path: Path, capsys, drop: str | None, config: dict, expected: str
) -> None:
    broken = broken_copy(pruned["random"], tmp_path / "broken", drop, **config)
    code, _, err = run_cli(["validate", str(TRAINED), str(broken), *QUICK_CLI], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert expected in err


def test_fused_family_expert_count_mismatch(built, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["slim", str(built("gpt_oss")), "--keep", "4", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    broken = broken_copy(tmp_path / "o", tmp_path / "broken", num_local_experts=8)
    code, _, err = run_cli(["validate", str(built("gpt_oss")), str(broken), *QUICK_CLI], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "layer 0: model.layers.0.mlp.router." in err and "but config says 8 experts" in err


def test_without_a_tokenizer_structure_is_checked_and_numbers_skipped(built, tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    shutil.copytree(built("olmoe"), src)
    (src / "tokenizer.json").unlink()
    (src / "tokenizer_config.json").unlink()
    code, out, err = run_cli(
        ["slim", str(src), "--keep", "4", "--criterion", "router-norm", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 0, err
    assert "numeric comparison skipped: no tokenizer" in out
    report = json.loads((tmp_path / "o" / "validation.json").read_text())
    assert report["structure"]["ok"] is True and "kl_mean" not in report
    assert "numeric comparison skipped: no tokenizer" in (tmp_path / "o" / "README.md").read_text()
