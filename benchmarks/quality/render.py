"""The quality study's results: the ``Result`` record, its JSON files, the tables, the plot and the decision."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from significance import Difference, Runs, choose_default, difference

from moeslim.criteria import AUTO, CRITERIA, DEFAULT_CRITERION

CANDIDATES = [c for c in CRITERIA if c != "random"]  # criteria that can be the default (one-shot labels)
SINGLE = [c for c in CANDIDATES if c != AUTO]  # one criterion each (auto chooses among them per run)


@dataclass(frozen=True)
class Result:
    fixture: str
    keep: int
    criterion: str  # e.g. "ean", "ean --progressive", "random"
    seed: int | None  # random's --seed, or a calibrated criterion's calibration seed; None: data-free
    perplexity: float | None  # None: infeasible keep (say why in note)
    kl: float | None
    top1: float | None
    stability: float | None
    seconds: float
    note: str = ""
    per_sequence: dict[str, list[float]] | None = None  # kl, nll of each held-out sequence


RESULTS = ("rows", "task", "sizes")  # the lists of results in a fixture's data


def save(data: dict, path: Path) -> None:
    """Indented JSON, with flat lists (the per-sequence values) on one line each."""
    plain = {**data, **{k: [vars(r) for r in data[k]] for k in RESULTS}}
    text = re.sub(r"\[([^\[\]{}]*)\]", lambda m: "[" + " ".join(m[1].split()) + "]", json.dumps(plain, indent=1))
    path.write_text(text + "\n", encoding="utf-8")


def load(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    return {**data, **{k: [Result(**r) for r in data[k]] for k in RESULTS}}


def fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def replicates(rows: list[Result], keep: int) -> dict[str, list[Result]]:
    """label → its feasible runs at ``keep`` (several seeds, or one), in the order they were run."""
    out: dict[str, list[Result]] = {}
    for r in rows:
        if r.keep == keep and r.perplexity is not None:
            out.setdefault(r.criterion, []).append(r)
    return out


def cell(runs: list[Result]) -> str:
    """``ppl · KL`` over the seeds, with the perplexity's standard deviation over seeds when there are several.

    The perplexity is the geometric mean over seeds: ``exp`` of the mean NLL of all their tokens (every run scores
    the same number), the value the paired comparison reports."""
    if not runs:
        return "infeasible"
    spread = f" ± {statistics.stdev(r.perplexity or 0.0 for r in runs):.3f}" if len(runs) > 1 else ""
    return f"{_mean(runs, 'perplexity'):.3f}{spread} · {_mean(runs, 'kl'):.4f}"


def label_of(label: str, runs: int) -> str:
    if label == DEFAULT_CRITERION:
        return f"**{label}** (default)"
    return f"{label}, {runs} seeds" if label == "random" else label


def main_table(name: str, data: dict) -> str:
    rows: list[Result] = data["rows"]
    keeps = sorted({r.keep for r in rows}, reverse=True)
    by_keep = {k: replicates(rows, k) for k in keeps}
    labels = list(dict.fromkeys(r.criterion for r in rows))
    head = "| criterion | " + " | ".join(f"keep {k}/{data['experts']}: ppl · KL" for k in keeps) + " |"
    lines = [head, "|" + " --- |" * (len(keeps) + 1)]
    for label in labels:
        seeds = max(len(by_keep[k].get(label, [])) for k in keeps)
        cells = [cell(by_keep[k].get(label, [])) for k in keeps]
        lines.append(f"| {label_of(label, seeds)} | " + " | ".join(cells) + " |")
    return f"### {name}: original held-out perplexity {data['original']:.3f}\n\n" + "\n".join(lines)


def paired(results: list[Result], keep: int) -> dict[str, Runs]:
    """label → its replicates' per-sequence values at ``keep``."""
    groups = replicates(results, keep)
    return {label: Runs.of([r.per_sequence for r in rs if r.per_sequence]) for label, rs in groups.items()}


def interval(d: Difference) -> str:
    return f"{d.point:+.3f} ({d.low:+.3f} … {d.high:+.3f})"


VERDICT = {"lower": "**better than the default**", "higher": "default better", "same": "within noise"}
VERDICT_TASK = {"lower": "prose better", "higher": "code better", "same": "within noise"}


