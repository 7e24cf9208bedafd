"""A record of what moeslim's CLI does today, so a refactor of the calibration/validation engine can prove it
changed nothing: ``calibrate`` statistics and ``slim`` plans, output tensor hashes and validation metrics, for
every criterion, on the three trained fixtures and one built fixture with fused (stacked) experts.

Everything goes through the ``moeslim`` entry point (in-process, like ``tests.conftest.run_cli``), so moving
modules around cannot break the record; paths, times and versions are left out.

    python tests/behaviour/record.py --write    # regenerate tests/behaviour/behaviour.json
    python tests/behaviour/record.py --check    # recompute and compare with it

``tests/test_behaviour.py`` recomputes the record and compares it with the committed JSON through ``compare``.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import io
import json
import math
import multiprocessing
import os
import platform
import struct
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # run as a script: this checkout's moeslim and fixtures, not an installed copy
    sys.path.insert(0, str(ROOT))

RECORD = Path(__file__).with_name("behaviour.json")
TRAINED = ("tiny-mixtral-16e", "tiny-deepseek-16e", "tiny-qwen3-64e")
LONGEST = "tiny-qwen3-64e"  # 64 experts: its calibrated runs take twice the others'
BUILT = ("gpt_oss",)  # transposed, fused experts (stacked gate_up_proj/down_proj with biases)
# Small on purpose: every command finishes in seconds. Slim's own validation (8 x 128 held-out tokens and three
# greedy generations) has no options on the command line and runs as a user would get it.
CALIBRATION = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "--seed", "0"]
DEFAULT = "(default)"  # `slim` without --criterion
DROPPED_VALIDATION = ("original", "pruned", "moeslim_version")  # paths and the version
DROPPED_STATS_MODEL = ("name",)  # the folder's name

# Floats compared with a relative tolerance instead of exactly: each comes out of a sum over tokens (statistics,
# least-squares fit, KL, perplexity, layer errors) whose order a refactor may legitimately change (batching,
# accumulation across layers or ranks), which moves the last bits. Everything else (integers, counts, kept
# experts, hashes, strings, data-free scores) must be identical. Bytes have no tolerance: a reordered sum in the
# least-squares correction changes the corrected down projections' hashes and the plan's correction sha256, and
# that is a change of the output to look at. Patterns match the paths ``flatten`` makes.
TOLERANT = (
    "*/calibrate/stats/*.ean/*",
    "*/calibrate/stats/*.gate_mass/*",
    "*/calibrate/stats/*.soft_mass/*",
    "*/calibrate/stats/*.reap_sum/*",
    "*/calibrate/stats/*.reconstruction/*",
    "*/plan/calibration/auto/kl/*",
    "*/validation/*",
)
CALIBRATED_SCORES = "*/plan/layers/*/scores/*"  # tolerant unless the plan's criterion is data-free
DATA_FREE = ("router-norm", "weight-norm", "random")  # named here, not imported: the record must outlive module moves
# Two worker processes of one torch thread each share the commands out: the same results as one process of two
# threads (compared when this record was made), in half the time on two cores; a two-thread torch also stalls
# when another process keeps the cores busy.
WORKERS = 2
THREADS = 1
REL_TOL = 1e-9
ABS_TOL = 1e-12  # for values that are exactly zero by construction (an expert nobody routed to)

Task = tuple[str, str, str, str, list[str]]  # fixture, command, criterion (or ""), source folder, extra arguments


def record(fixtures_root: Path, workers: int = WORKERS) -> dict[str, Any]:
    """The behaviour record of every fixture under ``fixtures_root`` (the repository's ``fixtures`` folder)."""
    _check_moeslim_source()
    from fixtures.build_fixtures import build  # the repository root is on sys.path
    from moeslim.criteria import CRITERIA

    with tempfile.TemporaryDirectory(prefix="moeslim-behaviour-") as tmp:
        work = Path(tmp)
        sources = {name: Path(fixtures_root) / "trained" / name for name in TRAINED}
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            sources.update({name: build(name, work / "built" / name) for name in BUILT})
        keeps = {name: _experts(src) // 2 for name, src in sources.items()}
        tasks: list[Task] = []
        for name, src in sources.items():
            tasks.append((name, "calibrate", "", str(src), ["--out", str(work / name / "stats")]))
            for criterion in [DEFAULT, *CRITERIA]:
                flag = [] if criterion == DEFAULT else ["--criterion", criterion]
                out = ["--out", str(work / name / f"slim-{criterion}"), "--keep", str(keeps[name])]
                tasks.append((name, "slim", criterion, str(src), [*out, *flag]))
        results = _run_all(sorted(tasks, key=_cost, reverse=True), workers)
        fixtures: dict[str, Any] = {}
        for name, src in sources.items():
            files = {p.name: _sha256(p) for p in sorted(src.glob("*.safetensors"))}
            fixtures[name] = {"source": files, "keep": keeps[name], "calibrate": None, "slim": {}}
        for (name, command, criterion, _, _), result in results:
            if command == "calibrate":
                fixtures[name]["calibrate"] = result
            else:
                fixtures[name]["slim"][criterion] = result
        for fixture in fixtures.values():  # criteria in CRITERIA's order, whichever finished first
            fixture["slim"] = {c: fixture["slim"][c] for c in [DEFAULT, *CRITERIA]}
        return {"environment": environment(), "settings": {"calibration": CALIBRATION}, "fixtures": fixtures}


def _run_all(tasks: list[Task], workers: int) -> list[tuple[Task, dict[str, Any]]]:
    """Every task's result, in ``workers`` fresh processes (spawned: no torch state shared with the caller), or in
    this process when ``workers`` is 0."""
    if workers == 0:
        import torch

        threads = torch.get_num_threads()
        _start_worker()
        try:
            return [(task, _run_task(task)) for task in tasks]
        finally:
            torch.set_num_threads(threads)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker) as pool:
        return list(zip(tasks, pool.map(_run_task, tasks), strict=True))


def _cost(task: Task) -> tuple[bool, bool, str]:
    """Longest first (the 64-expert fixture, then calibrated criteria), so the workers finish together."""
    name, command, criterion = task[:3]
    return (name == LONGEST, command == "calibrate" or criterion not in DATA_FREE, name + criterion)


def _start_worker() -> None:
    import torch

    _check_moeslim_source()
    torch.set_num_threads(THREADS)


def _run_task(task: Task) -> dict[str, Any]:
    _, command, _, src, args = task
    out = Path(args[args.index("--out") + 1])
    return (_calibrate if command == "calibrate" else _slim)(Path(src), out, args)


def _experts(src: Path) -> int:
    config = json.loads((src / "config.json").read_text())
    return next(config[k] for k in ("num_local_experts", "n_routed_experts", "num_experts") if k in config)


def environment() -> dict[str, str]:
    """Versions the record was made with: shown when a comparison fails, never compared."""
    import safetensors
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "machine": platform.machine(),
    }


