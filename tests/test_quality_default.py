"""The quality study's statistics (``benchmarks/quality/significance.py``), and moeslim's default criterion
against the study's committed results (issue #6: "slim's defaults follow them")."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
sys.path.insert(0, str(QUALITY))

import render  # noqa: E402
from significance import Runs, choose_default, difference  # noqa: E402

from moeslim.criteria import DEFAULT_CRITERION  # noqa: E402


def runs(kl: list[list[float]], nll: list[list[float]] | None = None) -> Runs:
    return Runs(np.array(kl), np.array(nll if nll is not None else kl))


def test_a_constant_paired_shift_is_significant_however_noisy_the_sequences() -> None:
    """Sequences differ a lot from each other, but plan b is worse by exactly 0.01 on every one: paired, every
    bootstrap draw sees the same shift, so the interval is the point (an unpaired comparison would call it noise)."""
    base = [0.1, 0.9, 0.3, 1.5, 0.05, 0.7]
    d = difference(runs([base]), runs([[x + 0.01 for x in base]]), "kl")
    assert (d.point, d.low, d.high) == pytest.approx((0.01, 0.01, 0.01), abs=1e-12)
    assert d.verdict == "higher"
    same = difference(runs([base]), runs([base]), "kl")
    assert (same.point, same.low, same.high, same.verdict) == (0.0, 0.0, 0.0, "same")


def test_perplexity_is_exp_of_the_mean_nll_over_replicates_and_sequences() -> None:
    nll = [[1.0, 2.0], [3.0, 4.0]]  # two seeds × two sequences: mean NLL 2.5
    assert runs(nll).point("perplexity") == pytest.approx(math.exp(2.5), rel=1e-12)
    assert runs(nll).point("kl") == pytest.approx(2.5, rel=1e-12)


def test_seeds_that_disagree_widen_the_interval() -> None:
    """Two calibration seeds, one better and one worse than the rival by 0.2 on every sequence: no verdict."""
    rival = runs([[0.5, 0.5, 0.5, 0.5]])
    split = runs([[0.3, 0.3, 0.3, 0.3], [0.7, 0.7, 0.7, 0.7]])
    d = difference(rival, split, "kl")
    assert d.point == pytest.approx(0.0, abs=1e-12) and d.low < -0.1 and d.high > 0.1 and d.verdict == "same"


def test_the_rule_keeps_the_incumbent_among_equals_and_moves_off_a_loser() -> None:
    noisy = [0.2, 0.8, 0.4, 1.2, 0.3, 0.9, 0.6, 0.5]
    tied = {"fx": {"a": runs([noisy]), "b": runs([noisy]), "random": runs([[x + 0.5 for x in noisy]])}}
    assert choose_default(tied, ["a", "b"], incumbent="b")[0] == "b"
    # on a second fixture "b" is worse by 0.05 on every sequence: it loses both metrics there, "a" loses nothing
    worse = {"fx2": {"a": runs([noisy]), "b": runs([[x + 0.05 for x in noisy]]), "random": runs([noisy])}}
    choice, lost = choose_default({**tied, **worse}, ["a", "b"], incumbent="b")
    assert choice == "a"
    assert sorted(lost["b"]) == [("fx2", "kl", "a"), ("fx2", "kl", "random"),
                                 ("fx2", "perplexity", "a"), ("fx2", "perplexity", "random")]  # fmt: skip
    assert lost["a"] == []


def test_moeslim_default_is_the_one_the_committed_study_chooses() -> None:
    """Rerunning the study rewrites these JSON files; if the rule (over every fixture and every keep) then picks
    another criterion, this fails until ``moeslim.criteria.DEFAULT_CRITERION`` follows."""
    all_data = {name: render.load(QUALITY / f"{name}.json") for name in ("mixtral", "deepseek", "qwen3")}
    points = render.operating_points(all_data)
    assert len(points) == 8  # 3 fixtures × keep 75 %, 50 %, 25 %; DeepSeek's grouped router cannot keep 25 %
    assert all(DEFAULT_CRITERION in plans and len(plans[DEFAULT_CRITERION].kl[0]) == 256 for plans in points.values())
    choice, lost = render.decide_default(all_data)
    assert choice == DEFAULT_CRITERION, lost


def test_the_default_beats_the_best_single_criterion_at_every_keep() -> None:
    """Issue #13 on the committed study. On every fixture, keep and metric the default (``auto``'s plan, then the
    correction) is never significantly worse than the best single criterion there (chosen per keep and metric
    after the fact); at every keep of half the experts or fewer it is significantly better by both metrics; by KL
    it is significantly better at two keeps of every fixture (both of DeepSeek's: its grouped router cannot keep
    25 %)."""
    all_data = {name: render.load(QUALITY / f"{name}.json") for name in ("mixtral", "deepseek", "qwen3")}
    compared = render.against_best_single(all_data)
    assert len(compared) == 16  # 8 operating points × 2 metrics
    wins: dict[str, int] = {}
    for point, metric, best, _, _, d in compared:
        assert d.verdict != "higher", (point, metric, best, d)
        kept, experts = (int(n) for n in point.rsplit(" ", 1)[1].split("/"))
        if kept * 2 <= experts:
            assert d.verdict == "lower", (point, metric, best, d)
        if metric == "kl" and d.verdict == "lower":
            fixture = point.split(" keep")[0]
            wins[fixture] = wins.get(fixture, 0) + 1
    assert len(wins) == 3 and min(wins.values()) >= 2, wins
