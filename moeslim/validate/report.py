"""The validation report: a table for the terminal, and ``validation.json`` for the model card."""

from __future__ import annotations

import json
from pathlib import Path

from moeslim.publish.facts import VALIDATION_NAME

LABELS = {
    "kl_mean": "KL(original ‖ pruned), mean per token",
    "kl_p95": "KL(original ‖ pruned), 95th percentile",
    "top1_agreement": "top-1 agreement",
    "perplexity_original": "perplexity, original",
    "perplexity_pruned": "perplexity, pruned",
    "scored_tokens": "scored tokens",
}


def write_report(report: dict, path: Path) -> Path:
    """Write ``report`` as JSON to ``path`` (a folder gets ``validation.json``); return the file."""
    target = path / VALIDATION_NAME if path.is_dir() else path
    target.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return target


def format_report(report: dict) -> str:
    """The report as plain text: structure, data, metrics, per-layer errors, generations."""
    s = report["structure"]
    lines = [
        f"validated {report['pruned']} against {report['original']} ({report['experts']} experts per MoE layer)",
        f"structure: ok ({s['tensors']} tensors, {s['checked_by_transformers']} loaded by transformers on the meta"
        f" device; top-{s['top_k']}, {s['moe_layers']} MoE layers, {s['mtp_layers']} MTP)",
        *(f"  note: {n}" for n in s["notes"]),
    ]
    if "kl_mean" not in report:
        return "\n".join([*lines, report["summary"]])
    d = report["data"]
    lines += [
        f"data: {d['sequences']} × {d['seq_len']} = {d['tokens']} tokens of {d['source']}",
        f"  held out: {d['heldout']}",
        "",
        _table([(LABELS[k], _number(report[k])) for k in LABELS]),
        "",
        _table(
            [(f"layer {e['layer']}", _number(e["relative_error"])) for e in report["layers"]],
            header=("MoE layer", "relative error (cumulative)"),
        ),  # fmt: skip
    ]
    lines += ["", f"generations: {report['generations_note']}"]
    for g in report["generations"]:
        lines += [f"  prompt:   {g['prompt']!r}", f"  original: {g['original']!r}", f"  pruned:   {g['pruned']!r}"]
    return "\n".join(lines)


def _table(rows: list[tuple[str, str]], header: tuple[str, str] = ("metric", "value")) -> str:
    width = max(len(r[0]) for r in [header, *rows])
    return "\n".join(f"{a:<{width}}  {b}" for a, b in [header, *rows])


def _number(v: float | int) -> str:
    return str(v) if isinstance(v, int) else f"{v:.6g}"
