"""Bad input: one line on stderr, exit code 2, no partial output, source untouched."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import run_cli, tree_digest


def _copy(built: Callable[[str], Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built(name), tmp_path / "src"))


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _shard(src: Path, n: int) -> Path:
    """The n-th shard file (1-based) of the multi-shard fixture."""
    return sorted(src.glob("model-*-of-*.safetensors"))[n - 1]


def _missing_shard(src: Path) -> None:
    _shard(src, 2).unlink()


def _index_escapes(src: Path) -> None:
    (src.parent / "evil.safetensors").write_bytes(_shard(src, 1).read_bytes())
    _edit_json(
        src / "model.safetensors.index.json",
        lambda d: d["weight_map"].update(dict.fromkeys(d["weight_map"], "../evil.safetensors")),
    )


def _truncated(src: Path) -> None:
    _shard(src, 3).write_bytes(_shard(src, 3).read_bytes()[:5])


def _corrupt_header(src: Path) -> None:
    raw = bytearray(_shard(src, 3).read_bytes())
    raw[8:20] = b"\x00garbage!!\xff\xfe"
    _shard(src, 3).write_bytes(bytes(raw))


def _data_cut_short(src: Path) -> None:
    _shard(src, 3).write_bytes(_shard(src, 3).read_bytes()[:-100])


def _wrong_expert_count(src: Path) -> None:
    _edit_json(src / "config.json", lambda d: d.update(num_experts=6))


def _unknown_family(src: Path) -> None:
    _edit_json(src / "config.json", lambda d: d.update(model_type="llama"))


def _expert_tensor_missing(src: Path) -> None:
    def drop(d: dict) -> None:
        del d["weight_map"]["model.layers.1.mlp.experts.5.up_proj.weight"]

    _edit_json(src / "model.safetensors.index.json", drop)


BROKEN_SOURCES = {
    "missing shard": (
        _missing_shard,
        "model-00002-of-00007.safetensors named in model.safetensors.index.json is missing",
    ),
    "index escapes": (_index_escapes, "'../evil.safetensors', which is outside the checkpoint folder"),
    "truncated": (_truncated, "is truncated"),
    "corrupt header": (_corrupt_header, "corrupt safetensors header"),
    "data cut short": (_data_cut_short, "lies outside the file"),
    "shape vs config": (_wrong_expert_count, "has shape [8, 32], but config says 6 experts"),
    "unknown family": (_unknown_family, "unsupported model family 'llama'"),
    "expert tensor missing": (_expert_tensor_missing, "model.safetensors.index.json does not list it"),
}


def _assert_clean_failure(code: int, out: str, err: str, message: str, target: Path) -> None:
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1 and err.startswith("moeslim: error: ") and message in err, err
    assert "Traceback" not in err + out
    assert not target.exists()
    assert not [p for p in target.parent.iterdir() if "moeslim-tmp" in p.name]  # no temp folder left


@pytest.mark.parametrize("case", sorted(BROKEN_SOURCES))
def test_broken_source_is_refused(case: str, built, tmp_path: Path, capsys) -> None:
    src = _copy(built, "qwen3_moe_multishard", tmp_path)
    breaks, message = BROKEN_SOURCES[case]
    breaks(src)
    before = tree_digest(src)
    target = tmp_path / "out"
    code, out, err = run_cli(["slim", str(src), "--keep", "4", "--out", str(target)], capsys)
    _assert_clean_failure(code, out, err, message, target)
    assert tree_digest(src) == before


@pytest.mark.parametrize(
    ("fixture", "args", "message"),
    [
        ("qwen3_moe", ["--keep", "8"], "--keep 8 must be between 1 and 7"),
        ("qwen3_moe", ["--keep", "1"], "--keep 1 is below the router's top-k 2"),
        ("deepseek_v3", ["--keep", "6"], "keep a multiple of 4 with at least 2 per group"),
        ("deepseek_v3", ["--keep", "4"], "keep a multiple of 4 with at least 2 per group"),
        ("qwen3_moe", ["--keep", "4", "--criterion", "magic"], "unknown --criterion 'magic'"),
        ("qwen3_moe", ["--keep", "4", "--max-shard-size", "lots"], "--max-shard-size 'lots'"),
        ("qwen3_moe", ["--plan", "/nonexistent/plan.json"], "plan file /nonexistent/plan.json does not exist"),
    ],
)
def test_infeasible_request_is_refused(
    fixture: str, args: list[str], message: str, built, tmp_path: Path, capsys
) -> None:
    src = built(fixture)
    before = tree_digest(src)
    target = tmp_path / "out"
    code, out, err = run_cli(["slim", str(src), "--out", str(target), *args], capsys)
    _assert_clean_failure(code, out, err, message, target)
    assert tree_digest(src) == before


def test_lowering_top_k_allows_a_smaller_keep(built, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(
        ["slim", str(built("qwen3_moe")), "--keep", "1", "--top-k", "1", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_experts_per_tok"] == 1


def test_existing_output_needs_overwrite(built, tmp_path: Path, capsys) -> None:
    src, target = built("mixtral"), tmp_path / "out"
    code, _, err = run_cli(["slim", str(src), "--keep", "4", "--out", str(target), "--no-validate"], capsys)
    assert code == 0, err
    first = tree_digest(target)
    code, out, err = run_cli(["slim", str(src), "--keep", "5", "--out", str(target), "--no-validate"], capsys)
    assert code == 2 and "already exists; pass --overwrite" in err and err.count("\n") == 1
    assert tree_digest(target) == first
    code, out, err = run_cli(["slim", str(src), "--keep", "5", "--out", str(target), "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((target / "moeslim_plan.json").read_text())["keep"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # neither temp, old nor lock left


def test_output_inside_source_is_refused(built, tmp_path: Path, capsys) -> None:
    src = _copy(built, "mixtral", tmp_path)
    before = tree_digest(src)
    code, out, err = run_cli(["slim", str(src), "--keep", "4", "--out", str(src / "pruned")], capsys)
    assert code == 2 and "overlaps the source folder" in err
    assert tree_digest(src) == before


def test_full_disk_leaves_nothing_behind(built, tmp_path: Path, capsys) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    # a real filesystem too small for the output; needs root (CI and dev machines run as root)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    try:
        src = built("qwen3_moe")
        before = tree_digest(src)
        code, out, err = run_cli(["slim", str(src), "--keep", "4", "--out", str(mount / "out")], capsys)
        _assert_clean_failure(code, out, err, "not enough disk space", mount / "out")
        assert list(mount.iterdir()) == [] and tree_digest(src) == before
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_debug_variable_shows_the_traceback(built, tmp_path: Path, capsys, monkeypatch) -> None:
    from moeslim.errors import PlanError

    monkeypatch.setenv("MOESLIM_DEBUG", "1")
    with pytest.raises(PlanError):
        run_cli(["slim", str(built("qwen3_moe")), "--keep", "8", "--out", str(tmp_path / "o")], capsys)
