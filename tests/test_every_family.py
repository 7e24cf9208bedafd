"""Every MoE family the installed transformers defines: pruned correctly, or refused in one line with why.

The families are discovered, not listed (``moe_model_types``). For each, the layout record moeslim uses must
equal a fresh derivation from the model definition: under the transformers version the committed table
(``moeslim/families/families.json``) was derived under, the committed record, so a new transformers release shows
new or changed families here; under any other version (CI also runs the oldest transformers the package allows),
the record moeslim derives at run time (``families/runtime.py``), which is what it prunes with there. A supported
family gets a tiny random checkpoint written by ``save_pretrained``; moeslim prunes it with a random plan; the
pruned checkpoint must load strictly in the family's own class, give the logits of the original whose routers
cannot reach the dropped experts (float32, 1e-5), and keep every other tensor byte for byte. A refused family must
be refused by the CLI in one line that carries the reason. Every other data-free criterion prunes every supported
family too (the same tiny checkpoints, built once), its output loading strictly.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from moeslim.calibrate.capture import FIELDS, LayerStats, collect
from moeslim.criteria import DATA_FREE
from moeslim.families.derive import DERIVED_PATH, probe
from moeslim.families.table import FAMILIES, text_config
from moeslim.families.tiny import tiny_model
from moeslim.layout import _matches, resolve_layout
from moeslim.names import PLAN_NAME
from moeslim.pipeline import SlimOptions, slim
from moeslim.source import open_checkpoint
from moeslim.stream.masking import drop_experts_of
from moeslim.stream.modules import moe_parts
from tests.conftest import distinct, installed_families, run_cli, statistics_tokens, streamed_statistics

pytestmark = pytest.mark.slow

COMMITTED: dict[str, Any] = json.loads(DERIVED_PATH.read_text(encoding="utf-8"))
VERSION = transformers.__version__
TYPES, TABLE = installed_families()  # the records moeslim uses under the installed transformers
STALE = (
    "regenerate with: python -m moeslim.families.derive"
    if COMMITTED["transformers"] == VERSION
    else f"the record moeslim derived at run time under transformers {VERSION} is not a fresh derivation"
)
COVERAGE: dict[str, tuple[str, str]] = {}  # model type → (result, layout or reason)
HAND = {t: f for f in FAMILIES.values() for t in f.model_types}


class CoverageTable:
    """Printed in pytest's summary: every family, what moeslim does with it."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not COVERAGE:
            return
        pruned = sum(r == "pruned" for r, _ in COVERAGE.values())
        terminalreporter.write_sep("-", f"MoE families of transformers {transformers.__version__}: {pruned} of"
                                   f" {len(COVERAGE)} pruned and proven, the rest refused with a reason")  # fmt: skip
        for model_type, (result, detail) in sorted(COVERAGE.items()):
            terminalreporter.write_line(f"{model_type:<28}{result:<9}{detail}")


@pytest.fixture(scope="module", autouse=True)
def coverage_table(request: pytest.FixtureRequest) -> None:
    if not request.config.pluginmanager.has_plugin("moeslim-coverage-table"):
        request.config.pluginmanager.register(CoverageTable(), "moeslim-coverage-table")


def test_the_table_names_exactly_the_installed_families() -> None:
    assert sorted(TABLE) == TYPES, STALE


def _layout_text(record: dict[str, Any]) -> str:
    experts = "stacked " + ", ".join(record["experts"]) if record["fused"] else f"per-expert {record['experts'][0]}N."
    return f"{record['block']}: router {', '.join(record['router'])}; {experts}"


def _ids() -> torch.Tensor:
    return torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))


# Wrapper classes whose own forward is broken in the installed transformers: logits through the language model.
BROKEN_FORWARD = {"Llama4ForConditionalGeneration": "transformers 5.24 reads outputs.image_outputs of a text-only run"}


