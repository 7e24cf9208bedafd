"""Quality study: which experts to drop, measured on MoE models trained here (issue #6).

    python benchmarks/quality/study.py                 # full study: results.md, quality.png, README.md's tables
    python benchmarks/quality/study.py --smoke --out DIR   # a reduced run (what CI runs)

For every trained fixture in ``fixtures/trained/`` (Mixtral-style; DeepSeek-style when present) it prunes at
keep 75 %, 50 % and 25 % with every criterion, one-shot and ``--progressive``, and measures held-out perplexity
and KL(original ‖ pruned) through moeslim's own validation. Everything runs in-process through
``moeslim.pipeline.slim``, the same code path as the CLI.

At keep 50 % each calibrated criterion is calibrated on several seeds (different calibration samples), every
plan keeps its per-sequence validation values, and ``significance.py`` compares every plan with the default
sequence by sequence (paired bootstrap), then applies the rule that picks the default criterion.

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
import dataclasses
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

from render import CANDIDATES, Result, load, report, save, splice

from moeslim.calibrate.session import run_calibration
from moeslim.criteria import AUTO, DEFAULT_CRITERION, is_calibrated
from moeslim.errors import PlanError
from moeslim.layout import resolve_layout
from moeslim.pipeline import SlimOptions, slim
from moeslim.source import open_checkpoint
from moeslim.stream.context import RunContext
from moeslim.stream.options import CalibrationOptions
from moeslim.validate.run import ValidateOptions

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = {
    "mixtral": ROOT / "fixtures/trained/tiny-mixtral-16e",
    "deepseek": ROOT / "fixtures/trained/tiny-deepseek-16e",
    "qwen3": ROOT / "fixtures/trained/tiny-qwen3-64e",
}
PROGRESSIVE = ["frequency", "gate-mass", "ean", "reap"]
CORRECTED = " --correct"  # a criterion's plan with the correction the default applies (where its gain comes from)
PIECE_CHARS = 1500
SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__"}


@dataclass
class Settings:
    keeps: tuple[float, ...] = (0.75, 0.5, 0.25)
    criteria: list[str] = field(default_factory=lambda: list(CANDIDATES))
    progressive: list[str] = field(default_factory=lambda: list(PROGRESSIVE))
    corrected: list[str] = field(default_factory=lambda: ["ean"])
    random_seeds: int = 10
    calib_samples: int = 64  # × 128 tokens
    calib_seeds: int = 3  # calibration samples drawn per calibrated criterion at the deciding keep
    decide: float = 0.5  # the keep ratio at which the default criterion is chosen
    eval_samples: int = 256  # × 128 tokens
    sizes: tuple[int, ...] = (16, 64, 256)  # calibration samples for the size experiment
    size_criteria: tuple[str, ...] = ("ean", "reap", "frequency")
    fixtures: tuple[str, ...] = ("mixtral", "deepseek", "qwen3")
    only: bool = False  # measure only the plans named (``--only``); the rest of the fixture's results are kept


SMOKE = Settings(
    keeps=(0.5,), criteria=["router-norm", "ean", "auto"], progressive=["ean"], random_seeds=2, calib_samples=16,
    calib_seeds=2, eval_samples=8, sizes=(8, 16), size_criteria=("ean",), fixtures=("mixtral",),
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


def run(model: Path, work: Path, keep: int, criterion: str, calib: Path, samples: int, eval_text: Path,
        eval_samples: int, *, seed: int | None = None, progressive: bool = False,
        correct: bool = False) -> dict:  # fmt: skip
    """Prune in-process and validate on held-out text; returns the validation report and the plan facts.

    ``seed`` is random's seed, or a calibrated criterion's calibration seed. One-shot calibrated criteria share
    statistics calibrated once per (text, size, seed), as ``--stats`` would. ``correct``: refit the kept experts
    after pruning (``--correct``); every plan but the default's is measured without it, as the criterion alone."""
    calibrated = is_calibrated(criterion)
    calibration = CalibrationOptions(calib=str(calib), samples=samples, seq_len=128, seed=seed or 0)
    stats = None
    if calibrated and not progressive and criterion != AUTO:
        stats = work / f"stats-{calib.stem}-{samples}-{seed or 0}"
        if not (stats / "stats.json").is_file():
            ckpt = open_checkpoint(model)
            run_calibration(RunContext(ckpt, resolve_layout(ckpt), calibration), out=stats)
    opts = SlimOptions(
        source=model, keep=keep, out=work / "out", criterion=criterion, seed=None if calibrated else seed,
        overwrite=True, stats=stats, calibration=calibration, progressive=progressive, correct=correct,
        validation=ValidateOptions(calib=str(eval_text), samples=eval_samples, seq_len=128, seed=1, generations=0),
    )  # fmt: skip
    result = slim(opts)
    stability = result.plan.calibration.get("stability") or {}
    return {**(result.validation or {}), "stability": statistics.mean(stability.values()) if stability else None}


