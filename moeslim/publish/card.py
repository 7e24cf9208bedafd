"""The model card (``README.md``) of a pruned checkpoint, rendered from plain data.

Pure: every number comes in through ``CardFacts`` (measured by ``publish.facts``), so the card is tested
on hand-made values. The card states what changed, how to reproduce it, how it was validated, which experts
each layer kept, and that the base model's license applies.

The base card's metadata is someone else's content: what is carried from it is text on one line (no newlines or
control characters), set in a code span with a fence no backtick in it can close, and a license link only when it
is an http(s) URL or a path inside the repo (``LICENSE``), so a ``javascript:`` link or injected markup never
reaches the new card.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from dataclasses import dataclass, field

import yaml

from moeslim.inspection import format_ranges
from moeslim.jsonio import is_number as measured
from moeslim.names import PLAN_NAME
from moeslim.plan import Correction, Plan
from moeslim.units import human_bytes
from moeslim.validate.report import LABELS, NOT_MEASURED

TAGS = ["moe", "pruned", "expert-pruning", "moeslim"]
CARRIED_KEYS = ("license", "license_name", "license_link", "language")  # from the base card's metadata
URL = re.compile(
    r"https?://[A-Za-z0-9.-]+(?::\d+)?(?:/[A-Za-z0-9\-._~!$&'()*+,;=:@%/?#]*)?", re.ASCII
)  # no <, >, spaces
REPO_PATH = re.compile(r"(?!/)(?!.*(?:^|/)\.\.(?:/|$))[A-Za-z0-9._/-]+", re.ASCII)  # e.g. LICENSE: no scheme, no ..
PLOT_HINT = "pip install 'moeslim[plot]'"
CALIBRATION_LABELS = {  # keys of the plan's calibration provenance; others are shown under their own name
    "data": "data",
    "digest": "token digest (sha256)",
    "tokens": "tokens",
    "samples": "sequences",
    "seq_len": "tokens per sequence",
    "seed": "seed",
    "progressive": "progressive (each layer calibrated on the pruned layers before it)",
    "stability": "kept-set stability (Jaccard of the sets chosen from two halves of the data)",
}


@dataclass(frozen=True)
class Side:
    """One model of the comparison table."""

    experts: int  # routed experts per MoE layer
    top_k: int  # experts active per token
    parameters: int  # elements over all tensors, as stored
    file_bytes: int  # safetensors files on disk


@dataclass(frozen=True)
class CardFacts:
    name: str  # the pruned model's name (repo name or output folder)
    source: str  # as given on the command line: a repo id or a local folder
    base_model: str | None  # Hub repo id of the base model, when known
    source_revision: str | None  # commit of the Hub snapshot that was pruned
    model_type: str
    original: Side
    pruned: Side
    plan: Plan
    version: str  # moeslim's
    command: str  # the command that made it, as run
    base_card: dict = field(default_factory=dict)  # the base card's YAML metadata
    validation: dict | None = None  # validation.json, when validated
    image: str | None = None  # expert map image file, when drawn
    packed_fp4: bool = False  # MXFP4 `_blocks` tensors hold two values per stored byte
    endpoint: str = "https://huggingface.co"


def render_card(f: CardFacts) -> str:
    sections = [_front_matter(f), _intro(f), _comparison(f), _how_made(f), _validation(f), _expert_map(f)]
    return "\n\n".join([*sections, _license(f)]) + "\n"


def card_metadata(f: CardFacts) -> dict:
    """The card's YAML metadata: base model, license carried from the base card, tags, library, task."""
    meta: dict = {"base_model": f.base_model} if f.base_model else {}
    meta.update(carried(f.base_card))
    meta["tags"] = [*TAGS, f.model_type]
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = one_line(f.base_card.get("pipeline_tag")) or "text-generation"
    return meta


def carried(base_card: dict) -> dict:
    """What the new card carries from the base card's metadata (``CARRIED_KEYS``), made safe: text on one line
    (``language`` may be a list of such), the link only where ``license_link`` allows it; the rest left out."""
    meta = {}
    for key in CARRIED_KEYS:
        value = base_card.get(key)
        if key == "license_link":
            clean: object = license_link(value)
        elif key == "language" and isinstance(value, list):  # the one key the Hub takes as a list
            clean = [text for text in map(one_line, value) if text]
        else:
            clean = one_line(value)
        if clean:
            meta[key] = clean
    return meta