def _logits(model: Any, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = _ids() if ids is None else ids
    with torch.no_grad():
        if type(model).__name__ in BROKEN_FORWARD:
            return model.language_model(input_ids=ids, use_cache=False).logits
        return model(input_ids=ids, use_cache=False).logits


PROVEN = "random"  # the data-free criterion whose plan is proven in full (logits, bytes, statistics) on every family
Built = tuple[dict[str, Any], Any, Path | None]  # (fresh record, tiny model, its saved checkpoint)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Built]:
    """A family's fresh derivation with its tiny model (distinct random weights) saved as a checkpoint, built
    once per module: the derivation's own model serves as the checkpoint."""
    cache: dict[str, Built] = {}

    def get(model_type: str) -> Built:
        if model_type not in cache:
            fresh, built = probe(model_type)
            src = None
            if "refused" not in fresh:
                src = tmp_path_factory.mktemp(model_type) / "src"
                distinct(built).save_pretrained(src)
            cache[model_type] = (fresh, built, src)
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", TYPES)
def test_family_is_pruned_exactly_or_refused_with_its_reason(
    model_type: str, family: Callable[[str], Built], tmp_path: Path, capsys
) -> None:
    fresh, original, src = family(model_type)
    assert TABLE.get(model_type) == fresh, STALE
    if "refused" in fresh:
        _assert_refused(model_type, fresh["refused"], tmp_path, capsys)
        return
    if model_type in HAND:  # the hand-written record must agree with what transformers' definition says
        hand = HAND[model_type]
        assert (hand.block, hand.router_weight, hand.fused, hand.scoring) == (
            fresh["block"], fresh["router"][0], fresh["fused"], fresh["scoring"]
        )  # fmt: skip
        assert all(_matches(r, hand.router) for r in fresh["router"])
        assert all(_matches(e, hand.experts) for e in fresh["experts"])

    assert src is not None
    out = tmp_path / "out"
    slim(SlimOptions(src, keep=4, out=out, criterion=PROVEN, seed=7))
    plan = json.loads((out / PLAN_NAME).read_text())
    kept = {entry["layer"]: tuple(entry["kept"]) for entry in plan["layers"]}
    assert kept and all(len(k) == 4 for k in kept.values())

    cls = getattr(transformers, fresh["architecture"])
    pruned, info = cls.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    layout = resolve_layout(open_checkpoint(src))
    with drop_experts_of(original, layout, kept):
        expected = _logits(original)
    actual = _logits(pruned.eval())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(original), actual, atol=1e-4)  # pruning did change the model
    _assert_untouched_bytes_equal(src, out, layout)
    if fresh["calibration"] is None:
        _assert_streaming_statistics_equal_full_forward(original, src, layout)
        COVERAGE[model_type] = ("pruned", _layout_text(fresh))
    else:  # pruned with a data-free plan; calibrating it is refused in one line, before any weight is read
        code, _, err = run_cli(["calibrate", str(src), "--out", str(tmp_path / "stats")], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and fresh["calibration"] in lines[0], err
        assert not (tmp_path / "stats").exists()
        COVERAGE[model_type] = ("pruned", f"{_layout_text(fresh)} (not calibrated: {fresh['calibration']})")


@pytest.mark.parametrize("criterion", [c for c in DATA_FREE if c != PROVEN])  # PROVEN: by the test above
@pytest.mark.parametrize("model_type", TYPES)
def test_every_data_free_criterion_prunes_every_family(
    model_type: str, criterion: str, family: Callable[[str], Built], tmp_path: Path, capsys
) -> None:
    """``slim --criterion C`` exits 0 on every supported family for every data-free C (``PROVEN`` is, with more, in
    the test above), its plan keeps 4 of 8 experts in every MoE layer and its output loads strictly; a score read from the weights is the score of the same
    expert's tensors after pruning (an expert's rows read where they are, extra rows left out). A refused family
    is refused in one line with its reason, whatever the criterion."""
    fresh, _, src = family(model_type)
    if src is None:
        _assert_refused(model_type, fresh["refused"], tmp_path, capsys, ["--criterion", criterion])
        return
    out = tmp_path / "out"
    args = [
        "slim",
        str(src),
        "--keep",
        "4",
        "--criterion",
        criterion,
        "--seed",
        "7",
        "--no-validate",
        "--out",
        str(out),
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    plan = json.loads((out / PLAN_NAME).read_text())
    before, after = open_checkpoint(src), open_checkpoint(out)
    layout = resolve_layout(before)
    assert [e["layer"] for e in plan["layers"]] == layout.moe_indices
    for entry in plan["layers"]:
        assert len(entry["scores"]) == 8 and len(entry["kept"]) == 4 == len(set(entry["kept"])), entry
        assert all(0 <= j < 8 for j in entry["kept"]), entry
    score = DATA_FREE[criterion]
    if np.array_equal(_scores(score(before, layout, 1)), _scores(score(before, layout, 2))):  # read from weights
        again = score(after, resolve_layout(after), None)
        for entry in plan["layers"]:
            kept_scores = np.asarray(entry["scores"])[entry["kept"]]
            np.testing.assert_array_equal(again[entry["layer"]], kept_scores, err_msg=f"layer {entry['layer']}")
    cls = getattr(transformers, fresh["architecture"])
    _, info = cls.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()


# Count and top-k keys a family's config may hold as a per-layer list, found by the derivation (the config class
# takes the list and the model built from it computes the same logits). Under transformers 5.25: hunyuan_v1_moe's
# moe_topk (Hunyuan-A13B's config.json lists one top-k per layer).
LISTED = [(t, key) for t in TYPES for key in TABLE[t].get("per_layer_keys", [])]


@pytest.mark.parametrize(("model_type", "key"), LISTED)
def test_a_per_layer_list_is_read_as_its_one_value_and_rewritten_as_a_list(
    model_type: str, key: str, family: Callable[[str], Built], tmp_path: Path, capsys
) -> None:
    """A config key that the family's own config class lets hold one value per layer, written as such a list of
    equal values, prunes as the single value would: the output keeps the list with every entry rewritten, loads
    strictly, and its routers choose as many experts as the list says. Different values per layer are refused in
    one line."""
    fresh, _, built = family(model_type)
    assert built is not None
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(built, src)
    config = json.loads((src / "config.json").read_text())
    scope = text_config(config)
    n, value = scope["num_hidden_layers"], scope[key]
    top_k = key in fresh["top_k_keys"]
    scope[key] = [value - 1] + [value] * (n - 1)
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(["slim", str(src), "--keep", "4", "--criterion", "router-norm", "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and f"{key} differs between layers" in err, err
    scope[key] = [value] * n
    (src / "config.json").write_text(json.dumps(config))

    cls = getattr(transformers, fresh["architecture"])
    cls.from_pretrained(src)  # transformers reads the list form
    code, _, err = run_cli(["slim", str(src), "--keep", "4", "--criterion", "router-norm", "--top-k", "1",
                            "--out", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    assert text_config(json.loads((out / "config.json").read_text()))[key] == [1 if top_k else 4] * n
    pruned, info = cls.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    layout = resolve_layout(open_checkpoint(out))
    assert (layout.num_experts, layout.top_k) == (4, 1)
    _assert_streaming_statistics_equal_full_forward(pruned.eval(), out, layout)  # routed count: tokens × 1


def _scores(scores: dict[int, np.ndarray]) -> list[list[float]]:
    return [scores[i].tolist() for i in sorted(scores)]


def _assert_streaming_statistics_equal_full_forward(model: Any, src: Path, layout: Any) -> None:
    """Calibration one layer at a time gives the statistics of the whole model's own forward, whole layers loaded
    and routed experts streamed from disk one expert at a time (``stream/chunks.py``) alike."""
    for chunk in (None, 1):
        _assert_statistics_equal_full_forward(model, src, layout, chunk)


def _assert_statistics_equal_full_forward(model: Any, src: Path, layout: Any, chunk: int | None) -> None:
    tokens = statistics_tokens()
    stats = streamed_statistics(src, chunk)
    parts = moe_parts(model, layout)
    expected = {i: LayerStats(layout.num_experts) for i in parts}
    with contextlib.ExitStack() as stack, torch.no_grad():
        for index, s in expected.items():
            stack.enter_context(collect(parts[index], s, layout.family.scoring))
        for rows in tokens.split(2):
            _logits(model, rows)
    assert sorted(stats.layers) == sorted(expected)
    for index, ref in expected.items():
        total = stats.total(index)
        assert np.array_equal(total["count"], ref["count"]), index  # the same routing, exactly
        routed = total["count"].sum()  # every (token, choice) pair, less choices of zero-computation experts
        assert routed == 4 * 10 * layout.top_k if not layout.family.extra_rows else 0 < routed <= 4 * 10 * layout.top_k
        for field in FIELDS:
            np.testing.assert_allclose(total[field], ref[field], rtol=1e-5, atol=1e-9)


def _assert_untouched_bytes_equal(src: Path, out: Path, layout: Any) -> None:
    before, after = open_checkpoint(src), open_checkpoint(out)
    routed = {n for layer in layout.layers for n in (*layer.router, *layer.fused)}
    routed |= {n for layer in layout.layers for names in layer.per_expert for n in names}
    routed |= {n for layer in layout.layers for _, names in layer.extra for n in names}  # renumbered
    untouched = [n for n in before.tensors if n not in routed]
    assert untouched
    for name in untouched:
        a, b = before.tensors[name], after.tensors[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
            fa.seek(a.start)
            fb.seek(b.start)
            assert fa.read(a.nbytes) == fb.read(b.nbytes), name


def _assert_refused(model_type: str, reason: str, tmp_path: Path, capsys, extra: Sequence[str] = ()) -> None:
    """``slim`` (with ``extra`` arguments) refuses the family in one line carrying the reason, before reading any
    weight."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": ["X"]}))
    (src / "model.safetensors").write_bytes(b"not read")  # a refusal must come before any weight is read
    code, _, err = run_cli(["slim", str(src), "--keep", "2", "--out", str(tmp_path / "out"), *extra], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and reason in lines[0], err
    assert not (tmp_path / "out").exists()
    COVERAGE[model_type] = ("refused", reason)


def test_release_naming_mtp_under_its_own_prefix_is_pruned_with_the_trunk(tmp_path: Path) -> None:
    """Qwen3-Next releases keep their MTP layer as ``mtp.layers.0.…`` beside the trunk's ``model.layers.N.…``;
    it is pruned with the trunk (index ``num_hidden_layers``), and the trunk still loads strictly."""
    from safetensors.torch import load_file, save_file

    src, out = tmp_path / "src", tmp_path / "out"
    model = distinct(tiny_model("qwen3_next", 8))
    model.save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    mtp = {"mtp." + n.removeprefix("model."): t.clone() for n, t in tensors.items() if n.startswith("model.layers.0.")}
    mtp["mtp.fc.weight"] = torch.randn(64, 128)
    save_file({**tensors, **mtp}, src / "model.safetensors", metadata={"format": "pt"})

    slim(SlimOptions(src, keep=4, out=out, criterion="router-norm"))
    n = model.config.num_hidden_layers
    kept = {e["layer"]: tuple(e["kept"]) for e in json.loads((out / PLAN_NAME).read_text())["layers"]}
    assert sorted(kept) == [*range(n), n]
    after = load_file(out / "model.safetensors")
    assert torch.equal(after["mtp.layers.0.mlp.gate.weight"], mtp["mtp.layers.0.mlp.gate.weight"][list(kept[n])])
    for new, old in enumerate(kept[n]):
        name = "mtp.layers.0.mlp.experts.{}.down_proj.weight"
        assert torch.equal(after[name.format(new)], mtp[name.format(old)])
    assert not any(k.startswith("mtp.layers.0.mlp.experts.4.") for k in after)
    assert torch.equal(after["mtp.fc.weight"], mtp["mtp.fc.weight"])
    pruned, info = transformers.Qwen3NextForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"])