def comparison_table(name: str, data: dict) -> str:
    """Every plan at the deciding keep against the default, sequence by sequence, with 95 % intervals."""
    plans = paired(data["rows"], data["decide"])
    default = plans[DEFAULT_CRITERION]
    lines = [
        "| plan | ppl | Δ ppl (95 % interval) | by ppl | KL | Δ KL (95 % interval) | by KL |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for label, runs in plans.items():
        if label == DEFAULT_CRITERION:
            continue
        d = {m: difference(default, runs, m) for m in ("perplexity", "kl")}
        lines.append(f"| {label_of(label, len(runs.kl))} | {runs.point('perplexity'):.3f} | {interval(d['perplexity'])}"
                     f" | {VERDICT[d['perplexity'].verdict]} | {runs.point('kl'):.4f} | {interval(d['kl'])}"
                     f" | {VERDICT[d['kl'].verdict]} |")  # fmt: skip
    keep = f"{data['decide']}/{data['experts']}"
    return (
        f"### {name}: keep {keep}, every plan against the default `{DEFAULT_CRITERION}`"
        f" ({default.point('perplexity'):.3f} · {default.point('kl'):.4f})\n\n"
        "Δ: the plan minus the default (negative: the plan loses less); paired over the"
        f" {default.kl.shape[1]} held-out sequences and resampled over seeds.\n\n" + "\n".join(lines)
    )


def operating_points(all_data: dict[str, dict]) -> dict[str, dict[str, Runs]]:
    """``"fixture keep k/E"`` → its one-shot plans and random, for every fixture and feasible keep."""
    points = {}
    for name, d in all_data.items():
        for keep in sorted({r.keep for r in d["rows"]}, reverse=True):
            plans = {k: v for k, v in paired(d["rows"], keep).items() if k in CANDIDATES or k == "random"}
            if plans:
                points[f"{name} keep {keep}/{d['experts']}"] = plans
    return points


def decide_default(all_data: dict[str, dict]) -> tuple[str, dict[str, list[tuple[str, str, str]]]]:
    """The default criterion by ``significance.choose_default`` over every fixture and keep, and each candidate's
    losses. Candidates: the one-shot criteria measured everywhere; random counts as a rival, not a candidate."""
    points = operating_points(all_data)
    candidates = [c for c in CANDIDATES if all(c in plans for plans in points.values())]
    return choose_default(points, candidates, DEFAULT_CRITERION)


def against_best_single(all_data: dict[str, dict]) -> list[tuple[str, str, str, Runs, Runs, Difference]]:
    """At every fixture and keep and per metric: (point, metric, the best single criterion there, its runs, the
    default's runs, the paired difference default − best). The rival has the lowest point value, chosen after
    the fact: the strictest comparison."""
    out = []
    for point, plans in operating_points(all_data).items():
        if DEFAULT_CRITERION not in plans:
            continue
        default = plans[DEFAULT_CRITERION]
        rivals = {c: r for c, r in plans.items() if c in SINGLE and c != DEFAULT_CRITERION}
        for metric in ("kl", "perplexity"):
            best = min(rivals, key=lambda c: rivals[c].point(metric))
            out.append((point, metric, best, rivals[best], default, difference(rivals[best], default, metric)))
    return out


def best_single_table(all_data: dict[str, dict]) -> str:
    """At every fixture and keep, the default against the best single criterion there, paired over held-out
    sequences."""
    lines = [
        "| fixture, keep | metric | best single criterion | its value | default | Δ default − best (95 % interval)"
        " | verdict |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    verdict = {"lower": "**default better**", "higher": "best single better", "same": "within noise"}
    for point, metric, best, rival, default, d in against_best_single(all_data):
        lines.append(f"| {point} | {metric} | {best} | {rival.point(metric):.4f}"
                     f" | {default.point(metric):.4f} | {interval(d)} | {verdict[d.verdict]} |")  # fmt: skip
    return (
        f"### The default `{DEFAULT_CRITERION}` against the best single criterion, at every keep\n\n"
        "The rival is, per metric, whichever single criterion scored best there on the held-out text (chosen after"
        " the fact, so the strictest comparison), measured as the criterion alone (`--no-correct`); the default is"
        " what `slim` does without options: `auto`'s plan, then the correction. Δ is paired over the held-out"
        " sequences and resampled over seeds.\n\n" + "\n".join(lines)
    )


def decision(all_data: dict[str, dict]) -> str:
    choice, lost = decide_default(all_data)
    lines = ["| candidate | cells lost | significantly better there |", "| --- | ---: | --- |"]
    for c, ls in sorted(lost.items(), key=lambda kv: len({(f, m) for f, m, _ in kv[1]})):
        cells: dict[tuple[str, str], list[str]] = {}
        for f, m, other in ls:
            cells.setdefault((f, m), []).append(other)
        where = "; ".join(f"{f} {m}: {', '.join(o)}" for (f, m), o in cells.items()) or "—"
        lines.append(f"| {label_of(c, 1)} | {len(cells)} | {where} |")
    verdict = (
        f"`{choice}`, moeslim's default." if choice == DEFAULT_CRITERION
        else f"`{choice}`, not moeslim's default `{DEFAULT_CRITERION}`: change `DEFAULT_CRITERION` in"
             " `moeslim/criteria.py` (`tests/test_quality_default.py` fails until it follows)."
    )  # fmt: skip
    return (
        "### The default criterion, by the rule in `significance.py`\n\n"
        "A candidate loses a cell (fixture × keep × metric) when another criterion, random"
        " included, is significantly better there; the default loses the fewest cells, and the incumbent stays"
        f" among equals. Chosen: {verdict}\n\n" + "\n".join(lines)
    )


def small_table(results: list[Result], what: str) -> str:
    """One row per label: ``ppl · KL`` over its seeds (as in the main table) and the mean kept-set stability."""
    lines = [f"| {what} | held-out ppl · KL | stability |", "| --- | ---: | ---: |"]
    for label, runs in replicates(results, results[0].keep).items():
        stability = [r.stability for r in runs if r.stability is not None]
        lines.append(f"| {label} | {cell(runs)} | {fmt(statistics.mean(stability) if stability else None, 2)} |")
    return "\n".join(lines)


def task_table(name: str, data: dict) -> str:
    """Calibrating on code against calibrating on prose, both measured on held-out code, paired."""
    code, prose = paired(data["task"], data["decide"]).values()  # in the order run: code, then prose
    d = {m: difference(code, prose, m) for m in ("perplexity", "kl")}
    return (
        f"### {name}: task-specific calibration (keep {data['decide']}/{data['experts']}, measured on held-out"
        f" *code*; original perplexity {fmt(data['original_code'])})\n\n"
        + small_table(data["task"], "calibration")
        + f"\n\nProse minus code, paired over the {code.kl.shape[1]} held-out code sequences and resampled over"
        f" seeds: Δ ppl {interval(d['perplexity'])}, Δ KL {interval(d['kl'])} (negative: calibrating on prose"
        f" loses less on code); by ppl {VERDICT_TASK[d['perplexity'].verdict]}, by KL {VERDICT_TASK[d['kl'].verdict]}."
    )


def plot(all_data: dict[str, dict], path: Path) -> bool:
    """Held-out perplexity (top) and mean KL (bottom) against experts kept, one column per fixture: a colour per
    criterion, dashed for ``--progressive``, random's range over seeds shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colours = {c: plt.get_cmap("tab10")(i) for i, c in enumerate(CANDIDATES)}
    fig, axes = plt.subplots(2, len(all_data), figsize=(6 * len(all_data), 8), squeeze=False)
    for column, (name, data) in enumerate(all_data.items()):
        rows: list[Result] = data["rows"]
        keeps = sorted({r.keep for r in rows})
        groups = {k: replicates(rows, k) for k in keeps}
        for ax, metric in zip(axes[:, column], ("perplexity", "kl"), strict=True):
            for label in dict.fromkeys(r.criterion for r in rows if r.criterion != "random"):
                pts = [(k, _mean(groups[k][label], metric)) for k in keeps if label in groups[k]]
                style = {"color": colours[label.split()[0]], "linewidth": 1.2,
                         "linestyle": "--" if "--progressive" in label else "-"}  # fmt: skip
                if label == DEFAULT_CRITERION:
                    style.update(color="black", linewidth=3)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, label=label, **style)
            ks = [k for k in keeps if "random" in groups[k]]
            rand = {k: [getattr(r, metric) or 0.0 for r in groups[k]["random"]] for k in ks}
            ax.fill_between(ks, [min(rand[k]) for k in ks], [max(rand[k]) for k in ks], alpha=0.2, color="gray",
                            label="random (range over seeds)")  # fmt: skip
            if metric == "perplexity":
                ax.axhline(data["original"], linestyle=":", color="gray", linewidth=1)
                ax.set_yscale("log")
            ylabel = "held-out perplexity" if metric == "perplexity" else "mean KL(original ‖ pruned)"
            ax.set(title=f"{name} ({data['experts']} experts)", xlabel="experts kept per layer", ylabel=ylabel,
                   xticks=keeps)  # fmt: skip
        axes[0, column].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _mean(runs: list[Result], metric: str) -> float:
    """Over seeds, as in the tables: the geometric mean of perplexities, the mean of KLs."""
    values = [getattr(r, metric) or 0.0 for r in runs]
    return statistics.geometric_mean(values) if metric == "perplexity" else statistics.mean(values)


def report(all_data: dict[str, dict], settings: str, out: Path) -> str:
    minutes = ", ".join(f"{name} {d['seconds'] / 60:.1f} minutes" for name, d in all_data.items())
    parts = [
        f"Measured with `python benchmarks/quality/study.py` ({minutes} on this machine); {settings}."
        " Cells: held-out perplexity · mean KL(original ‖ pruned) per token; ± is the standard deviation of the"
        " perplexity over seeds (calibration seeds for calibrated criteria, random's seeds for random).",
    ]
    parts += [main_table(name, data) for name, data in all_data.items()]
    if plot(all_data, out / "quality.png"):
        parts.append("![held-out perplexity against experts kept](quality.png)")
    parts.append(best_single_table(all_data))
    parts += [comparison_table(name, data) for name, data in all_data.items()]
    parts.append(decision(all_data))
    for name, data in all_data.items():
        parts.append(task_table(name, data))
        parts.append(f"### {name}: calibration size (keep {data['decide']}/{data['experts']})\n\n"
                     + small_table(data["sizes"], "criterion"))  # fmt: skip
    return "\n\n".join(parts) + "\n"


def splice(readme: Path, text: str, start: str = "<!-- results -->", end: str = "<!-- /results -->") -> None:
    """Put ``text`` between the markers of ``readme`` (the written analysis stays; the numbers are regenerated)."""
    if not readme.is_file():
        return
    doc = readme.read_text(encoding="utf-8")
    if start in doc and end in doc:
        head, rest = doc.split(start, 1)
        readme.write_text(f"{head}{start}\n{text}{end}{rest.split(end, 1)[1]}", encoding="utf-8")
