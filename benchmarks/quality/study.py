"""Quality study: which experts to drop, measured on MoE models trained here (issue #6).

    python benchmarks/quality/study.py                 # full study: results.md, quality.png, README.md's tables
    python benchmarks/quality/study.py --smoke --out DIR   # a reduced run (what CI runs)

For every trained fixture in ``fixtures/trained/`` (Mixtral-style; DeepSeek-style when present) it prunes at
keep 75 %, 50 % and 25 % with every criterion, one-shot and ``--progressive``, and measures held-out perplexity
and KL(original ‖ pruned) through moeslim's own validation. Everything runs in-process through
``moeslim.pipeline.slim``, the same code path as the CLI.

Text: CPython's standard library sources (what the fixtures were trained on). Calibration comes from the
training files only, held-out text from the files listed in each fixture's ``heldout_files.json``; documents are
cut into 1,500-character pieces so samples span many files. The task-specific experiment splits the text into
two domains: code (the source with comments and docstrings removed, ``ast.unparse``) and prose (the comments
and docstrings), calibrates on each, and reports perplexity on held-out code for both.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import statistics
import sysconfig
import tempfile
import time
import tokenize
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from moeslim.calibrate.session import CalibrationOptions, run_calibration
from moeslim.errors import PlanError
from moeslim.layout import resolve_layout
from moeslim.pipeline import SlimOptions, slim
from moeslim.source import open_checkpoint
from moeslim.validate.run import ValidateOptions

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = {
    "mixtral": ROOT / "fixtures/trained/tiny-mixtral-16e",
    "deepseek": ROOT / "fixtures/trained/tiny-deepseek-16e",
}
DEFAULT_CRITERION = "ean"  # moeslim's default, restated so the table can mark it
DATA_FREE = ["router-norm", "weight-norm"]
CALIBRATED = ["frequency", "gate-mass", "soft-mass", "ean", "reap", "reconstruction"]
PROGRESSIVE = ["frequency", "gate-mass", "ean", "reap"]
PIECE_CHARS = 1500
SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__"}


@dataclass
class Settings:
    keeps: tuple[float, ...] = (0.75, 0.5, 0.25)
    criteria: list[str] = field(default_factory=lambda: DATA_FREE + CALIBRATED)
    progressive: list[str] = field(default_factory=lambda: list(PROGRESSIVE))
    random_seeds: int = 5
    calib_samples: int = 64  # × 128 tokens
    eval_samples: int = 32  # × 128 tokens
    sizes: tuple[int, ...] = (16, 64, 256)  # calibration samples for the size experiment
    size_criteria: tuple[str, ...] = ("ean", "reap", "frequency")
    fixtures: tuple[str, ...] = ("mixtral", "deepseek")


SMOKE = Settings(
    keeps=(0.5,), criteria=["router-norm", "ean"], progressive=["ean"], random_seeds=2, calib_samples=16,
    eval_samples=8, sizes=(8, 16), size_criteria=("ean",), fixtures=("mixtral",),
)  # fmt: skip


# --- text ---------------------------------------------------------------------------------------------------------


def split_files(model: Path) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of the stdlib, as the fixture's training script split them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    heldout = {root / p for p in json.loads((model / "heldout_files.json").read_text())["files"]}
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts))
    return [p for p in files if p not in heldout], [p for p in files if p in heldout]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def code_and_prose(text: str) -> tuple[str, str]:
    """(the source without comments and docstrings, the comments and docstrings); ('', '') if it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return "", ""
    prose = []
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                prose.append(value.value)
                body[0] = ast.Pass()
    with contextlib.suppress(tokenize.TokenError, SyntaxError):
        prose += [t.string.lstrip("#").strip() for t in tokenize.generate_tokens(io.StringIO(text).readline)
                  if t.type == tokenize.COMMENT]  # fmt: skip
    return ast.unparse(tree), "\n".join(p for p in prose if p)


