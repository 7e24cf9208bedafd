"""``slim`` takes validation's source side, and the correction, from its one calibration pass
(``validate/reference.py``, ``pipeline._correction_in_pass``): the report and the corrected tensors must be exactly
what a validation and a correction that read the source again give. (That the source is then read once is shown
on the Hub test server, which counts the bytes it sends: ``test_hub_stream.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from moeslim.validate.run import METRICS, ValidateOptions, validate
from tests.conftest import run_cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "trained"
SLIM_VALIDATION = ValidateOptions(samples=8, seq_len=128, require_data=False)  # what `slim` validates with (cli.py)
COMPARED = (*METRICS, "layers", "per_sequence", "data", "generations")


@pytest.mark.parametrize(
    ("fixture", "extra"),
    [
        ("tiny-deepseek-16e", []),  # auto: trials and the correction in the pass; sigmoid groups, bias, MLA
        ("tiny-mixtral-16e", ["--criterion", "frequency", "--progressive"]),  # the calibration stream masked
    ],
)
def test_slim_validation_is_a_separate_validation_bit_for_bit(
    fixture: str, extra: list[str], tmp_path: Path, capsys
) -> None:
    source, out = FIXTURES / fixture, tmp_path / "pruned"
    code, _, err = run_cli(["slim", str(source), "--keep", "8", "--out", str(out), *extra], capsys)
    assert code == 0, err
    report = json.loads((out / "validation.json").read_text())
    again = validate(source, out, SLIM_VALIDATION)  # reads and runs the source again, beside the pruned model
    assert "kl_mean" in report, report["summary"]
    for key in COMPARED:
        assert report[key] == again[key], key


def test_a_correction_fitted_in_the_pass_equals_its_own_pass(tmp_path: Path, capsys) -> None:
    """``--criterion ean`` fits its correction in the calibration pass; ``--plan`` of that plan fits it in a pass of
    its own (``correct/run.py``): same plan, same tensors, bit for bit, and the plan records the same sha256."""
    source = FIXTURES / "tiny-mixtral-16e"
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = run_cli(["slim", str(source), "--keep", "8", "--criterion", "ean", "--out", str(one),
                            "--no-validate"], capsys)  # fmt: skip
    assert code == 0, err
    plan = json.loads((one / "moeslim_plan.json").read_text())
    assert plan["correction"]["sha256"], plan["correction"]
    code, _, err = run_cli(["slim", str(source), "--plan", str(one / "moeslim_plan.json"), "--correct", "--out",
                            str(two), "--no-validate"], capsys)  # fmt: skip
    assert code == 0, err
    assert "differ" not in err  # check_redo says when the bytes came out otherwise
    assert json.loads((two / "moeslim_plan.json").read_text())["correction"] == plan["correction"]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_with_experts_streamed_in_chunks_the_report_matches_within_rounding(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Experts read 3 at a time (``chunks.py``): the held-out batches ride in the calibration's sweep over the
    experts, so their rows are computed beside other rows than in a validation of their own; equal up to float
    rounding (measured here: bit for bit; the bound stated, 1e-5 relative, leaves room for other BLAS kernels)."""
    monkeypatch.setenv("MOESLIM_EXPERT_CHUNK", "3")
    source, out = FIXTURES / "tiny-deepseek-16e", tmp_path / "pruned"
    code, _, err = run_cli(["slim", str(source), "--keep", "8", "--out", str(out)], capsys)
    assert code == 0, err
    report = json.loads((out / "validation.json").read_text())
    again = validate(source, out, SLIM_VALIDATION)
    assert report["scored_tokens"] == again["scored_tokens"]
    for key in ("kl_mean", "kl_p95", "top1_agreement", "perplexity_original", "perplexity_pruned"):
        assert report[key] == pytest.approx(again[key], rel=1e-5, abs=1e-9), key
    assert [e["relative_error"] for e in report["layers"]] == pytest.approx(
        [e["relative_error"] for e in again["layers"]], rel=1e-5
    )
