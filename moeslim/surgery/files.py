"""The files of a pruned output besides its shards: non-weight files of the source (tokenizer, generation
config, chat template, custom code) copied over, the free space it needs, and which files are moeslim's."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from moeslim.errors import OutputError
from moeslim.names import (
    CARD_NAME,
    CONFIG_NAME,
    IMAGE_NAME,
    INDEX_NAME,
    PLAN_NAME,
    SHARD_PATTERN,
    SINGLE_NAME,
    VALIDATION_NAME,
)
from moeslim.targets import files_under
from moeslim.units import human_bytes

# Never carried over: the base model's card (the pruned model gets its own), weights in other formats that
# would be stale (unpruned), folders of tools and caches, and the files a slim writes, which in a source that is
# itself a pruned output describe that earlier run (its plan, validation and expert map), not this one.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt", ".npz")
SKIP_DIRS = {".git", ".cache", ".huggingface", "original"}
SKIP_FILES = {CARD_NAME, CONFIG_NAME, INDEX_NAME, PLAN_NAME, VALIDATION_NAME, IMAGE_NAME}


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


# What slim writes besides the files it copies from the source.
WRITTEN = re.compile(
    "|".join(
        re.escape(n) for n in (CONFIG_NAME, SINGLE_NAME, INDEX_NAME, PLAN_NAME, CARD_NAME, VALIDATION_NAME, IMAGE_NAME)
    )
    + f"|{SHARD_PATTERN}"
)


def foreign_file(folder: Path, copied: list[Path]) -> str | None:
    """What in ``folder`` a slim of this source would not have written (None: every file is slim's).

    An output is recognised by its plan file; ``copied`` are the source's files slim copies into an output.
    """
    files = list(files_under(folder))
    if files and PLAN_NAME not in files:
        return f"has no {PLAN_NAME}, so it is not a moeslim output"
    own = {rel.as_posix() for rel in copied}
    other = next((f for f in files if f not in own and not WRITTEN.fullmatch(f)), None)
    return None if other is None else f"holds {other}, which moeslim did not write"


def check_space(target: Path, needed: int) -> None:
    free = shutil.disk_usage(_existing_parent(target)).free
    if free < needed:
        raise OutputError(
            f"not enough disk space for {target}: needs {human_bytes(needed)}, {human_bytes(free)} free;"
            " free space or choose another --out"
        )


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path
