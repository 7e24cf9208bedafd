"""Non-weight files of the source (tokenizer, generation config, chat template, custom code) and the
atomic output folder: built beside the target, renamed into place only when complete."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from moeslim.errors import OutputError

# Never carried over: the base model's card (the pruned model gets its own), weights in other formats that
# would be stale (unpruned), and folders of tools and caches.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt", ".npz")
SKIP_DIRS = {".git", ".cache", ".huggingface", "original"}
SKIP_FILES = {"README.md", "config.json", "model.safetensors.index.json"}


def extra_files(root: Path, shards: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """(files to copy, other weight files skipped), relative to ``root``; custom ``*.py`` is copied, never run.

    ``shards`` are the weight files surgery rewrites; they are neither copied nor reported.
    """
    copy: list[Path] = []
    skipped: list[Path] = []
    rewritten = SKIP_FILES | set(shards)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            rel = (Path(dirpath) / name).relative_to(root)
            if rel.as_posix() in rewritten:
                continue
            (skipped if name.lower().endswith(WEIGHT_SUFFIXES) else copy).append(rel)
    return copy, skipped


def copy_files(root: Path, rels: list[Path], out_dir: Path) -> None:
    for rel in rels:
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, out_dir / rel)  # follows symlinks: Hub caches link into a blob store


def check_target(source: Path, target: Path, overwrite: bool) -> None:
    """Refuse a target that exists (without ``overwrite``) or overlaps the source folder."""
    src, dst = source.resolve(), target.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise OutputError(f"--out {target} overlaps the source folder {source}; choose a folder outside it")
    if target.exists() and not overwrite:
        raise OutputError(f"{target} already exists; pass --overwrite to replace it or choose another --out")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target} exists and is not a folder; remove it or choose another --out")


def check_space(target: Path, needed: int) -> None:
    free = shutil.disk_usage(_existing_parent(target)).free
    if free < needed:
        raise OutputError(
            f"not enough disk space for {target}: needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free;"
            " free space or choose another --out"
        )


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target``, on failure it is gone.

    A full disk during writing becomes an ``OutputError`` (one line for the user) with nothing left behind.
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".moeslim-tmp", dir=parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should look like any new folder
    try:
        yield tmp
        _replace(tmp, target)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(
                f"no space left on device while writing {target}; free space or choose another --out"
            ) from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".moeslim-old", dir=target.parent))
    os.rename(target, old / "previous")
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path