def write_jsonl(texts: Iterable[str], out: Path) -> Path:
    with out.open("w", encoding="utf-8") as f:
        for text in texts:
            for start in range(0, len(text), PIECE_CHARS):
                f.write(json.dumps({"text": text[start : start + PIECE_CHARS]}) + "\n")
    return out


@dataclass(frozen=True)
class Texts:
    calib: Path  # training files, as they are
    heldout: Path  # held-out files, as they are
    calib_code: Path
    calib_prose: Path
    heldout_code: Path


def make_texts(model: Path, work: Path) -> Texts:
    train, heldout = split_files(model)
    split_train = [code_and_prose(read(p)) for p in train]
    split_heldout = [code_and_prose(read(p)) for p in heldout]
    return Texts(
        write_jsonl(map(read, train), work / "calib.jsonl"),
        write_jsonl(map(read, heldout), work / "heldout.jsonl"),
        write_jsonl((c for c, _ in split_train), work / "calib-code.jsonl"),
        write_jsonl((p for _, p in split_train), work / "calib-prose.jsonl"),
        write_jsonl((c for c, _ in split_heldout), work / "heldout-code.jsonl"),
    )


# --- runs ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    fixture: str
    keep: int
    criterion: str  # e.g. "ean", "ean --progressive", "random --seed 3"
    perplexity: float | None  # None: infeasible keep (say why in note)
    kl: float | None
    top1: float | None
    stability: float | None
    seconds: float
    note: str = ""


def run(model: Path, work: Path, keep: int, criterion: str, calib: Path, samples: int, eval_text: Path,
        eval_samples: int, *, seed: int | None = None, progressive: bool = False) -> dict:  # fmt: skip
    """Prune in-process and validate on held-out text; returns the validation report and the plan facts.

    One-shot calibrated criteria share statistics calibrated once per (text, size), as ``--stats`` would."""
    calibration = CalibrationOptions(calib=str(calib), samples=samples, seq_len=128)
    stats = None
    if criterion in CALIBRATED and not progressive:
        stats = work / f"stats-{calib.stem}-{samples}"
        if not (stats / "stats.json").is_file():
            ckpt = open_checkpoint(model)
            run_calibration(ckpt, resolve_layout(ckpt), calibration, out=stats)
    opts = SlimOptions(
        source=model, keep=keep, out=work / "out", criterion=criterion, seed=seed, overwrite=True, stats=stats,
        calibration=calibration,
        progressive=progressive,
        validation=ValidateOptions(calib=str(eval_text), samples=eval_samples, seq_len=128, seed=1, generations=0),
    )  # fmt: skip
    result = slim(opts)
    stability = result.plan.calibration.get("stability") or {}
    return {**(result.validation or {}), "stability": statistics.mean(stability.values()) if stability else None}