def one_line(value: object) -> str | None:
    """``value`` if it is text, on one line: control and format characters (ANSI escapes, bidi overrides)
    dropped, runs of whitespace (newlines too) made one space; None for anything else or nothing left."""
    if not isinstance(value, str):
        return None
    kept = "".join(c if not unicodedata.category(c).startswith("C") else " " for c in value)
    return " ".join(kept.split()) or None


def license_link(value: object) -> str | None:
    """``value`` if it is an http(s) URL or a path inside the repo (``LICENSE``, resolved by the Hub against this
    repo, where the base model's files are copied); None for any other link (``javascript:``, ``data:``, ``//host``)."""
    if not isinstance(value, str):
        return None
    link = value.strip()
    return link if URL.fullmatch(link) or REPO_PATH.fullmatch(link) else None


def front_matter(text: str) -> dict:
    """The YAML metadata block at the top of a model card, or ``{}`` when absent or unreadable."""
    if not text.startswith("---"):
        return {}
    parts = text.split("\n---", 1)
    try:
        meta = yaml.safe_load(parts[0][3:]) if len(parts) == 2 else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _front_matter(f: CardFacts) -> str:
    return "---\n" + yaml.safe_dump(card_metadata(f), sort_keys=False, allow_unicode=True) + "---"


def _base_link(f: CardFacts) -> str:
    if f.base_model:
        return f"[{f.base_model}]({f.endpoint}/{f.base_model})"
    return f"a local checkpoint (`{f.source}`)"


def _intro(f: CardFacts) -> str:
    p = f.plan
    return (
        f"# {f.name}\n\n"
        f"Pruned from {_base_link(f)}: {p.keep} of its {p.num_experts} routed experts are kept in each of its"
        f" {len(p.kept)} MoE layers ({p.top_k} active per token). The other experts were cut out of the safetensors"
        f" files by moeslim {f.version}: the routers are sliced to match, and every other tensor is byte-identical"
        " to the base model (quantised weights included). Pruning removes capacity: check the validation below,"
        " and your own evaluation, before relying on it."
    )


def _comparison(f: CardFacts) -> str:
    o, n = f.original, f.pruned
    rows = [
        ("experts per MoE layer", o.experts, n.experts),
        ("active experts per token", o.top_k, n.top_k),
        ("total parameters", _count(o.parameters), _count(n.parameters)),
        ("file size (safetensors)", human_bytes(o.file_bytes), human_bytes(n.file_bytes)),
    ]
    table = _table(["", "original", "pruned"], rows)
    if f.packed_fp4:
        table += (
            "\n\nParameters are counted as stored: MXFP4 `_blocks` tensors pack two 4-bit values per byte and"
            " count one per byte, so their true count is twice what they add here."
        )
    return "## Original and pruned\n\n" + table


def _how_made(f: CardFacts) -> str:
    p = f.plan
    source = f"`{f.source}`" + (f" at commit `{f.source_revision}`" if f.source_revision else "")
    lines = [
        f"- source: {source}",
        f"- criterion: `{p.criterion}` (experts with the highest scores kept in every layer)",
        _calibration(p.calibration),
        _correction(p.correction),
        f"- seed: {p.seed if p.seed is not None else 'not used by the criterion'}",
        f"- moeslim version: {f.version}",
        f"- plan (kept expert ids and scores per layer): `{PLAN_NAME}` in this repo",
    ]
    made = f"The command that made it:\n\n```bash\n{f.command}\n```" if f.command else "Made through the Python API."
    refit = " (with the same calibration data: the correction is refit)" if p.correction.fitted else ""
    return (
        "## How it was made\n\n" + "\n".join(lines) + f"\n\n{made}\n\n"
        f"The same weights and config, byte for byte, from the plan in this repo{refit}:"
        f" `moeslim slim {shlex.quote(f.source)} --plan {PLAN_NAME}`."
    )


def _correction(correction: Correction) -> str:
    """Whether and how the kept experts were corrected after pruning."""
    if correction.fitted:
        corrected = sum(correction.experts.values())
        return f"- correction: {correction.method} ({corrected} kept experts refit on the calibration tokens)"
    if correction.skipped is not None:
        return f"- correction: none ({correction.skipped})"
    return "- correction: none"


def _calibration(calibration: dict) -> str:
    """The calibration provenance as a nested list, one labelled item per recorded key."""
    if not calibration:
        return "- calibration: none: data-free criterion, no calibration data"
    items = [f"{CALIBRATION_LABELS.get(k, k.replace('_', ' '))}: {_value(v)}" for k, v in calibration.items()]
    return "- calibration:" + "".join(f"\n  - {item}" for item in items)


