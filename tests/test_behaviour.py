"""The CLI behaves exactly as recorded in tests/behaviour/behaviour.json (before the calibration/validation
refactor): statistics, plans, output tensor hashes and validation metrics of every criterion on four fixtures.

A difference that is intended is re-recorded with ``python tests/behaviour/record.py --write`` and reviewed in
the diff of behaviour.json.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import transformers

from tests.behaviour.record import BUILT, RECORD, compare, record, summary

ROOT = Path(__file__).resolve().parents[1]


def _written_by_transformers(problem: str) -> bool:
    """A difference in what the installed transformers' ``save_pretrained`` writes into a built fixture's config.json
    (the keys it saves, its version string) and so in the calibration fingerprint, which hashes that config with the
    router bytes: ``fixtures/gpt_oss/slim/C/config/...``, ``fixtures/gpt_oss/calibrate/meta/model/fingerprint``."""
    parts = problem.split(":")[0].split("/")
    if len(parts) < 4 or parts[1] not in BUILT:
        return False
    return (parts[2] == "slim" and parts[4:5] == ["config"]) or parts[2:] == [
        "calibrate",
        "meta",
        "model",
        "fingerprint",
    ]


@pytest.mark.slow
def test_cli_behaviour_matches_the_record() -> None:
    """Recompute the whole record through the CLI and compare it with the committed one, entry by entry. Under
    another transformers than the record's (CI also runs the oldest allowed), the built fixture's config.json is that
    version's own: its entries are left out, and the fixture's source bytes, plans, statistics, output tensor hashes
    and metrics are still compared."""
    expected = json.loads(RECORD.read_text())
    actual = record(ROOT / "fixtures")
    problems = compare(expected, actual)
    if expected["environment"]["transformers"] != transformers.__version__:
        problems = [p for p in problems if not _written_by_transformers(p)]
    assert not problems, summary(problems, expected, actual)


def test_only_a_built_fixtures_config_is_left_to_the_installed_transformers() -> None:
    """What another transformers may change is exactly a built fixture's config and the fingerprint of it."""
    built = BUILT[0]
    assert _written_by_transformers(f"fixtures/{built}/slim/auto/config/swiglu_limit: missing (expected 7.0)")
    assert _written_by_transformers(f"fixtures/{built}/calibrate/meta/model/fingerprint: expected 'a', got 'b'")
    assert not _written_by_transformers(f"fixtures/{built}/slim/auto/tensors/model.safetensors: expected 'a', got 'b'")
    assert not _written_by_transformers(f"fixtures/{built}/source/model.safetensors: expected 'a', got 'b'")
    assert not _written_by_transformers("fixtures/tiny-mixtral-16e/slim/auto/config/num_local_experts: expected 8")


def _sample() -> dict:
    """A small record shaped like the real one (a slice of the committed record, so paths are realistic)."""
    fixture = json.loads(RECORD.read_text())["fixtures"]["tiny-mixtral-16e"]
    return {
        "environment": {"torch": "x"},
        "fixtures": {
            "tiny-mixtral-16e": {
                "calibrate": fixture["calibrate"],
                "slim": {c: fixture["slim"][c] for c in ("ean", "router-norm")},
            }
        },
    }


def test_compare_finds_nothing_in_an_identical_record() -> None:
    expected = _sample()
    actual = copy.deepcopy(expected)
    actual["environment"] = {"torch": "y"}  # versions are shown, not compared
    assert compare(expected, actual) == []


def _perturbed(path: list, change) -> tuple[dict, dict, str]:
    expected = _sample()
    actual = copy.deepcopy(expected)
    node = actual
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = change(node[path[-1]])
    return expected, actual, "/".join(map(str, path))


@pytest.mark.parametrize(
    ("path", "change", "caught"),
    [
        # a kept expert, a tensor hash, a count: always exact
        (["fixtures", "tiny-mixtral-16e", "slim", "ean", "plan", "layers", 0, "kept", 0], lambda v: v + 1, True),
        (["fixtures", "tiny-mixtral-16e", "slim", "ean", "plan", "correction", "sha256"], lambda v: v[::-1], True),
        (
            ["fixtures", "tiny-mixtral-16e", "calibrate", "stats", "layers.0.a.count", "values", 0],
            lambda v: v + 1.0,
            True,
        ),
        # a data-free score is exact; a calibrated one and a metric are sums: within 1e-9 relative passes
        (
            ["fixtures", "tiny-mixtral-16e", "slim", "router-norm", "plan", "layers", 0, "scores", 0],
            lambda v: v * (1 + 1e-12),
            True,
        ),
        (
            ["fixtures", "tiny-mixtral-16e", "slim", "ean", "plan", "layers", 0, "scores", 0],
            lambda v: v * (1 + 1e-12),
            False,
        ),
        (
            ["fixtures", "tiny-mixtral-16e", "slim", "ean", "plan", "layers", 0, "scores", 0],
            lambda v: v * (1 + 1e-6) + 1e-6,
            True,
        ),
        (["fixtures", "tiny-mixtral-16e", "slim", "ean", "validation", "kl_mean"], lambda v: v * (1 + 1e-12), False),
        (
            ["fixtures", "tiny-mixtral-16e", "slim", "ean", "validation", "kl_mean"],
            lambda v: v * (1 + 1e-6) + 1e-6,
            True,
        ),
        (
            ["fixtures", "tiny-mixtral-16e", "calibrate", "stats", "layers.0.a.ean", "values", 0],
            lambda v: v * (1 + 1e-6) + 1e-6,
            True,
        ),
        # types and structure: an int that became a float, a generation's text, a missing key
        (["fixtures", "tiny-mixtral-16e", "slim", "ean", "validation", "scored_tokens"], float, True),
        (
            ["fixtures", "tiny-mixtral-16e", "slim", "ean", "validation", "generations", 0, "pruned"],
            lambda v: v + "!",
            True,
        ),
        (
            ["fixtures", "tiny-mixtral-16e", "slim", "ean", "plan"],
            lambda v: {k: x for k, x in v.items() if k != "seed"},
            True,
        ),
    ],
)
def test_compare_catches_a_perturbed_entry(path: list, change, caught: bool) -> None:
    """The comparison fails on a changed value and names it (fixture/command/key), except within the tolerance."""
    expected, actual, where = _perturbed(path, change)
    problems = compare(expected, actual)
    if not caught:
        assert problems == []
        return
    assert len(problems) == 1 and problems[0].startswith(where), problems
    message = summary(problems, expected, actual)
    assert "1 recorded value(s) differ, in: fixtures/tiny-mixtral-16e/" in message and where in message
