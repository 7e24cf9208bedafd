"""Open a source for reading: a folder as it is, a Hub repo id either downloaded whole into the standard cache
(``--cache-window full``) or read in place: small files through the cache, shards as sparse files in a work
folder beside the output, their bytes fetched by range requests just before they are read.

The work folder (``.<org>--<name>.moeslim-source``) holds the pinned commit's shards and a journal of which
bytes are present. It is removed when the command succeeds; a run that fails or is killed leaves it, and the
next run there resumes from it (a different commit starts afresh). Shards already complete in the Hugging Face
cache are read from there and never downloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from moeslim.errors import HubError, SourceChangedError, UsageError
from moeslim.hub import hub_errors, is_hub_source, local_source, not_cached, resolve_source, small_files
from moeslim.layout import Layout
from moeslim.remote.spans import blocks_bytes, merge
from moeslim.remote.store import Store
from moeslim.remote.transfer import Remote, Transfer
from moeslim.source import Checkpoint, open_checkpoint
from moeslim.surgery.files import check_space
from moeslim.targets import locked
from moeslim.units import parse_size

FULL = "full"
DEFAULT_WINDOW = "3layers"
MIN_LAYERS = 2  # the layer being read and the next one, fetched while it runs
SUFFIX = ".moeslim-source"
JOURNAL = "ranges.json"
_LAYERS = re.compile(r"\s*([0-9]+)\s*layers?\s*")
_LAYER_KEY = re.compile(r"^(.*?\.[0-9]+)\.")  # "model.layers.3.mlp..." → "model.layers.3"


@contextlib.contextmanager
def open_source(
    src: str, revision: str | None, preflight: Callable[[dict], None], cache_window: str = DEFAULT_WINDOW,
    beside: Path | None = None,
) -> Iterator[Checkpoint]:  # fmt: skip
    """The checkpoint ``src`` (folder or Hub repo id) for the block. A Hub source is read in place unless
    ``cache_window`` is ``full``; its work folder goes in ``beside`` (None: a temporary folder, for commands
    that read headers only)."""
    window = parse_window(cache_window)  # a bad value fails before any request
    if not is_hub_source(src):
        yield open_checkpoint(local_source(src, revision, preflight))
    elif window is None:
        yield open_checkpoint(resolve_source(src, revision, preflight))
    else:
        with _in_place(src, revision, preflight, beside) as ckpt:
            if isinstance(ckpt.fetcher, Store):
                ckpt.fetcher.window = window_bytes(window, ckpt, cache_window)
                if beside is not None:  # slim checks the output too (announce)
                    check_space(beside, ckpt.fetcher.window - ckpt.fetcher.held)
            yield ckpt


def announce(ckpt: Checkpoint, layout: Layout, keep: int, beside: Path) -> None:
    """Say before any weight moves what a Hub source read in place will hold on disk (the output, plus the window
    of source bytes beside it), and refuse when the disk there cannot hold it."""
    from moeslim.inspection import human_bytes
    from moeslim.surgery.mapping import plan_outputs

    store = ckpt.fetcher
    assert isinstance(store, Store) and store.window is not None
    output = sum(t.nbytes for t in plan_outputs(ckpt, layout, {i: tuple(range(keep)) for i in layout.moe_indices}))
    print(  # on stdout, as the start of slim's report: stderr is kept for one-line errors
        f"reading {store.transfer.repo_id} (commit {store.transfer.commit[:12]}) from the Hub in place:"
        f" disk use is the output, {human_bytes(output)}, plus at most {human_bytes(store.window)} of source at a time"
        f" in {beside}",
        flush=True,
    )
    check_space(beside, output + store.window - store.held)


def parse_window(text: str) -> tuple[int, int] | None:
    """``full`` → None; ``3layers`` → (3, 0); ``40GB`` → (0, 40e9). Refused in one line otherwise."""
    if text.strip().lower() == FULL:
        return None
    if m := _LAYERS.fullmatch(text.lower()):
        return int(m[1]), 0
    try:
        return 0, parse_size(text)
    except ValueError:
        raise UsageError(
            f"--cache-window {text!r} is not a window: pass a number of layers (3layers), a size (40GB) or full"
        ) from None


def window_bytes(window: tuple[int, int], ckpt: Checkpoint, text: str) -> int:
    """The window in bytes: at least the two largest reading units (a decoder layer, or everything outside
    the layers) that streaming holds at once."""
    layers, size = window
    unit = unit_bytes(ckpt)
    need = MIN_LAYERS * unit
    wanted = layers * unit if layers else size
    if wanted < need:
        from moeslim.inspection import human_bytes

        raise UsageError(
            f"--cache-window {text} holds less than the {MIN_LAYERS} layers read at once ({human_bytes(need)});"
            f" pass at least {MIN_LAYERS}layers, or full"
        )
    return wanted


def unit_bytes(ckpt: Checkpoint) -> int:
    """Disk taken by the largest group that is read at once: one decoder layer (tensors sharing a name prefix up to
    their first number), or all tensors outside the layers (embedding, final norm, head) together."""
    block = os.statvfs(ckpt.root).f_bsize  # counted in the whole disk blocks they take (store.py)
    groups: dict[tuple[str, Path], list[tuple[int, int]]] = {}
    for name, info in ckpt.tensors.items():
        key = m[1] if (m := _LAYER_KEY.match(name)) else ""
        groups.setdefault((key, info.file), []).append((info.start, info.end))
    sizes: dict[str, int] = {}
    for (key, _), spans in groups.items():
        sizes[key] = sizes.get(key, 0) + blocks_bytes(merge(spans), block)
    return max(sizes.values(), default=0)


@contextlib.contextmanager
def _in_place(
    src: str, revision: str | None, preflight: Callable[[dict], None], beside: Path | None
) -> Iterator[Checkpoint]:
    from huggingface_hub import constants, try_to_load_from_cache

    snapshot, shards = small_files(src, revision, preflight)
    commit = snapshot.name
    found = {name: try_to_load_from_cache(src, name, revision=commit) for name in shards}
    cached = {name: Path(path) for name, path in found.items() if isinstance(path, str)}
    if len(cached) == len(shards):
        yield open_checkpoint(snapshot)  # everything is in the cache already
        return
    if constants.is_offline_mode():
        raise not_cached(src)
    with hub_errors(src, commit):
        remotes = {name: _remote(src, commit, name) for name in shards if name not in cached}
    with _work_folder(src, beside) as folder:
        root = _populate(folder / commit, snapshot, cached)
        with Store.opened(root, folder / JOURNAL, Transfer(src, commit), remotes) as store, hub_errors(src, commit):
            store.fetch_headers()
            yield open_checkpoint(root, fetcher=store)


def _remote(repo_id: str, commit: str, name: str) -> Remote:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    meta = get_hf_file_metadata(hf_hub_url(repo_id, name, revision=commit), retry_on_errors=True)
    if meta.size is None:
        raise HubError(f"the Hub gave no size for {repo_id}/{name}; pass --cache-window full")
    return Remote(name, meta.size, meta.etag)


@contextlib.contextmanager
def _work_folder(repo_id: str, beside: Path | None) -> Iterator[Path]:
    """The work folder, locked; removed after success or when the source changed (its bytes are then useless),
    kept after other failures for the rerun to resume."""
    if beside is None:
        with tempfile.TemporaryDirectory(prefix="moeslim-source-") as tmp:
            yield Path(tmp)
        return
    several = os.environ.get("WORLD_SIZE", "1") != "1" and "RANK" in os.environ  # torchrun: a folder per rank
    rank = f".rank{os.environ['RANK']}" if several else ""
    folder = beside.expanduser().absolute() / f".{repo_id.replace('/', '--')}{rank}{SUFFIX}"
    with locked(folder):
        folder.mkdir(mode=0o700, exist_ok=True)
        try:
            yield folder
        except SourceChangedError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        except BaseException:
            if not _holds_weights(folder / JOURNAL):  # refused before any weight moved: nothing to resume
                shutil.rmtree(folder, ignore_errors=True)
            raise
        shutil.rmtree(folder, ignore_errors=True)


def _holds_weights(journal: Path) -> bool:
    try:
        return any(json.loads(journal.read_text(encoding="utf-8"))["have"].values())
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def _populate(root: Path, snapshot: Path, cached: dict[str, Path]) -> Path:
    """``root`` as the snapshot folder would be: the small files and cached shards linked from the cache (the
    sparse shards are added by the store). Folders of other commits are removed."""
    for other in root.parent.iterdir():
        if other.is_dir() and other != root:
            shutil.rmtree(other, ignore_errors=True)
    root.mkdir(exist_ok=True)
    links = {p.relative_to(snapshot).as_posix(): p for p in snapshot.rglob("*") if p.is_file()}
    links.update({name: path for name, path in cached.items()})
    for rel, target in links.items():
        link = root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        os.symlink(os.path.realpath(target), link)
    return root
