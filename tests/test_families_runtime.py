"""A model type the committed family table lacks, or may describe stale, is derived when a command meets it: once per
transformers version, cached in the user's cache folder, before any weight is read.

The table is pointed at a copy of ``families.json`` with one family cut out (``MOESLIM_FAMILIES_TABLE``), and the
commands run in a fresh interpreter that lists the modules it imported: the derivation's module shows whether it
derived.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from moeslim.families.runtime import cache_file
from moeslim.families.table import _DERIVED, FAMILIES
from moeslim.families.tiny import tiny_model
from moeslim.names import PLAN_NAME
from tests.test_startup import imported

pytestmark = pytest.mark.slow

TABLE: dict[str, Any] = json.loads(_DERIVED.read_text(encoding="utf-8"))
HAND = {t for f in FAMILIES.values() for t in f.model_types}
# The first derived family (the hand-written ones are never derived) and the first refused one, in name order.
PRUNED = next(t for t, r in sorted(TABLE["families"].items()) if t not in HAND and "refused" not in r)
REFUSED = next(t for t, r in sorted(TABLE["families"].items()) if "refused" in r)
DERIVE = "moeslim.families.derive"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint of ``PRUNED``, as transformers saves it."""
    src = tmp_path_factory.mktemp("runtime") / "src"
    tiny_model(PRUNED, 8).save_pretrained(src)
    return src


def _env(tmp_path: Path, cut: str | None = None, version: str | None = None) -> dict[str, str]:
    """A table without family ``cut`` (or recorded under transformers ``version``) and a cache folder of its own."""
    table = json.loads(json.dumps(TABLE))
    table["families"].pop(cut, None)
    table["transformers"] = version or table["transformers"]
    path = tmp_path / "families.json"
    path.write_text(json.dumps(table))
    return {"MOESLIM_FAMILIES_TABLE": str(path), "XDG_CACHE_HOME": str(tmp_path / "cache")}


def _cached(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "cache" / "moeslim" / f"families-{transformers.__version__}.json").read_text())


def test_a_type_the_table_lacks_is_derived_once_then_read_from_the_cache(source: Path, tmp_path: Path) -> None:
    env = _env(tmp_path, cut=PRUNED)
    modules, done = imported(["inspect", str(source)], tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert f"family        {PRUNED} " in done.stdout and DERIVE in modules
    assert _cached(tmp_path) == {
        "transformers": transformers.__version__,
        "families": {PRUNED: TABLE["families"][PRUNED]},
    }

    args = ["slim", str(source), "--keep", "4", "--criterion", "router-norm", "--no-validate", "--out", "out"]
    modules, done = imported(args, tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert DERIVE not in modules and "torch" not in modules  # the cached record, read without the derivation
    assert json.loads((tmp_path / "out" / PLAN_NAME).read_text())["model_type"] == PRUNED
    cls = getattr(transformers, TABLE["families"][PRUNED]["architecture"])
    _, info = cls.from_pretrained(tmp_path / "out", dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()


# Not JSON; a record of the type that the table cannot read (another moeslim's, or edited by hand).
CORRUPT = ["{not json", json.dumps({"transformers": transformers.__version__, "families": {PRUNED: {"name": PRUNED}}})]


@pytest.mark.parametrize("corrupt", CORRUPT, ids=["not-json", "unreadable-record"])
def test_a_corrupt_cache_is_ignored_and_rewritten(corrupt: str, source: Path, tmp_path: Path) -> None:
    env = _env(tmp_path, cut=PRUNED)
    path = tmp_path / "cache" / "moeslim" / f"families-{transformers.__version__}.json"
    path.parent.mkdir(parents=True)
    path.write_text(corrupt)
    modules, done = imported(["inspect", str(source)], tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert DERIVE in modules and _cached(tmp_path)["families"][PRUNED] == TABLE["families"][PRUNED]


def test_a_table_derived_under_another_transformers_is_derived_again(source: Path, tmp_path: Path) -> None:
    """The committed record may be stale under another transformers: the type met is derived under the installed."""
    modules, done = imported(["inspect", str(source)], tmp_path, _env(tmp_path, version="0.0.0"))
    assert done.returncode == 0, done.stderr
    assert DERIVE in modules and list(_cached(tmp_path)["families"]) == [PRUNED]


def test_a_derivation_that_refuses_is_one_line_and_cached(tmp_path: Path) -> None:
    env = _env(tmp_path, cut=REFUSED)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": REFUSED}))
    (src / "model.safetensors").write_bytes(b"not read")  # the refusal comes before any weight is read
    for derived in (True, False):  # the second run reads the refusal from the cache
        modules, done = imported(["slim", str(src), "--keep", "2", "--out", "out"], tmp_path, env)
        reason = TABLE["families"][REFUSED]["refused"]
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"moeslim: error: model family {REFUSED!r} cannot be pruned: {reason}")
        assert (DERIVE in modules) is derived and not (tmp_path / "out").exists()


def test_a_type_transformers_does_not_define_is_unsupported_without_a_cache(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "no_such_moe"}))
    _, done = imported(["inspect", str(src)], tmp_path, _env(tmp_path))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "unsupported model family 'no_such_moe'" in done.stderr
    assert not (tmp_path / "cache").exists()


def test_the_cache_lives_under_xdg_cache_home_or_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_file("5.25.0") == tmp_path / "xdg" / "moeslim" / "families-5.25.0.json"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unset in ("", "relative/path"):  # the XDG specification: a relative path is ignored
        monkeypatch.setenv("XDG_CACHE_HOME", unset)
        assert cache_file("5.25.0") == tmp_path / "home" / ".cache" / "moeslim" / "families-5.25.0.json"