def study_fixture(name: str, model: Path, work: Path, s: Settings, log: Callable[[str], None]) -> dict:
    texts = make_texts(model, work)
    config = json.loads((model / "config.json").read_text())
    experts = int(config.get("n_routed_experts") or config["num_local_experts"])
    rows: list[Result] = []
    original: dict[str, float] = {}

    def measure(keep: int, label: str, calib: Path, samples: int, eval_text: Path, **kw: object) -> Result:
        start = time.perf_counter()
        criterion = label.split()[0]
        try:
            r = run(model, work, keep, criterion, calib, samples, eval_text, s.eval_samples, **kw)  # type: ignore[arg-type]
        except PlanError as e:
            return Result(name, keep, label, None, None, None, None, 0.0, str(e))
        original.setdefault(str(eval_text), r["perplexity_original"])
        res = Result(name, keep, label, r["perplexity_pruned"], r["kl_mean"], r["top1_agreement"], r["stability"],
                     time.perf_counter() - start)  # fmt: skip
        log(f"  {name} keep {keep}: {label:28s} ppl {res.perplexity:8.3f}  KL {res.kl:.4f}  ({res.seconds:.1f} s)")
        return res

    for fraction in s.keeps:
        keep = round(experts * fraction)
        for criterion in s.criteria:
            rows.append(measure(keep, criterion, texts.calib, s.calib_samples, texts.heldout))
        for criterion in s.progressive:
            rows.append(measure(keep, f"{criterion} --progressive", texts.calib, s.calib_samples, texts.heldout,
                                progressive=True))  # fmt: skip
        for seed in range(s.random_seeds):
            rows.append(measure(keep, f"random --seed {seed}", texts.calib, s.calib_samples, texts.heldout, seed=seed))
    half = round(experts * 0.5)
    task = {}
    for domain, calib in (("code", texts.calib_code), ("prose", texts.calib_prose)):
        task[domain] = measure(half, f"{DEFAULT_CRITERION} (calibrated on {domain})", calib, s.calib_samples,
                               texts.heldout_code)  # fmt: skip
    sizes = [measure(half, f"{c} ({n} × 128 tokens)", texts.calib, n, texts.heldout) for c in s.size_criteria
             for n in s.sizes]  # fmt: skip
    return {"experts": experts, "original": original[str(texts.heldout)], "rows": rows, "task": task,
            "sizes": sizes, "original_code": original.get(str(texts.heldout_code))}  # fmt: skip


# --- report -------------------------------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def main_table(name: str, data: dict) -> str:
    rows: list[Result] = data["rows"]
    keeps = sorted({r.keep for r in rows}, reverse=True)
    labels = [lab for lab in dict.fromkeys(r.criterion for r in rows) if not lab.startswith("random")]
    head = "| criterion | " + " | ".join(f"keep {k}/{data['experts']}: ppl · KL" for k in keeps) + " |"
    lines = [head, "|" + " --- |" * (len(keeps) + 1)]
    for label in labels:
        cells = []
        for k in keeps:
            r = next(r for r in rows if r.keep == k and r.criterion == label)
            cells.append(f"{fmt(r.perplexity)} · {fmt(r.kl, 4)}" if r.perplexity is not None else "infeasible")
        mark = f"**{label}** (default)" if label == DEFAULT_CRITERION else label
        lines.append(f"| {mark} | " + " | ".join(cells) + " |")
    cells = []
    for k in keeps:
        rs = [r for r in rows if r.keep == k and r.criterion.startswith("random") and r.perplexity is not None]
        if not rs:
            cells.append("infeasible")
            continue
        ppl, kl = [r.perplexity or 0.0 for r in rs], [r.kl or 0.0 for r in rs]
        sd = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
        cells.append(f"{statistics.mean(ppl):.3f} ± {sd:.3f} (best {min(ppl):.3f}) · {statistics.mean(kl):.4f}")
    lines.append(f"| random, {len({r.criterion for r in rows if r.criterion.startswith('random')})} seeds: mean ± sd"
                 " (best) | " + " | ".join(cells) + " |")  # fmt: skip
    return f"### {name}: original held-out perplexity {data['original']:.3f}\n\n" + "\n".join(lines)


def small_table(results: list[Result], what: str) -> str:
    lines = [f"| {what} | held-out ppl | KL | stability |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r.criterion} | {fmt(r.perplexity)} | {fmt(r.kl, 4)} | {fmt(r.stability, 2)} |" for r in results]
    return "\n".join(lines)


