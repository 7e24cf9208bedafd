"""Session fixtures: tiny checkpoints built once per test session by fixtures/build_fixtures.py."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The session's own cache folder, set before anything reads it: moeslim caches the family records it derives at run
# time there (families/runtime.py, under a transformers other than the committed table's), and a record left in the
# user's cache by another checkout or an earlier run must neither be read by the tests nor be written by them.
_CACHE = tempfile.TemporaryDirectory(prefix="moeslim-tests-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE.name


def _usable_cores() -> int:
    """The cores this process may run on: its affinity, bounded by its control group's CPU quota (a container's
    ``--cpus``), which ``os.cpu_count()`` and xdist's own count both ignore."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    return cores


# Under pytest-xdist (the README's ``-n auto``) the workers share the machine's cores: each worker, and every command
# it starts, runs torch on its share of them. Each on all of them oversubscribed two cores to twice the serial time.
# xdist names the worker count before this file is imported, so torch reads the setting when it is first imported.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _usable_cores() // _WORKERS)))

PER_WORKER = 3 << 30  # bytes: one worker's peak (2.98 GB running test_every_family.py under 5.16: benchmarks/README)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker per usable core, as many as the memory this process may allocate holds."""
    from moeslim.stream.memory import available_bytes

    room = available_bytes()
    cores = _usable_cores()
    return max(1, min(cores, room // PER_WORKER if room is not None else cores))


with contextlib.suppress(ImportError):  # matplotlib builds its font list in that folder now, not in a command's run
    import matplotlib.font_manager  # noqa: F401

from fixtures.build_fixtures import build  # noqa: E402 - after the cache folder is set


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``built(name)`` → a folder holding fixture ``name``, built on first use and shared by the session.

    Tests must not modify it; ``tree_digest`` lets them prove they did not.
    """
    root = tmp_path_factory.mktemp("fixtures")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build(name, root / name)
        return cache[name]

    return get


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``root`` (plus its mode), to prove a tree unchanged."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest() + oct(
                os.stat(path).st_mode
            )
    return out


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the real ``moeslim`` entry point in-process; return (exit code, stdout, stderr)."""
    from moeslim.cli import main

    capsys.readouterr()  # drop whatever earlier steps (fixture builds) printed
    saved = sys.argv
    sys.argv = ["moeslim", *args]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = saved
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session", autouse=True)
def _repository_fixtures_untouched() -> Iterator[None]:
    """No test may write into the committed fixtures (a command pointed at them must only read them)."""
    folder = Path(__file__).resolve().parents[1] / "fixtures"
    before = {k: v for k, v in tree_digest(folder).items() if "__pycache__" not in k}
    yield
    after = {k: v for k, v in tree_digest(folder).items() if "__pycache__" not in k}
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, f"tests changed the committed fixtures: {changed[:5]}"


def distinct(model: Any) -> Any:
    """``model`` with every matrix drawn afresh: families that initialise routers to zero would tie every expert,
    and a tie is broken by position, which pruning changes."""
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def statistics_tokens() -> Any:
    """The token ids ``streamed_statistics`` calibrates on: 4 sequences of 10, in batches of 2."""
    import torch

    return torch.randint(3, 200, (4, 10), generator=torch.Generator().manual_seed(2))


def streamed_statistics(src: Path, expert_chunk: int | None = None) -> Any:
    """The routing statistics of checkpoint ``src`` on ``statistics_tokens()``, run one decoder layer at a time
    (routed experts read ``expert_chunk`` at a time, if given)."""
    from moeslim.calibrate.capture import Statistics
    from moeslim.calibrate.collect import calibrate_layers
    from moeslim.layout import resolve_layout
    from moeslim.source import open_checkpoint
    from moeslim.stream.runner import LayerRunner

    ckpt = open_checkpoint(src)
    layout = resolve_layout(ckpt)
    runner = LayerRunner(ckpt, layout, expert_chunk=expert_chunk)
    try:
        return calibrate_layers(runner, statistics_tokens(), 2, Statistics(layout.num_experts))
    finally:
        runner.close()


@functools.cache
def installed_families() -> tuple[list[str], dict[str, Any]]:
    """The MoE model types the installed transformers defines, and the family record moeslim uses for each under
    it: the committed table (``families.json``) where it was derived under this version; under another (CI also runs
    the oldest transformers the package allows), each type's record as moeslim derives and caches it at run time
    (``families/runtime.py``, in the session's cache folder), the type left out where that finds no MoE model.
    Computed once per session: listing the types builds every config class transformers defines."""
    import transformers

    from moeslim.families.derive import DERIVED_PATH, moe_model_types
    from moeslim.families.runtime import record_of

    types, committed = moe_model_types(), json.loads(DERIVED_PATH.read_text(encoding="utf-8"))
    if committed["transformers"] == transformers.__version__:
        return types, committed["families"]
    return types, {t: r for t in types if (r := record_of(t, transformers.__version__)) is not None}
