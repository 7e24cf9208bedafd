"""The model card: rendered from hand-made facts, measured from real outputs, with and without matplotlib."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from safetensors import safe_open

from moeslim.plan import Plan
from moeslim.publish.card import CardFacts, Side, front_matter, render_card
from moeslim.publish.facts import base_model_id, measure
from moeslim.publish.heatmap import draw_expert_map, expert_grid
from moeslim.source import open_checkpoint

ROOT = Path(__file__).resolve().parent.parent
PLAN = Plan(
    model_type="qwen3_moe",
    num_experts=8,
    top_k=2,
    kept={0: (0, 1, 2, 5), 1: (3, 4, 6, 7)},
    criterion="router-norm",
    scores={0: (4.0, 3.0, 3.0, 0.0, 1.0, 2.5, 1.0, 1.0), 1: (1.0,) * 8},
)
FACTS = CardFacts(
    name="tiny-slim",
    source="org/tiny",
    base_model="org/tiny",
    source_revision="a" * 40,
    model_type="qwen3_moe",
    original=Side(experts=8, top_k=2, parameters=55_296, file_bytes=232_168),
    pruned=Side(experts=4, top_k=2, parameters=36_480, file_bytes=152_904),
    plan=PLAN,
    version="1.2.3",
    command="moeslim slim org/tiny --keep 4 --push-to org/tiny-slim",
    base_card={
        "license": "other",
        "license_name": "tiny-license",
        "license_link": "LICENSE",
        "language": ["en"],
        "tags": ["base-only-tag"],
        "pipeline_tag": "text-generation",
    },  # fmt: skip
    image="expert_map.png",
)


def _meta(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("\n---\n", 1)[0][4:])


def test_metadata_carries_the_base_license_and_names_the_base_model() -> None:
    meta = _meta(render_card(FACTS))
    assert meta == {
        "base_model": "org/tiny",
        "license": "other",
        "license_name": "tiny-license",
        "license_link": "LICENSE",
        "language": ["en"],
        "tags": ["moe", "pruned", "expert-pruning", "moeslim", "qwen3_moe"],
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
    }


def test_card_sections() -> None:
    card = render_card(FACTS)
    assert "| experts per MoE layer | 8 | 4 |" in card and "| active experts per token | 2 | 2 |" in card
    assert "| total parameters | 55.3K | 36.5K |" in card  # 55_296 and 36_480 rounded to one decimal
    assert "| file size (safetensors) | 232.2 KB | 152.9 KB |" in card
    assert f"```bash\n{FACTS.command}\n```" in card
    assert "`org/tiny` at commit `" + "a" * 40 + "`" in card
    assert "calibration: none: data-free criterion, no calibration data" in card
    assert "Not validated yet" in card
    assert "![Expert scores per layer, kept experts marked](expert_map.png)" in card
    assert "| 0 | 0-2, 5 |" in card and "| 1 | 3-4, 6-7 |" in card
    assert "the base model's license applies: `tiny-license` ([LICENSE](LICENSE))" in card
    assert "MXFP4" not in card


def test_calibration_validation_and_a_local_source() -> None:
    plan = replace(PLAN, criterion="reap", calibration={"data": "notes | more", "tokens": 131072, "seed": 0})
    facts = replace(FACTS, plan=plan, base_model=None, source="/models/x y", source_revision=None, base_card={},
                    validation={"kl_mean": 0.0123456, "perplexity_pruned": 5.9, "note": "text", "ok": True},
                    image=None, packed_fp4=True, command="")  # fmt: skip
    card = render_card(facts)
    assert "base_model" not in _meta(card) and "license" not in _meta(card)
    assert "- calibration:\n  - data: notes \\| more\n  - tokens: 131072\n  - seed: 0\n" in card  # no pipes in tables
    assert "| KL(original ‖ pruned), mean per token | 0.01235 |\n" in card  # labelled as validate labels it, 4 digits
    assert "| perplexity, pruned | 5.9 |\n" in card and "| perplexity, original | not measured |\n" in card
    assert "| note |" not in card and "| ok |" not in card and "kl_mean" not in card
    assert "Pruned from a local checkpoint (`/models/x y`)" in card
    assert "`moeslim slim '/models/x y' --plan moeslim_plan.json`" in card
    assert "matplotlib is not installed (`pip install 'moeslim[plot]'`" in card and "](expert_map.png)" not in card
    assert "The base card declares no license" in card
    assert "MXFP4 `_blocks` tensors pack two 4-bit values per byte" in card
    assert "Made through the Python API." in card


def test_card_renders_per_layer_values_and_labels_for_humans() -> None:
    calibration = {"data": "stdlib: 4 of 674 files", "samples": 4, "seq_len": 32, "progressive": False,
                   "stability": {"1": 0.8333, "0": 1.0}}  # fmt: skip
    validation = {
        "kl_mean": 0.25, "kl_p95": None, "top1_agreement": float("nan"), "perplexity_original": 36.4,
        "perplexity_pruned": float("inf"), "scored_tokens": 1016, "summary": "measured on 1016 tokens",
        "layers": [{"layer": 0, "relative_error": 0.1335}, {"layer": 1, "relative_error": float("nan")}],
    }  # fmt: skip
    card = render_card(replace(FACTS, plan=replace(PLAN, calibration=calibration), validation=validation))
    assert (
        "  - kept-set stability (Jaccard of the sets chosen from two halves of the data): layer 0: 1.00, layer 1: 0.83\n"
        in card
    )
    assert (
        "  - sequences: 4\n  - tokens per sequence: 32\n  - progressive (each layer calibrated on the pruned layers before it): no\n"
        in card
    )
    rows = [line for line in card.splitlines() if line.startswith("| ") and "|---" not in line]
    assert rows[rows.index("| metric | value |") + 1 :][:6] == [
        "| KL(original ‖ pruned), mean per token | 0.25 |",
        "| KL(original ‖ pruned), 95th percentile | not measured |",  # null in validation.json
        "| top-1 agreement | not measured |",  # NaN
        "| perplexity, original | 36.4 |",
        "| perplexity, pruned | not measured |",  # infinite
        "| scored tokens | 1016 |",
    ]
    assert "Relative error of each MoE layer's output (cumulative): layer 0: 0.13, layer 1: not measured." in card
    assert "{" not in card.split("## Expert map")[0].split("---", 2)[2]  # no raw dicts anywhere in the text
    assert "kl_mean" not in card and "stability:" not in card and "seq_len" not in card


def test_skipped_numeric_comparison_says_why() -> None:
    summary = "structure checked; numeric comparison skipped: no tokenizer next to either model's weights"
    card = render_card(replace(FACTS, validation={"structure": {"ok": True}, "summary": summary}))
    assert f"Validation (`moeslim validate`, details in `validation.json`): {summary}." in card
    assert "| metric | value |" not in card


def test_the_card_is_deterministic() -> None:
    """Per-layer values are listed in layer order, whatever order the plan's JSON held them in."""
    shuffled = {"2": 0.5, "10": 0.25, "0": 1.0}
    facts = replace(FACTS, plan=replace(PLAN, calibration={"data": "x", "stability": shuffled}))
    ordered = replace(FACTS, plan=replace(PLAN, calibration={"data": "x", "stability": dict(sorted(shuffled.items()))}))
    assert render_card(facts) == render_card(ordered)
    assert "layer 0: 1.00, layer 2: 0.50, layer 10: 0.25" in render_card(facts)  # numeric, not string, order