def plot(all_data: dict[str, dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(all_data), figsize=(6 * len(all_data), 4.5), squeeze=False)
    for ax, (name, data) in zip(axes[0], all_data.items(), strict=True):
        rows: list[Result] = data["rows"]
        for label in dict.fromkeys(r.criterion for r in rows if not r.criterion.startswith("random")):
            pts = sorted((r.keep, r.perplexity) for r in rows if r.criterion == label and r.perplexity is not None)
            style = {"linewidth": 2.5, "color": "black"} if label == DEFAULT_CRITERION else {"linewidth": 1}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, **style)
        rand = {}
        for r in rows:
            if r.criterion.startswith("random") and r.perplexity is not None:
                rand.setdefault(r.keep, []).append(r.perplexity)
        ks = sorted(rand)
        ax.fill_between(ks, [min(rand[k]) for k in ks], [max(rand[k]) for k in ks], alpha=0.2, color="gray",
                        label="random (range over seeds)")  # fmt: skip
        ax.axhline(data["original"], linestyle="--", color="gray", linewidth=1)
        ax.set(title=f"{name} ({data['experts']} experts)", xlabel="experts kept per layer", ylabel="held-out ppl")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def report(all_data: dict[str, dict], s: Settings, seconds: float, out: Path) -> str:
    parts = [
        f"Measured with `python benchmarks/quality/study.py` (this run: {seconds / 60:.1f} minutes); calibration"
        f" {s.calib_samples} × 128 tokens, held-out {s.eval_samples} × 128 tokens, {s.random_seeds} random seeds."
        " Cells: held-out perplexity · mean KL(original ‖ pruned) per token.",
    ]
    for name, data in all_data.items():
        parts.append(main_table(name, data))
    if plot(all_data, out / "quality.png"):
        parts.append("![held-out perplexity against experts kept](quality.png)")
    for name, data in all_data.items():
        parts.append(f"### {name}: task-specific calibration (keep 50 %, perplexity on held-out *code*; original"
                     f" {fmt(data['original_code'])})\n\n"
                     + small_table(list(data["task"].values()), "calibration"))  # fmt: skip
        parts.append(f"### {name}: calibration size (keep 50 %)\n\n" + small_table(data["sizes"], "criterion"))
    return "\n\n".join(parts) + "\n"


def save(data: dict, path: Path) -> None:
    plain = {**data, "rows": [vars(r) for r in data["rows"]], "sizes": [vars(r) for r in data["sizes"]],
             "task": {k: vars(r) for k, r in data["task"].items()}}  # fmt: skip
    path.write_text(json.dumps(plain, indent=1) + "\n", encoding="utf-8")


def load(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    return {**data, "rows": [Result(**r) for r in data["rows"]], "sizes": [Result(**r) for r in data["sizes"]],
            "task": {k: Result(**r) for k, r in data["task"].items()}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="reduced run: one fixture, keep 50 %%, few criteria")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="where results go")
    ap.add_argument("--fixtures", nargs="*", choices=list(FIXTURES), help="measure only these (others: reuse)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--report-only", action="store_true", help="measure nothing: rebuild the report from the JSON")
    args = ap.parse_args()
    s = SMOKE if args.smoke else Settings()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in [] if args.report_only else args.fixtures or s.fixtures:
            if not (FIXTURES[name] / "config.json").is_file():
                print(f"{name}: no fixture at {FIXTURES[name]}, skipped")
                continue
            work = (args.work or Path(tmp)) / name
            work.mkdir(parents=True, exist_ok=True)
            save(study_fixture(name, FIXTURES[name], work, s, print), args.out / f"{name}.json")
    all_data = {
        FIXTURES[n].name: load(args.out / f"{n}.json") for n in s.fixtures if (args.out / f"{n}.json").is_file()
    }
    text = report(all_data, s, time.perf_counter() - start, args.out)
    (args.out / "results.md").write_text(text, encoding="utf-8")
    splice(args.out / "README.md", text)
    print(text)


def splice(readme: Path, text: str, start: str = "<!-- results -->", end: str = "<!-- /results -->") -> None:
    """Put ``text`` between the markers of ``readme`` (the written analysis stays; the numbers are regenerated)."""
    if not readme.is_file():
        return
    doc = readme.read_text(encoding="utf-8")
    if start in doc and end in doc:
        head, rest = doc.split(start, 1)
        readme.write_text(f"{head}{start}\n{text}{end}{rest.split(end, 1)[1]}", encoding="utf-8")


if __name__ == "__main__":
    main()