def study_fixture(name: str, model: Path, work: Path, s: Settings, log: Callable[[str], None]) -> dict:
    began = time.perf_counter()
    texts = make_texts(model, work)
    config = json.loads((model / "config.json").read_text())
    experts = int(config.get("n_routed_experts") or config.get("num_local_experts") or config["num_experts"])
    decide = round(experts * s.decide)
    rows: list[Result] = []
    original: dict[str, float] = {}

    def measure(keep: int, label: str, calib: Path, samples: int, eval_text: Path, seed: int | None = None,
                progressive: bool = False) -> Result:  # fmt: skip
        start = time.perf_counter()
        criterion = label.split()[0]
        correct = criterion == AUTO or label.endswith(CORRECTED)
        try:
            r = run(model, work, keep, criterion, calib, samples, eval_text, s.eval_samples, seed=seed,
                    progressive=progressive, correct=correct)  # fmt: skip
        except PlanError as e:
            return Result(name, keep, label, seed, None, None, None, None, 0.0, str(e))
        original.setdefault(str(eval_text), r["perplexity_original"])
        per = r["per_sequence"]
        paired = {"kl": rounded(per["kl"]), "nll": rounded(per["nll_pruned"])}
        res = Result(name, keep, label, seed, r["perplexity_pruned"], r["kl_mean"], r["top1_agreement"],
                     r["stability"], time.perf_counter() - start, per_sequence=paired)  # fmt: skip
        log(f"  {name} keep {keep}: {label:24s} seed {seed!s:4s} ppl {res.perplexity:8.3f}  KL {res.kl:.4f}"
            f"  ({res.seconds:.1f} s)")  # fmt: skip
        return res

    for fraction in s.keeps:
        keep = round(experts * fraction)
        seeds = list(range(s.calib_seeds)) if keep == decide else [0]
        for criterion in s.criteria:
            for seed in seeds if is_calibrated(criterion) else [None]:
                rows.append(measure(keep, criterion, texts.calib, s.calib_samples, texts.heldout, seed))
        for criterion in s.corrected:
            for seed in seeds:
                rows.append(measure(keep, f"{criterion}{CORRECTED}", texts.calib, s.calib_samples, texts.heldout, seed))
        for criterion in s.progressive:
            for seed in seeds:
                rows.append(measure(keep, f"{criterion} --progressive", texts.calib, s.calib_samples, texts.heldout,
                                    seed, progressive=True))  # fmt: skip
        for seed in range(s.random_seeds):
            rows.append(measure(keep, "random", texts.calib, s.calib_samples, texts.heldout, seed))
    if s.only:
        return {"rows": rows}
    task = [measure(decide, f"{DEFAULT_CRITERION} (calibrated on {domain})", calib, s.calib_samples,
                    texts.heldout_code, seed)
            for domain, calib in (("code", texts.calib_code), ("prose", texts.calib_prose))
            for seed in range(s.calib_seeds)]  # fmt: skip
    sizes = [measure(decide, f"{c} ({n} × 128 tokens)", texts.calib, n, texts.heldout) for c in s.size_criteria
             for n in s.sizes]  # fmt: skip
    return {"experts": experts, "decide": decide, "original": original[str(texts.heldout)], "rows": rows,
            "task": task, "sizes": sizes, "original_code": original.get(str(texts.heldout_code)),
            "seconds": round(time.perf_counter() - began, 1)}  # fmt: skip


def merged(old: dict, new: dict, labels: list[str]) -> dict:
    """``old``'s results with every row of ``labels`` replaced by ``new``'s, where the label's rows were (new labels
    last)."""
    rows: list[Result] = []
    for r in old["rows"]:
        if r.criterion not in labels:
            rows.append(r)
        elif all(x.criterion != r.criterion for x in rows):
            rows += [x for x in new["rows"] if x.criterion == r.criterion]
    placed = {r.criterion for r in rows}
    return {**old, "rows": rows + [r for r in new["rows"] if r.criterion not in placed]}


def rounded(values: list[float]) -> list[float]:
    """Six significant digits: enough for the paired comparison, and a smaller JSON file."""
    return [float(f"{v:.6g}") for v in values]


def describe(s: Settings) -> str:
    return (
        f"calibration {s.calib_samples} × 128 tokens ({s.calib_seeds} calibration seeds at keep {s.decide:.0%}),"
        f" held-out {s.eval_samples} × 128 tokens, {s.random_seeds} random seeds"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="reduced run: one fixture, keep 50 %%, few criteria")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="where results go")
    ap.add_argument("--fixtures", nargs="*", choices=list(FIXTURES), help="measure only these (others: reuse)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--report-only", action="store_true", help="measure nothing: rebuild the report from the JSON")
    ap.add_argument("--only", nargs="+", metavar="LABEL",
                    help="measure only these plans (auto, 'ean --correct'), replacing theirs in the JSON")  # fmt: skip
    args = ap.parse_args()
    s = SMOKE if args.smoke else Settings()
    if args.only:
        s = dataclasses.replace(
            s, criteria=[c for c in args.only if CORRECTED not in c], progressive=[], random_seeds=0, only=True,
            corrected=[c.removesuffix(CORRECTED) for c in args.only if c.endswith(CORRECTED)],
        )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in [] if args.report_only else args.fixtures or s.fixtures:
            if not (FIXTURES[name] / "config.json").is_file():
                print(f"{name}: no fixture at {FIXTURES[name]}, skipped")
                continue
            work = (args.work or Path(tmp)) / name
            work.mkdir(parents=True, exist_ok=True)
            measured = study_fixture(name, FIXTURES[name], work, s, print)
            if s.only:
                measured = merged(load(args.out / f"{name}.json"), measured, args.only)
            save(measured, args.out / f"{name}.json")
    all_data = {
        FIXTURES[n].name: load(args.out / f"{n}.json") for n in s.fixtures if (args.out / f"{n}.json").is_file()
    }
    text = report(all_data, describe(s), args.out)
    (args.out / "results.md").write_text(text, encoding="utf-8")
    splice(args.out / "README.md", text)
    print(text)


if __name__ == "__main__":
    main()