@pytest.mark.parametrize(
    ("text", "meta"),
    [
        ("---\nlicense: mit\n---\nbody", {"license": "mit"}),
        ("no metadata\n", {}),
        ("---\nlicense: [unclosed\n---\n", {}),
        ("---\n- a list\n---\n", {}),
    ],
)
def test_front_matter(text: str, meta: dict) -> None:
    assert front_matter(text) == meta


def test_expert_grid_scales_each_layer() -> None:
    grid = expert_grid(PLAN)
    assert grid.shape == (2, 8)
    np.testing.assert_allclose(grid[0], [1.0, 0.75, 0.75, 0.0, 0.25, 0.625, 0.25, 0.25])  # (s - 0) / (4 - 0)
    np.testing.assert_allclose(grid[1], 0.5)  # all equal: no order to show
    unscored = expert_grid(replace(PLAN, scores={}))
    assert unscored[0].tolist() == [1, 1, 1, 0, 0, 1, 0, 0]


def test_expert_map_is_a_png(tmp_path: Path) -> None:
    assert draw_expert_map(PLAN, tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measure_counts_parameters_from_headers(built: Callable[[str], Path]) -> None:
    src = built("qwen3_moe_multishard")
    parameters, size = measure(open_checkpoint(src))
    shards = sorted(src.glob("*.safetensors"))
    expected = 0
    for shard in shards:  # counted here through the safetensors library instead of moeslim's header parser
        with safe_open(shard, framework="np") as f:
            expected += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    assert parameters == expected and size == sum(p.stat().st_size for p in shards)


def test_base_model_of_a_local_folder(built: Callable[[str], Path], tmp_path: Path) -> None:
    src = built("qwen3_moe")
    assert base_model_id(str(src), open_checkpoint(src)) is None  # a folder of unknown origin
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    for file in src.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    assert base_model_id(str(snapshot), open_checkpoint(snapshot)) == "org/name"  # a Hub cache snapshot
    config = json.loads((src / "config.json").read_text())
    (tmp_path / "named").mkdir()
    for file in src.iterdir():
        (tmp_path / "named" / file.name).write_bytes(file.read_bytes())
    (tmp_path / "named" / "config.json").write_text(json.dumps({**config, "_name_or_path": "Qwen/Qwen3-30B-A3B"}))
    assert base_model_id(str(tmp_path / "named"), open_checkpoint(tmp_path / "named")) == "Qwen/Qwen3-30B-A3B"


@pytest.mark.parametrize("matplotlib", ["installed", "missing"])
def test_slim_writes_a_complete_card(matplotlib: str, built: Callable[[str], Path], tmp_path: Path) -> None:
    """The real CLI in a fresh interpreter; 'missing' makes ``import matplotlib`` fail there."""
    hide = "sys.modules['matplotlib'] = None; " if matplotlib == "missing" else ""
    args = ["slim", str(built("qwen3_moe")), "--keep", "4", "--out", "pruned"]
    code = f"import sys; {hide}sys.argv = ['moeslim', *{args!r}]; from moeslim.cli import main; main()"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "pruned"
    card = (out / "README.md").read_text()
    assert _meta(card)["license"] == "apache-2.0"  # from the fixture's base card
    assert f"```bash\nmoeslim {' '.join(args)}\n```" in card
    for heading in ("## Original and pruned", "## How it was made", "## Validation", "## Expert map", "## License"):
        assert heading in card
    assert "| 0 | " in card  # the kept map is there either way
    image = out / "expert_map.png"
    if matplotlib == "installed":
        assert "](expert_map.png)" in card and image.read_bytes()[:4] == b"\x89PNG"
    else:
        assert not image.exists() and "pip install 'moeslim[plot]'" in card and "](expert_map.png)" not in card


# The base card is someone else's: hostile license names and links, built from the pieces that break Markdown,
# HTML, YAML and terminals, and from arbitrary text.
HOSTILE = [
    "`",
    "``",
    "```",
    "*",
    "_",
    "[",
    "]",
    "(",
    ")",
    "<",
    ">",
    "!",
    "#",
    "|",
    "\\",
    "&amp;",
    "\n",
    "\r\n",
    "\u2028",
    "\x1b[31m",
    "\u202e",
    "\x00",
    " ",
    "---",
    "<script>alert(1)</script>",
    "<img src=x onerror=1>",
    "javascript:alert(1)",
    "data:text/html,x",
    "//evil.example",
    "../",
    "https://",
    "apache-2.0",
    "é",
    "LICENSE",
]
hostile_text = st.one_of(st.lists(st.sampled_from(HOSTILE), max_size=8).map("".join), st.text(max_size=30))
links = st.one_of(
    hostile_text,
    st.sampled_from(
        [
            "https://example.com/LICENSE",
            "http://example.com:8080/a(b)?c=d#e",
            "LICENSE",
            "docs/LICENSE.md",
            "JavaScript:alert(1)",
            " javascript:alert(1)",
            "https://x.com/[a](javascript:alert(1))",
            "https://x.com/a b",
            "https://x.com/\n# Owned",
            "file:///etc/passwd",
            "/LICENSE",
            "a/../../x",
        ]
    ),
    st.builds(lambda head, tail: head + tail, st.sampled_from(["https://example.com/", "LICENSE"]), hostile_text),
)
values = st.one_of(hostile_text, st.none(), st.integers(), st.lists(hostile_text, max_size=3), st.dictionaries(
    st.text(max_size=3), st.text(max_size=3), max_size=2))  # fmt: skip


def _markdown() -> MarkdownIt:
    """CommonMark as the Hub would read it, but with every link kept, so that a dangerous one shows."""
    md = MarkdownIt("commonmark")
    md.validateLink = lambda url: True
    return md


def _safe_link(href: str) -> bool:
    """An http(s) URL with a host, or a path inside the repo: what a card may link to."""
    from urllib.parse import urlsplit

    parts = urlsplit(href)
    if parts.scheme:
        return parts.scheme in ("http", "https") and bool(parts.netloc)
    return not parts.netloc and not href.startswith("/") and ".." not in href.split("/")


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(name=values, link=st.one_of(links, values), license=values, language=values)
def test_hostile_license_metadata_cannot_inject_into_the_card(name, link, license, language) -> None:
    base = {"license_name": name, "license_link": link, "license": license, "language": language}
    card = render_card(replace(FACTS, base_card=base))
    meta = _meta(card)  # the front matter still parses
    for key in ("license", "license_name"):
        if key in meta:
            assert isinstance(meta[key], str) and meta[key] == " ".join(meta[key].split()), meta[key]
            assert not any(unicodedata.category(c).startswith("C") for c in meta[key])  # no escapes, no bidi
    if "license_link" in meta:
        assert _safe_link(meta["license_link"]) and meta["license_link"] == link.strip()
    body = card.split("\n---\n", 1)[1]
    tokens = _markdown().parse(body)
    benign = _markdown().parse(render_card(replace(FACTS, base_card={})).split("\n---\n", 1)[1])
    inline = [c for t in tokens if t.type == "inline" for c in t.children or []]

    def html(parsed: list) -> list[str]:
        """The HTML the Markdown holds, as blocks and inline: the card's own <details>, nothing else."""
        inline = [c for t in parsed if t.type == "inline" for c in t.children or []]
        return [t.content for t in [*parsed, *inline] if t.type in ("html_block", "html_inline")]

    assert html(tokens) == html(benign)
    assert [t.tag for t in tokens if t.type == "heading_open"] == [t.tag for t in benign if t.type == "heading_open"]
    assert all(_safe_link(str(c.attrs["href"])) for c in inline if c.type == "link_open")
    section = body[body.index("## License") :]
    assert section.count("\n") == 3  # heading, blank line, one line of text
    shown = meta.get("license_name") or meta.get("license")
    if shown:
        codes = [c.content for t in _markdown().parse(section) if t.type == "inline" for c in t.children or []
                 if c.type == "code_inline"]  # fmt: skip
        assert codes == [shown]  # the name, whole and literal, in one code span


@pytest.mark.parametrize(
    ("link", "kept"),
    [("https://example.com/LICENSE", True), ("LICENSE", True), ("docs/LICENSE.md", True),
     ("javascript:alert(1)", False), ("JavaScript:alert(1)", False), ("data:text/html,x", False),
     ("//evil.example/x", False), ("/etc/passwd", False), ("../LICENSE", False), ("file:///etc/passwd", False),
     ("https://x.com/a b", False), ("https://x.com/\n# Owned", False), ("mailto:a@b.c", False)],
)  # fmt: skip
def test_license_links_kept_and_dropped(link: str, kept: bool) -> None:
    card = render_card(replace(FACTS, base_card={"license_name": "x", "license_link": link}))
    assert ("license_link" in _meta(card)) is kept
    assert (link in card) is kept
