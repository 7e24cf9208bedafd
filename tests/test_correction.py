"""The correction after pruning (``--correct``, on by default with calibration data): the kept experts' down
projections refit by ridge least squares so the pruned MoE output stays close to the original's.

What is checked: the fit is the least-squares solution its docstring writes (against numpy's own solver on
the explicit design matrix); through the real consumer, every unquantised family either comes out corrected
(the output loads in transformers, differs from the uncorrected output only in kept experts' down projections, and
its first MoE layer is closer to the original's on the calibration tokens) or says in the plan why not; ``--plan``
redoes it byte for byte; quantised models are left alone with a note, and refused when ``--correct`` asks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fixtures.build_fixtures import FIXTURES
from moeslim.correct.fit import RIDGE, LayerFit
from moeslim.layout import resolve_layout
from moeslim.source import open_checkpoint
from moeslim.stream.masking import mask_router
from moeslim.stream.modules import moe_parts
from moeslim.stream.ranks import SINGLE
from moeslim.stream.tokens import load_calibration
from tests.conftest import run_cli, tree_digest

pytestmark = pytest.mark.slow

SMALL = ["--samples", "8", "--seq-len", "16", "--batch-size", "2", "--no-validate"]
QUANTISED = ("mxfp4", "fp8", "int4")
UNQUANTISED = sorted(n for n in FIXTURES if not any(q in n for q in QUANTISED) and n != "qwen3_moe_multishard")
MUST_CORRECT = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss")  # the families the brief names


def _model(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)


@pytest.mark.parametrize("tokens", [300, 12])  # more tokens per expert than inner units, and fewer
def test_the_fit_is_ridge_least_squares_solved_by_numpy(tokens: int, built: Callable[[str], Path]) -> None:
    """Mixtral's experts: h_k = silu(gate x) * up x, computed here from the weights (not through the F.linear
    capture the fit uses); per kept expert, ΔW_kᵀ = argmin ‖diag(w) (H ΔWᵀ − E / s)‖² + λ' ‖ΔW‖² by ``lstsq`` on
    the stacked design [diag(w) H; √λ' I], λ' = λ × mean diag(Hᵀ diag(w²) H)."""
    src = built("mixtral")
    layout = resolve_layout(open_checkpoint(src))
    model = _model(src)
    parts = moe_parts(model, layout)[0]
    experts = layout.num_experts
    kept = tuple(range(0, experts, 2))
    x = torch.randn(tokens, parts.weight.shape[1], generator=torch.Generator().manual_seed(0))
    fit = LayerFit(parts, experts)
    with fit.capture(), torch.no_grad():
        parts.block(x[None])  # the original block: the fit sees its router's input and its experts' output
    deltas = fit.solve(kept, SINGLE)
    with torch.no_grad():
        _, w_full, i_full = parts.router(x)
        full = parts.experts(x, i_full, w_full)
        with mask_router(parts, kept, experts):
            _, w, idx = parts.router(x)
        share = ((full - parts.experts(x, idx, w)) / w.sum(-1, keepdim=True)).double().numpy()
    assert set(deltas) == {k for k in kept if (idx == k).any()} and deltas
    for k, delta in deltas.items():
        rows = (idx == k).any(-1).nonzero()[:, 0]
        weight = (w * (idx == k)).sum(-1)[rows].double().numpy()
        gate, up = torch.nn.functional.linear(x[rows], parts.experts.gate_up_proj[k]).chunk(2, dim=-1)
        h = (torch.nn.functional.silu(gate) * up).double().numpy()
        g = (h * weight[:, None] ** 2).T @ h
        lam = RIDGE * np.mean(np.diag(g))
        design = np.vstack([h * weight[:, None], np.sqrt(lam) * np.eye(h.shape[1])])
        target = np.vstack([share[rows.numpy()] * weight[:, None], np.zeros((h.shape[1], share.shape[1]))])
        expected = np.linalg.lstsq(design, target, rcond=None)[0].T
        # float32 sums and Cholesky against numpy's float64 lstsq
        np.testing.assert_allclose(delta.numpy(), expected, rtol=2e-3, atol=1e-5)


def _first_moe_error(pruned: Path, original: Path, ids: torch.Tensor) -> float:
    """Σ over the calibration tokens of ‖pruned block(u) − original block(u)‖², u the first MoE layer's block input
    in the pruned model (the original's too: nothing before it changes), both models loaded by transformers."""
    blocks = []
    for path in (pruned, original):
        model = _model(path)
        parts = moe_parts(model, resolve_layout(open_checkpoint(path)))
        blocks.append((model, parts[min(parts)].block))
    seen: list[torch.Tensor] = []
    handle = blocks[0][1].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        blocks[0][0](input_ids=ids)
        handle.remove()
        a, b = (block(seen[0]) for _, block in blocks)
    a, b = (t[0] if isinstance(t, tuple) else t for t in (a, b))
    return float(((a - b) ** 2).sum())


@pytest.mark.parametrize("name", UNQUANTISED)
def test_every_family_is_corrected_through_transformers_or_says_why_not(
    name: str, built: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = built(name)
    before = tree_digest(src)
    layout = resolve_layout(open_checkpoint(src))
    keep = str(max(layout.num_experts // 2, layout.top_k))
    outs = {flag: tmp_path / flag.strip("-") for flag in ("--correct", "--no-correct")}
    errs = {}
    for flag, out in outs.items():
        # a random plan drops experts the tokens use (a calibrated one may keep every expert a few tokens reach)
        plan = ["--criterion", "random", "--seed", "0"]
        code, _, err = run_cli(["slim", str(src), "--keep", keep, *plan, *SMALL, flag, "--out", str(out)], capsys)
        errs[flag] = err
        if flag == "--correct" and code == 2:  # refused in one line, nothing written
            assert name not in MUST_CORRECT, err
            assert "cannot correct the experts" in err and len(err.strip().splitlines()) == 1, err
            assert not out.exists()
            return
        assert code == 0, err
    assert tree_digest(src) == before  # the source is only read
    plan = json.loads((outs["--correct"] / "moeslim_plan.json").read_text())
    assert "correction" not in json.loads((outs["--no-correct"] / "moeslim_plan.json").read_text())
    record = plan["correction"]
    assert "method" in record, record
    a, b = (load_file(outs[f] / "model.safetensors") for f in ("--correct", "--no-correct"))
    assert a.keys() == b.keys()
    changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert changed and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in changed)
    assert len(changed) <= sum(record["experts"].values())  # at most one tensor per corrected expert (fused: fewer)
    # through transformers: the corrected first MoE layer is closer to the original's on the calibration tokens
    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = load_calibration(None, tokenizer, samples=8, seq_len=16, seed=0).tokens
    errors = {flag: _first_moe_error(out, src, ids) for flag, out in outs.items()}
    assert errors["--correct"] < errors["--no-correct"], errors


def test_plan_redoes_the_correction_byte_for_byte_and_needs_the_same_tokens(
    built: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = built("qwen3_moe")
    first = tmp_path / "first"
    code, _, err = run_cli(["slim", str(src), "--keep", "4", *SMALL, "--out", str(first)], capsys)
    assert code == 0, err
    assert "method" in json.loads((first / "moeslim_plan.json").read_text())["correction"]
    again = tmp_path / "again"
    code, _, err = run_cli(["slim", str(src), "--plan", str(first / "moeslim_plan.json"), *SMALL, "--out", str(again)],
                           capsys)  # fmt: skip
    assert code == 0, err
    a, b = tree_digest(first), tree_digest(again)
    assert a.pop("README.md") != b.pop("README.md")  # the card quotes each command
    assert a == b
    other = tmp_path / "other"
    args = ["slim", str(src), "--plan", str(first / "moeslim_plan.json"), *SMALL, "--seed", "1", "--out", str(other)]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "other calibration tokens" in err and len(err.strip().splitlines()) == 1, err
    assert not other.exists()
    code, _, err = run_cli([*args, "--no-correct"], capsys)
    assert code == 0, err
    assert "correction" not in json.loads((other / "moeslim_plan.json").read_text())


def test_quantised_experts_are_left_alone_with_a_note_and_refused_when_asked(
    built: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = built("qwen3_moe_int4")
    out = tmp_path / "out"
    code, _, err = run_cli(["slim", str(src), "--keep", "4", *SMALL, "--out", str(out)], capsys)
    assert code == 0, err
    assert "experts not corrected: its weights are quantised" in err
    assert "skipped" in json.loads((out / "moeslim_plan.json").read_text())["correction"]
    asked = tmp_path / "asked"
    code, _, err = run_cli(["slim", str(src), "--keep", "4", *SMALL, "--correct", "--out", str(asked)], capsys)
    assert code == 2 and "cannot correct the experts" in err and len(err.strip().splitlines()) == 1, err
    assert not asked.exists() and not list(tmp_path.glob(".asked*"))


def test_data_free_criteria_do_not_correct_unless_asked(
    built: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = built("mixtral")
    for flags, corrected in (([], False), (["--correct"], True)):
        out = tmp_path / f"out{len(flags)}"
        code, _, err = run_cli(["slim", str(src), "--keep", "4", "--criterion", "router-norm", *SMALL, *flags,
                                "--out", str(out)], capsys)  # fmt: skip
        assert code == 0, err
        plan = json.loads((out / "moeslim_plan.json").read_text())
        assert ("method" in plan.get("correction", {})) == corrected