def _check_moeslim_source() -> None:
    """Refuse to record an installed moeslim from another checkout (an editable install elsewhere)."""
    import moeslim

    where = Path(moeslim.__file__).resolve()
    if ROOT not in where.parents:
        raise RuntimeError(f"moeslim is imported from {where}, not from {ROOT}; put {ROOT} first on sys.path")


def _calibrate(src: Path, out: Path, args: list[str]) -> dict[str, Any]:
    """``moeslim calibrate``: every statistics array and the metadata, the folder's name left out."""
    code, message = run_cli(["calibrate", str(src), *args, *CALIBRATION], src, out)
    if code:
        return {"exit": code, "message": message}
    from safetensors.numpy import load_file

    meta = json.loads((out / "stats.json").read_text())
    for key in DROPPED_STATS_MODEL:
        meta["model"].pop(key, None)
    arrays = load_file(str(out / "stats.safetensors"))
    stats = {
        k: {"dtype": str(v.dtype), "shape": list(v.shape), "values": v.ravel().tolist()} for k, v in arrays.items()
    }
    return {"exit": 0, "meta": meta, "stats": dict(sorted(stats.items()))}


def _slim(src: Path, out: Path, args: list[str]) -> dict[str, Any]:
    """``moeslim slim`` with its validation: plan, config, files, tensor hashes, validation report (no paths)."""
    code, message = run_cli(["slim", str(src), *args, *CALIBRATION], src, out)
    if code:
        return {"exit": code, "message": message}
    validation = json.loads((out / "validation.json").read_text())
    for key in DROPPED_VALIDATION:
        validation.pop(key, None)
    return {
        "exit": 0,
        "plan": json.loads((out / "moeslim_plan.json").read_text()),
        "config": json.loads((out / "config.json").read_text()),
        "files": sorted(p.name for p in out.iterdir()),
        "tensors": {p.name: _tensor_hashes(p) for p in sorted(out.glob("*.safetensors"))},
        "validation": validation,
    }


def run_cli(args: list[str], src: Path, out: Path) -> tuple[int, str]:
    """Run the real ``moeslim`` entry point in-process; return (exit code, last stderr line with paths masked)."""
    from moeslim.cli import main

    saved_argv, saved_debug = sys.argv, os.environ.pop("MOESLIM_DEBUG", None)  # debug turns errors into raises
    sys.argv = ["moeslim", *args]
    err = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = saved_argv
        if saved_debug is not None:
            os.environ["MOESLIM_DEBUG"] = saved_debug
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    message = lines[-1] if code and lines else ""
    return code, message.replace(str(out), "<out>").replace(str(src), "<src>")