def _validation(f: CardFacts) -> str:
    report = f.validation or {}
    summary = report.get("summary")
    note = f"Validation (`moeslim validate`, details in `validation.json`): {_value(summary)}." if summary else ""
    if not any(k in report for k in LABELS):  # not validated, or the numeric comparison was skipped
        return "## Validation\n\n" + (note or "Not validated yet: no `validation.json` was found next to the weights.")
    parts = [_table(["metric", "value"], [(label, _metric(report.get(k))) for k, label in LABELS.items()])]
    if errors := _layer_errors(report):
        parts.append(f"Relative error of each MoE layer's output (cumulative): {_per_layer(errors)}.")
    return "## Validation\n\n" + "\n\n".join([*parts, note] if note else parts)


def _layer_errors(report: dict) -> dict:
    """MoE layer → relative error of its output, from the report's ``layers`` list."""
    rows = [e for e in report.get("layers") or [] if isinstance(e, dict) and isinstance(e.get("layer"), int)]
    return {e["layer"]: e.get("relative_error") for e in rows}


def _expert_map(f: CardFacts) -> str:
    if f.image:
        picture = (
            f"![Expert scores per layer, kept experts marked]({f.image})\n\n"
            f"Rows are MoE layers, columns original expert ids; colour is the `{f.plan.criterion}` score scaled"
            " within each layer, and dots mark the kept experts."
        )
    else:
        picture = (
            "The expert map image was not drawn because matplotlib is not installed"
            f" (`{PLOT_HINT}` and prune again to get it); the table below holds the same kept sets."
        )
    rows = [(i, format_ranges(list(kept))) for i, kept in sorted(f.plan.kept.items())]
    table = _table(["layer", "kept experts (original ids; renumbered 0..N-1 in this order)"], rows)
    return (
        f"## Expert map\n\n{picture}\n\n<details>\n<summary>Kept experts per layer</summary>\n\n{table}\n\n</details>"
    )


def _license(f: CardFacts) -> str:
    meta = carried(f.base_card)
    name = meta.get("license_name") or meta.get("license")
    text = f"## License\n\nThis is a derivative of {_base_link(f)}, and the base model's license applies"
    if not isinstance(name, str):
        return text + ". The base card declares no license: check the base model's terms before you share this model."
    link = meta.get("license_link")
    shown = "" if link is None else f" (<{link}>)" if URL.fullmatch(link) else f" ([{link}]({link}))"
    return text + f": {_code(name)}{shown}. Read the base model's card for its terms and any use restrictions."


def _code(text: str) -> str:
    """``text`` as a Markdown code span, whose content is never read as markup: fenced by one backtick more than its
    longest run of them, and padded where it starts or ends with one (CommonMark strips one space each side)."""
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _table(header: list[str], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _count(n: int) -> str:
    """58_368 → '58.4K'; 30_532_122_624 → '30.53B'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}" if unit in "TB" else f"{n / size:.1f}{unit}"
    return str(n)


def _value(v: object) -> str:
    """A value for one table cell or list item: labelled, short, with no line breaks or pipes."""
    if isinstance(v, dict) and v and all(str(k).isdigit() for k in v):
        text = _per_layer(v)
    elif isinstance(v, dict):
        text = "; ".join(f"{str(k).replace('_', ' ')}: {_value(x)}" for k, x in v.items())
    elif isinstance(v, list | tuple):
        text = ", ".join(_value(x) for x in v)
    else:
        text = _metric(v)
    return " ".join(text.split()).replace("|", "\\|")


def _metric(v: object) -> str:
    """A number as 4 significant digits, yes/no for a flag, text as it is; None and NaN were not measured."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, str):
        return v
    if not measured(v):
        return NOT_MEASURED
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _per_layer(values: dict) -> str:
    """``{"0": 1.0, "1": 0.8333}`` → ``layer 0: 1.00, layer 1: 0.83`` (layers in order)."""
    items = sorted(values.items(), key=lambda kv: int(kv[0]))
    return ", ".join(f"layer {k}: {_short(x)}" for k, x in items)


def _short(v: object) -> str:
    """A per-layer value: two decimals, as in the terminal's stability line."""
    return f"{v:.2f}" if isinstance(v, float) and measured(v) else _metric(v)
