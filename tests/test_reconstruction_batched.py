"""The batched reconstruction search weighs candidates as one router call per candidate does, in every family.

For every MoE family of the installed transformers that moeslim calibrates with the reconstruction criterion, a
tiny model (distinct random weights, random selection biases: a zero bias would hide a wrong bias mask) routes a
sample through its first MoE layer. The search the sampler picks (``search_of``) and the sequential reference
(``_Sequential``: the router called under ``mask_router`` once per candidate, the code the criterion ran before)
are driven through the same greedy steps: every candidate's error at every step agrees to ``RTOL`` (float32
rounding of the mean over the tokens; on CPU they are equal bit for bit), and the search run alone removes the
experts in the same order. Candidates go in groups of 3 (a small ``BUDGET``), so that a step spans several
groups; DeepSeek-V3 (sigmoid scores, correction bias, 2 groups of 4 with one chosen, renormalised and scaled) and
OLMoE (softmax without top-k renormalisation: every token's weights change with every removal) also run in one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version

from moeslim.calibrate import reconstruction
from moeslim.calibrate.collect import _reconstruction
from moeslim.calibrate.reconstruction import ReconstructionSampler, Search, _Batched, _Sequential, greedy, search_of
from moeslim.errors import PlanError
from moeslim.families.derive import DERIVED_PATH, moe_model_types
from moeslim.families.runtime import record_of
from moeslim.families.tiny import tiny_model
from moeslim.layout import Layout, resolve_layout
from moeslim.source import open_checkpoint
from moeslim.stream.chunks import Resident
from moeslim.stream.modules import MoeParts, moe_parts, takes_routing
from moeslim.stream.ranks import SINGLE
from tests.conftest import distinct

pytestmark = pytest.mark.slow

RTOL = 1e-6  # relative, per candidate error: float32 rounding of a mean over the sample's tokens
EXPERTS, TOKENS = 8, 40
# Families whose router cannot route stacked candidates exactly, so that the sampler searches one at a time.
SEQUENTIAL: dict[str, str] = {}
# Families the criterion fails on whichever way it searches (the per-candidate code before batching failed alike).
BROKEN = {
    "dbrx": "its router returns the logits only: the block itself takes the top-k",
    "longcat_flash": "its zero-computation experts are chosen as rows past the routed experts' outputs",
    "muse_spark": "its experts take a projection of the router's input, not the input",
}


def _calibrated() -> Iterator[str]:
    """The model types moeslim calibrates under the installed transformers (the committed table's records where
    it was derived under this version, else those derived at run time)."""
    committed = json.loads(DERIVED_PATH.read_text(encoding="utf-8"))
    version = transformers.__version__
    for model_type in moe_model_types():
        same = committed["transformers"] == version
        record = committed["families"].get(model_type) if same else record_of(model_type, version)
        if record is not None and "refused" not in record and record.get("calibration") is None:
            yield model_type


# Fixed somewhere between transformers 5.16 and 5.25: not strict.
OLDER = {"jamba": "its router returns the logits only (transformers 5.16): the block takes the top-k"}
if Version(transformers.__version__) >= Version("5.25"):
    OLDER = {}


def _param(model_type: str) -> Any:
    if model_type in BROKEN:
        return pytest.param(model_type, marks=pytest.mark.xfail(strict=True, reason=BROKEN[model_type]))
    if model_type in OLDER:
        return pytest.param(model_type, marks=pytest.mark.xfail(strict=False, reason=OLDER[model_type]))
    return model_type


CALIBRATED = [_param(t) for t in _calibrated()]


class Both:
    """The search under test and the reference through the same steps (the reference's choices), every candidate's
    error compared."""

    def __init__(self, tested: Search, reference: Search) -> None:
        self.tested, self.reference, self.compared = tested, reference, 0

    def errors(self, kept: list[int], candidates: list[int]) -> list[float]:
        got, want = self.tested.errors(kept, candidates), self.reference.errors(kept, candidates)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=0, err_msg=f"kept {kept}")
        self.compared += len(candidates)
        return want

    def keep(self, kept: list[int]) -> None:
        self.tested.keep(kept)
        self.reference.keep(kept)


def _sampled(model_type: str, tmp_path: Path, **config: Any) -> tuple[Layout, MoeParts, ReconstructionSampler]:
    """A tiny ``model_type`` (its config changed by ``config``), its layout, and a sampler of its first MoE layer
    that has routed ``TOKENS`` tokens."""
    model = tiny_model(model_type, EXPERTS)
    if config:
        text = model.config.get_text_config()
        for key, value in config.items():
            setattr(text, key, value)
        model = type(model)._from_config(model.config, dtype=torch.float32).eval()
    distinct(model).save_pretrained(tmp_path / "src")
    layout = resolve_layout(open_checkpoint(tmp_path / "src"))
    parts = next(iter(moe_parts(model, layout).values()))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for bias in parts.biases:  # sized to compete with the scores, so that an unmasked one would be chosen
            bias.copy_(torch.randn(bias.shape, generator=gen))
    sampler = ReconstructionSampler(parts, TOKENS, Resident(parts.experts, EXPERTS))
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with sampler.capture(), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return layout, parts, sampler


@torch.no_grad()
def _assert_batched_equals_sequential(model_type: str, layout: Layout, parts: MoeParts, sampler: Any) -> None:
    x = torch.cat(sampler._inputs)
    assert x.shape[0] == TOKENS
    outputs = torch.stack([sampler._expert_output(x, j) for j in range(EXPERTS)])
    args, ndim = sampler._router_args, sampler._ndim

    def reference() -> _Sequential:
        full = search_of(parts, x, args, ndim, outputs).full  # type: ignore[attr-defined]
        return _Sequential(parts, x, (args, ndim), outputs, full)

    search = search_of(parts, x, args, ndim, outputs)
    assert isinstance(search, _Batched) == (model_type not in SEQUENTIAL), type(search).__name__
    both = Both(search, reference())
    expected = greedy(both, layout)
    assert both.compared >= EXPERTS  # at least one whole step compared
    alone = greedy(search_of(parts, x, args, ndim, outputs), layout)
    np.testing.assert_allclose(alone, expected, rtol=RTOL, atol=0)  # removal steps are whole numbers: the order
    np.testing.assert_allclose(greedy(reference(), layout), expected, rtol=0, atol=0)
    np.testing.assert_allclose(sampler.scores(layout), expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("model_type", CALIBRATED)
def test_batched_search_weighs_candidates_as_one_router_call_each(
    model_type: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout, parts, sampler = _sampled(model_type, tmp_path)
    if not takes_routing(parts.experts):  # the criterion does not run (Llama-4 routes every token densely)
        return
    hidden, rows = sampler._inputs[0].shape[-1], parts.weight.shape[0]
    monkeypatch.setattr(reconstruction, "BUDGET", 3 * TOKENS * max(hidden, rows) * 4)  # 3 candidates a group
    x = torch.cat(sampler._inputs)
    outputs = torch.stack([sampler._expert_output(x, j) for j in range(EXPERTS)]).detach()
    search = search_of(parts, x, sampler._router_args, sampler._ndim, outputs)
    if isinstance(search, _Batched):
        assert search.group == 3
    _assert_batched_equals_sequential(model_type, layout, parts, sampler)


@pytest.mark.parametrize(
    ("model_type", "config"),
    [("deepseek_v3", {"n_group": 2, "topk_group": 1, "norm_topk_prob": True}), ("olmoe", {"norm_topk_prob": False})],
)
def test_one_group_holds_every_candidate_at_real_budget(model_type: str, config: dict, tmp_path: Path) -> None:
    layout, parts, sampler = _sampled(model_type, tmp_path, **config)
    assert layout.n_group == config.get("n_group", 1)
    _assert_batched_equals_sequential(model_type, layout, parts, sampler)


@pytest.mark.parametrize("model_type", [t for t in BROKEN if t in set(_calibrated())])
def test_a_family_the_criterion_cannot_call_is_refused_in_one_line(model_type: str, tmp_path: Path) -> None:
    """The families whose router or experts the search cannot call on their own (``BROKEN``) stop calibration with
    the one line of a ``PlanError`` (exit code 2), naming another criterion, instead of a traceback."""
    layout, _, sampler = _sampled(model_type, tmp_path)
    with pytest.raises(PlanError) as e:
        _reconstruction(sampler, layout, SINGLE, 0)
    line = str(e.value)
    assert "\n" not in line and f"cannot run {model_type}'s router and experts" in line and "--criterion" in line
