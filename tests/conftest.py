"""Session fixtures: tiny checkpoints built once per test session by fixtures/build_fixtures.py."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The session's own cache folder, set before anything reads it: moeslim caches the family records it derives at run
# time there (families/runtime.py, under a transformers other than the committed table's), and a record left in the
# user's cache by another checkout or an earlier run must neither be read by the tests nor be written by them.
_CACHE = tempfile.TemporaryDirectory(prefix="moeslim-tests-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE.name
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
