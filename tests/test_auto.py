"""``--criterion auto`` (the default): every candidate's plan measured in the calibration stream, the best kept.

What the stream measures must be what a user would measure: each candidate's KL on the held-out calibration
batches equals the KL of an ordinary full transformers forward with that candidate's dropped experts masked,
and the plan auto writes is exactly the plan of ``--criterion WINNER`` on the same calibration.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from moeslim.calibrate.collect import Statistics, calibrate_layers
from moeslim.calibrate.trials import CANDIDATES, PlanTrials
from moeslim.criteria import DATA_FREE, layer_scores
from moeslim.layout import resolve_layout
from moeslim.pipeline import Job, SlimOptions, make_plan
from moeslim.plan import select_one
from moeslim.source import open_checkpoint
from moeslim.stream.masking import drop_experts_of
from moeslim.stream.options import CalibrationOptions
from moeslim.stream.runner import LayerRunner
from tests.conftest import run_cli, tree_digest

pytestmark = pytest.mark.slow

TOKENS = torch.randint(3, 128, (8, 20), generator=torch.Generator().manual_seed(2))  # 4 batches of 2: 1 held out
SMALL = CalibrationOptions(samples=8, seq_len=16, batch_size=2)


def _kl(original: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """KL(original ‖ pruned) per token ``(batch, seq)``."""
    lo, lp = (torch.log_softmax(x.float(), dim=-1) for x in (original, pruned))
    return (lo.exp() * (lo - lp)).sum(-1).clamp_min(0.0).double()


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "qwen3_moe"])
def test_streamed_kl_of_every_candidate_equals_a_full_forward(name: str, built: Callable[[str], Path]) -> None:
    src = built(name)
    ckpt = open_checkpoint(src)
    layout = resolve_layout(ckpt)
    keep = layout.num_experts // 2
    fixed = {c: DATA_FREE[c](ckpt, layout, None) for c in CANDIDATES if c in DATA_FREE}

    def scores(criterion: str, index: int, stats: Statistics) -> np.ndarray:
        return fixed[criterion][index] if criterion in fixed else layer_scores(criterion, stats, index)

    stats = Statistics(layout.num_experts)
    trials = PlanTrials(layout, keep, scores, stats)
    runner = LayerRunner(ckpt, layout)
    try:
        calibrate_layers(runner, TOKENS, 2, stats, trials)
    finally:
        runner.close()
    assert trials.held == [3]  # the last quarter of 4 batches
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    held = TOKENS[6:8]
    with torch.no_grad():
        original = model(input_ids=held).logits
        for criterion in CANDIDATES:
            kept = trials.kept[criterion]
            # the kept sets streamed are the criterion's plan from the finished statistics
            assert kept == {i: select_one(layout, scores(criterion, i, stats), keep) for i in stats.layers}
            with drop_experts_of(model, layout, kept):
                expected = _kl(original, model(input_ids=held).logits)
            assert trials.kl[criterion] == pytest.approx(float(expected.mean()), rel=1e-5, abs=1e-7), criterion
            per_sequence = expected.mean(-1).numpy()
            np.testing.assert_allclose(trials.per_sequence[criterion], per_sequence, rtol=1e-5, atol=1e-7)
    # ean stays unless a candidate is lower on every reading of the 2 held-out sequences' paired differences
    base = trials.per_sequence["ean"]
    better = [c for c in CANDIDATES if _significantly_lower(trials.per_sequence[c] - base)]
    assert trials.winner == min(better, key=lambda c: (trials.kl[c], CANDIDATES.index(c)), default="ean")
    assert len(set(trials.kl.values())) > 1  # the candidates' plans differ: the measurement decides something


def _significantly_lower(d: np.ndarray) -> bool:
    """mean + 1.96 × standard error < 0, written out: the 95 % normal interval of the mean lies below zero."""
    mean = sum(d) / len(d)
    sd = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5
    return bool(mean + 1.96 * sd / len(d) ** 0.5 < 0)


def test_the_incumbent_moves_only_for_a_difference_beyond_the_noise() -> None:
    """Differences (candidate − ean) per held-out sequence, and the 95 % normal bound of their mean by hand."""
    from moeslim.calibrate.trials import _below

    # mean −0.02, sd 0.01 (ddof 1: sqrt((0.0001 + 0 + 0.0001) / 2)), n 3: bound −0.02 + 1.96 × 0.01 / √3 = −0.0087
    assert _below(np.array([-0.03, -0.02, -0.01]))
    # mean −0.02, sd 0.05 (sqrt((0.0025 + 0 + 0.0025) / 2)), n 3: bound −0.02 + 1.96 × 0.05 / √3 = +0.0366
    assert not _below(np.array([-0.07, -0.02, 0.03]))
    assert not _below(np.array([-0.5]))  # one sequence has no spread to judge by
    assert not _below(np.array([0.0, 0.0]))  # the same plan


def test_auto_writes_exactly_the_winners_plan(built: Callable[[str], Path]) -> None:
    src = built("qwen3_moe")
    ckpt = open_checkpoint(src)
    layout = resolve_layout(ckpt)
    auto = make_plan(Job(src, ckpt, layout, SlimOptions(src, keep=4, calibration=SMALL)))
    winner = auto.calibration["auto"]["chose"]
    assert auto.criterion == winner and winner in CANDIDATES
    assert set(auto.calibration["auto"]["kl"]) == set(CANDIDATES)
    single = make_plan(Job(src, ckpt, layout, SlimOptions(src, keep=4, criterion=winner, calibration=SMALL)))
    assert auto.kept == single.kept and auto.scores == single.scores


def test_auto_is_reproducible_byte_for_byte(
    built: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = built("mixtral")
    small = ["--samples", "8", "--seq-len", "16", "--batch-size", "2", "--no-validate"]
    outs = [tmp_path / run / "pruned" for run in ("1", "2")]  # the same folder name: the card's title
    for out in outs:
        code, _, err = run_cli(["slim", str(src), "--keep", "4", *small, "--out", str(out)], capsys)
        assert code == 0, err
    a, b = (tree_digest(out) for out in outs)
    card = [(out / "README.md").read_text().replace(str(out), "OUT") for out in outs]
    assert card[0] == card[1]  # the model card differs only by the --out it quotes
    assert {k: v for k, v in a.items() if k != "README.md"} == {k: v for k, v in b.items() if k != "README.md"}


def test_auto_with_statistics_uses_their_ean_and_says_so(
    built: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = built("qwen3_moe")
    small = ["--samples", "8", "--seq-len", "16", "--batch-size", "2"]
    code, _, err = run_cli(["calibrate", str(src), *small, "--out", str(tmp_path / "stats")], capsys)
    assert code == 0, err
    for criterion in ([], ["--criterion", "ean"]):
        out = tmp_path / f"out{len(criterion)}"
        args = ["slim", str(src), "--keep", "4", *criterion, "--stats", str(tmp_path / "stats"), "--no-validate"]
        code, _, err = run_cli([*args, "--out", str(out)], capsys)
        assert code == 0, err
        assert ("using the statistics' ean scores" in err) == (not criterion)
    a, b = (tree_digest(tmp_path / out) for out in ("out0", "out2"))
    assert a.pop("README.md") != b.pop("README.md")  # the card quotes each command
    assert a == b  # the same plan, tensors and config


def test_auto_with_progressive_is_refused(built: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["slim", str(built("qwen3_moe")), "--keep", "4", "--progressive"], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        "moeslim: error: --progressive needs one calibrated criterion such as ean, not auto"
    ]


@pytest.mark.parametrize("criterion", ["auto", "ean", "reconstruction"])
def test_the_reconstruction_search_runs_only_when_its_criterion_asks(
    criterion: str, built: Callable[[str], Path]
) -> None:
    """Its greedy search was most of a calibration's CPU at real widths, and no other plan reads its scores."""
    import sys

    from moeslim.calibrate.reconstruction import ReconstructionSampler

    src = built("qwen3_moe")
    ckpt = open_checkpoint(src)
    searches = []

    def watch(frame, event, arg):  # noqa: ANN001, ANN202 - sys.setprofile's signature
        if event == "call" and frame.f_code is ReconstructionSampler.scores.__wrapped__.__code__:  # no_grad wraps it
            searches.append(frame)

    job = Job(src, ckpt, resolve_layout(ckpt), SlimOptions(src, keep=4, criterion=criterion, calibration=SMALL))
    sys.setprofile(watch)
    try:
        make_plan(job)
    finally:
        sys.setprofile(None)
    assert (len(searches) > 0) == (criterion == "reconstruction"), len(searches)
