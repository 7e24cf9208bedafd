"""The validation report: a table for the terminal, ``validation.json`` for the model card, and the ``--max-kl``
gate on its mean KL."""

from __future__ import annotations

from pathlib import Path

from moeslim import jsonio
from moeslim.names import VALIDATION_NAME
from moeslim.safefs import write_text_atomic

NOT_MEASURED = "not measured"
LABELS = {
    "kl_mean": "KL(original ‖ pruned), mean per token",
    "kl_p95": "KL(original ‖ pruned), 95th percentile",
    "top1_agreement": "top-1 agreement",
    "perplexity_original": "perplexity, original",
    "perplexity_pruned": "perplexity, pruned",
    "scored_tokens": "scored tokens",
}


def write_report(report: dict, path: Path) -> Path:
    """Write ``report`` as strict JSON to ``path`` (a folder gets ``validation.json``); return the file.

    A metric that could not be computed (NaN) is written as ``null``. The file is replaced in one step, never
    written through a link: a failed write leaves the previous report intact.
    """
    target = path / VALIDATION_NAME if path.is_dir() else path
    write_text_atomic(target, jsonio.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return target


def kl_gate(report: dict | None, max_kl: float | None) -> str | None:
    """Why ``--max-kl`` refuses the pruned model, or None when it passes (or no gate is set).

    A gate that measured nothing does not open: no report, a skipped numeric comparison (no float ``kl_mean``)
    or a NaN mean fail it, with the report's ``summary`` as the reason.
    """
    if max_kl is None:
        return None
    kl = (report or {}).get("kl_mean")
    if not jsonio.is_number(kl):
        why = (report or {}).get("summary") or "validation did not run"
        return (
            f"--max-kl {max_kl:g} cannot be checked because no KL was measured ({why}); pass --calib with more or"
            " other text than calibration used, or drop --max-kl"
        )
    if kl > max_kl:
        return f"mean KL {kl:.6g} exceeds --max-kl {max_kl:g}"
    return None


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
        _table([(label, _number(report.get(k))) for k, label in LABELS.items()]),
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


def _number(v: object) -> str:
    if not jsonio.is_number(v):
        return NOT_MEASURED
    return str(v) if isinstance(v, int) else f"{v:.6g}"
