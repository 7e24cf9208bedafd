"""Selection, feasibility and the plan file: pure functions on small hand-made layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moeslim.errors import PlanError
from moeslim.families.table import FAMILIES
from moeslim.layout import Layout, MoeLayer
from moeslim.plan import Plan, check_feasible, check_plan, load_plan, select


def layout(family: str = "mixtral", experts: int = 8, top_k: int = 2, n_group: int = 1, topk_group: int = 1) -> Layout:
    layers = tuple(MoeLayer(i, f"model.layers.{i}.mlp.", (), (), (), False) for i in (1, 2))
    return Layout(FAMILIES[family], experts, top_k, n_group, topk_group, 3, layers)


def test_select_keeps_highest_scores_ascending() -> None:
    scores = {1: np.array([0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.0, 0.4]), 2: np.arange(8.0)}
    kept = select(layout(), scores, 3)
    assert kept == {1: (1, 3, 5), 2: (5, 6, 7)}


def test_select_breaks_ties_towards_lower_ids() -> None:
    kept = select(layout(), {1: np.ones(8), 2: np.zeros(8)}, 2)
    assert kept == {1: (0, 1), 2: (0, 1)}


def test_select_keeps_the_same_count_in_every_group() -> None:
    # group 0 = experts 0-3 holds the four best scores overall, yet group 1 must keep two as well
    scores = {i: np.array([9.0, 8, 7, 6, 1, 2, 3, 4]) for i in (1, 2)}
    kept = select(layout("deepseek_v3", n_group=2, topk_group=1), scores, 4)
    assert kept[1] == (0, 1, 6, 7)


@pytest.mark.parametrize(
    ("lay", "keep", "top_k", "message"),
    [
        (layout(), 8, 2, "between 1 and 7"),
        (layout(), 0, 2, "between 1 and 7"),
        (layout(), 1, 2, "below the router's top-k 2"),
        (layout(), 4, 3, "--top-k 3 must be between 1 and the model's top-k 2"),
        (layout("deepseek_v3", 16, 2, n_group=4, topk_group=2), 6, 2, "multiple of 4"),
        (layout("deepseek_v3", 16, 2, n_group=4, topk_group=2), 4, 1, "at least 2 per group"),
        (layout("deepseek_v3", 16, 6, n_group=4, topk_group=2), 8, 6, "fewer than top-k 6"),  # 2 groups × 2 < 6
    ],
)
def test_infeasible_requests_fail_before_work(lay: Layout, keep: int, top_k: int, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        check_feasible(lay, keep, top_k)


def test_lower_top_k_makes_small_keep_feasible() -> None:
    check_feasible(layout(), 1, 1)
    check_feasible(layout("deepseek_v3", 16, 4, n_group=4, topk_group=2), 8, 4)  # 2 groups × 2 = 4


def test_plan_json_round_trip(tmp_path: Path) -> None:
    plan = Plan("mixtral", 8, 2, {1: (0, 3, 5, 6), 2: (1, 2, 4, 7)}, "random", seed=5, scores={1: (0.5,) * 8})
    assert load_plan_text(plan.to_json(), tmp_path) == plan
    calibrated = Plan("mixtral", 8, 2, {1: (0, 1)}, "reap", calibration={"tokens": 4096, "data": "calib.txt"})
    assert load_plan_text(calibrated.to_json(), tmp_path) == calibrated
    (tmp_path / "plan.json").write_text(plan.to_json())
    assert load_plan(tmp_path / "plan.json") == plan


def load_plan_text(text: str, tmp_path: Path) -> Plan:
    (tmp_path / "p.json").write_text(text)
    return load_plan(tmp_path / "p.json")


def test_plan_for_other_layers_or_unbalanced_groups_is_refused() -> None:
    with pytest.raises(PlanError, match="names layers"):
        check_plan(Plan("mixtral", 8, 2, {1: (0, 1, 2, 3)}, "x"), layout())
    with pytest.raises(PlanError, match="per routing group"):
        grouped = layout("deepseek_v3", 8, 2, n_group=2, topk_group=1)
        check_plan(Plan("deepseek_v3", 8, 2, {1: (0, 1, 2, 4), 2: (0, 1, 4, 5)}, "x"), grouped)
    with pytest.raises(PlanError, match="distinct, ascending"):
        check_plan(Plan("mixtral", 8, 2, {1: (3, 1), 2: (0, 1)}, "x"), layout())
    with pytest.raises(PlanError, match="qwen3_moe model"):
        check_plan(Plan("qwen3_moe", 8, 2, {1: (0, 1), 2: (0, 1)}, "x"), layout())


def test_not_a_plan_file(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text('{"format": "other"}')
    with pytest.raises(PlanError, match="not a moeslim plan"):
        load_plan(tmp_path / "p.json")