def _tensor_hashes(path: Path) -> dict[str, Any]:
    """A safetensors file: sha256 of the whole file, its header metadata, and each tensor as dtype, shape and the
    first 16 hex digits of the sha256 of its bytes (enough to say which tensor changed, at a quarter the size)."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    data = raw[8 + size :]
    out: dict[str, Any] = {"file": hashlib.sha256(raw).hexdigest(), "__metadata__": header.pop("__metadata__", None)}
    for name in sorted(header):
        info = header[name]
        start, end = info["data_offsets"]
        digest = hashlib.sha256(data[start:end]).hexdigest()[:16]
        out[name] = f"{info['dtype']} {'x'.join(map(str, info['shape']))} {digest}"
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------------------------


def dumps(doc: Any, indent: str = "") -> str:
    """JSON with one key a line, but a list of numbers or strings on one line (the record stays readable)."""
    if isinstance(doc, dict) and doc:
        inner = indent + " "
        items = [f"{inner}{json.dumps(k)}: {dumps(v, inner)}" for k, v in doc.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(doc, list) and any(isinstance(v, (dict, list)) for v in doc):
        inner = indent + " "
        return "[\n" + ",\n".join(inner + dumps(v, inner) for v in doc) + "\n" + indent + "]"
    return json.dumps(doc)


def flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a/b/0": leaf}``: every leaf of nested dicts and lists under a slash-joined path."""
    if isinstance(doc, dict):
        items: list[tuple[Any, Any]] = list(doc.items())
    elif isinstance(doc, list):
        items = list(enumerate(doc))
    else:
        return {prefix: doc}
    out: dict[str, Any] = {prefix + "/": type(doc).__name__} if not doc else {}  # an empty container is a leaf
    for key, value in items:
        out.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def tolerant(path: str, criterion: str | None) -> bool:
    """Whether the float at ``path`` is compared with ``REL_TOL`` (see ``TOLERANT``)."""
    if any(fnmatch.fnmatchcase(path, pattern) for pattern in TOLERANT):
        return True
    return fnmatch.fnmatchcase(path, CALIBRATED_SCORES) and criterion not in DATA_FREE


def compare(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Every difference between two records, one line each as ``fixture/command/key: expected ..., got ...``.

    The ``environment`` block is not compared. Types must match (an int is not a float); floats at ``tolerant``
    paths may differ by ``REL_TOL``, all other values must be equal.
    """
    want = flatten({k: v for k, v in expected.items() if k != "environment"})
    got = flatten({k: v for k, v in actual.items() if k != "environment"})
    problems = []
    for path in sorted(want.keys() | got.keys()):
        if path not in got:
            problems.append(f"{path}: missing (expected {want[path]!r})")
        elif path not in want:
            problems.append(f"{path}: unexpected {got[path]!r}")
        elif not _same(want[path], got[path], tolerant(path, _criterion(path, got))):
            problems.append(f"{path}: expected {want[path]!r}, got {got[path]!r}")
    return problems


def _criterion(path: str, flat: dict[str, Any]) -> str | None:
    """The plan criterion of the slim run ``path`` belongs to (``fixtures/F/slim/C/plan/...``)."""
    parts = path.split("/")
    if len(parts) > 4 and parts[2] == "slim" and parts[4] == "plan":
        return flat.get("/".join([*parts[:5], "criterion"]))
    return None


def _same(a: Any, b: Any, tolerance: bool) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or (tolerance and math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL))
    return a == b


def summary(problems: list[str], expected: dict[str, Any], actual: dict[str, Any], limit: int = 60) -> str:
    """A failure message: how many entries differ, which fixtures/commands, the first ``limit`` of them."""
    groups = sorted({"/".join(p.split(":")[0].split("/")[:4]) for p in problems})
    lines = [f"{len(problems)} recorded value(s) differ, in: {', '.join(groups)}", *problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    if expected.get("environment") != actual.get("environment"):
        lines.append(f"note: recorded under {expected.get('environment')}, now {actual.get('environment')}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help=f"regenerate {RECORD.relative_to(ROOT)}")
    group.add_argument("--check", action="store_true", help="recompute and compare with the committed record")
    args = parser.parse_args()
    doc = record(ROOT / "fixtures")
    if args.write:
        failed = {
            f"{name}/{command}: {run['message']}"
            for name, fixture in doc["fixtures"].items()
            for command, run in [("calibrate", fixture["calibrate"]), *fixture["slim"].items()]
            if run["exit"] not in (0, 2)
        }
        if failed:  # exit 2 is a clean refusal worth recording; anything else is a broken run
            sys.exit("not written, runs failed:\n" + "\n".join(sorted(failed)))
        RECORD.write_text(dumps(doc) + "\n")
        print(f"wrote {RECORD}")
    else:
        expected = json.loads(RECORD.read_text())
        problems = compare(expected, doc)
        print(summary(problems, expected, doc) if problems else "identical")
        sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
