"""Hub sources: a repo id becomes a snapshot folder in the standard Hugging Face cache.

The small files come first (config, index, tokenizer, chat template, card, license), then ``preflight``
checks the config, and only then are the safetensors shards the index names downloaded: an unsupported
family or an infeasible ``--keep`` fails in seconds, before any weights move. huggingface_hub reads
``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and ``HF_HOME`` itself; its typed errors become one-line
errors here that say what to do. No message ever contains the token. huggingface_hub and its HTTP client are
imported where the Hub is used, so that commands on local folders start without them.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import importlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from moeslim import __version__
from moeslim.errors import CheckpointError, HubAuthError, HubError, MissingFileError, MoeslimError, UsageError
from moeslim.names import INDEX_NAME, SINGLE_NAME
from moeslim.source import read_json

if TYPE_CHECKING:
    from huggingface_hub.errors import RemoteEntryNotFoundError

# Everything a pruned checkpoint carries besides its weights. `*.md` brings the base card (its license
# metadata is carried over) and files such as USE_POLICY.md; weights in other formats are never fetched.
SMALL_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py", "*.md", "LICENSE*", "NOTICE*"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
NEAR = 0.8  # difflib ratio above which a local folder's name is taken for what a mistyped source meant


def is_repo_id(text: str) -> bool:
    """``org/name`` as the Hub spells repo ids (one slash, no ``..`` or ``--``, not a path like ``./x``)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and "--" not in text and not text.endswith(".")


def is_hub_source(src: str) -> bool:
    """A source is read from the Hub when it is a repo id, no local folder of that name exists, and it is not a
    typo of one (``fixtures/tiny-qwen3-mo`` next to a folder ``fixtures/tiny-qwen3-moe``)."""
    return not Path(src).expanduser().exists() and is_repo_id(src) and near_folder(src) is None


def near_folder(src: str) -> str | None:
    """``src`` with its last part replaced by the name of a folder beside it that is spelled almost alike, or None
    (the folder above it does not exist, or holds no such folder)."""
    stem = src.rstrip("/")
    path = Path(stem).expanduser()
    if not path.name or not path.parent.is_dir():
        return None
    try:
        names = sorted(p.name for p in path.parent.iterdir() if p.is_dir() and p.name != path.name)
    except OSError:  # unreadable: no suggestion
        return None
    match = difflib.get_close_matches(path.name, names, n=1, cutoff=NEAR)
    return stem[: len(stem) - len(path.name)] + match[0] if match else None


def resolve_source(src: str, revision: str | None, preflight: Callable[[dict], None]) -> Path:
    """A local folder unchanged, or the snapshot folder of Hub repo ``src`` at ``revision``.

    ``preflight(config)`` runs on the downloaded ``config.json`` before any weights are downloaded; it
    raises a ``MoeslimError`` to stop there.
    """
    if not is_hub_source(src):
        return local_source(src, revision, preflight)
    root, shards = small_files(src, revision, preflight)
    with hub_errors(src, revision):  # root.name is the commit: both steps read one snapshot
        _download(src, root.name, [glob.escape(name) for name in shards])  # patterns are globs
    return root


def local_source(src: str, revision: str | None, preflight: Callable[[dict], None]) -> Path:
    """The folder ``src``, its config passed through ``preflight``."""
    if not Path(src).expanduser().exists():
        raise missing_folder(src)
    if revision is not None:
        raise UsageError(f"--revision selects a Hub revision, but {src} is a local folder; drop --revision")
    root = Path(src).expanduser()
    if (root / "config.json").is_file():  # refusals from the config come before any weight is read
        preflight(read_json(root / "config.json", what="model config"))
    return root


def small_files(src: str, revision: str | None, preflight: Callable[[dict], None]) -> tuple[Path, list[str]]:
    """Hub repo ``src``'s small files in the standard cache (its snapshot folder, named by the commit) and the
    shard names its index gives, once ``preflight`` has passed its config and the repo is known to hold them."""
    with hub_errors(src, revision):
        root = _download(src, revision, SMALL_FILES)
    if not (root / "config.json").is_file():
        raise MissingFileError(f"{src} has no config.json: it is not a transformers model repo")
    preflight(read_json(root / "config.json", what="model config"))
    shards = _shard_names(root)
    _check_in_repo(src, root.name, shards)
    return root, shards


def missing_folder(src: str) -> MissingFileError:
    """The error for a source that is neither a folder nor a Hub repo id, with the folder it may have meant."""
    if near := near_folder(src):
        return MissingFileError(f"no such folder {src}; did you mean {near}?")
    return MissingFileError(f"{src} does not exist: pass a checkpoint folder or a Hub repo id like org/name")


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        repo_id, revision=revision, allow_patterns=patterns, library_name="moeslim", library_version=__version__
    )
    return Path(folder)


def _shard_names(root: Path) -> list[str]:
    """The shards the index names, or the single-file checkpoint; ``open_checkpoint`` judges a bad index."""
    if not (root / INDEX_NAME).is_file():
        return [SINGLE_NAME]
    weight_map = read_json(root / INDEX_NAME, what="shard index").get("weight_map")
    return sorted({v for v in weight_map.values() if isinstance(v, str)} if isinstance(weight_map, dict) else set())


def _check_in_repo(repo_id: str, commit: str, shards: list[str]) -> None:
    """Refuse a repo without the weights it needs, from the file listing the first step cached."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        listed = {f.path for f in get_cached_repo_tree(repo_id, revision=commit)}
    except CachedRepoTreeNotFoundError:
        return  # a cache from an older huggingface_hub: the download will tell
    if shards == [SINGLE_NAME] and SINGLE_NAME not in listed:
        raise MissingFileError(
            f"{repo_id} has no {SINGLE_NAME} or {INDEX_NAME}: moeslim reads safetensors only, convert other formats"
        )
    if missing := [name for name in shards if name not in listed]:
        raise CheckpointError(f"{INDEX_NAME} of {repo_id} names {missing[0]}, which the repo lacks; it is incomplete")


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None, *, writing: bool = False) -> Iterator[None]:
    """Turn huggingface_hub's errors about ``repo_id`` into one-line moeslim errors."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
    )

    try:
        yield
    except LocalTokenNotFoundError as e:
        raise HubAuthError(f"no Hugging Face token found for {repo_id}: {LOGIN}") from e
    except OfflineModeIsEnabled as e:
        raise HubError(f"HF_HUB_OFFLINE is set, so {repo_id} cannot be reached; unset it to go online") from e
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError, http_library().HTTPError) as e:
        raise explain(e, repo_id, revision, writing) from e


def http_library() -> ModuleType:
    """The HTTP library of huggingface_hub's session, whose errors a request raises: httpx under huggingface_hub
    1.x, httpx2 under 2.x (pyproject allows both, and transformers 5.16 pins 1.x). Their error classes are
    unrelated, so catching one library's by name lets the other's escape as a traceback."""
    from huggingface_hub import get_session

    return importlib.import_module(type(get_session()).__module__.partition(".")[0])


LOGIN = "log in with `hf auth login` or set HF_TOKEN"


def explain(e: Exception, repo_id: str, revision: str | None, writing: bool = False) -> MoeslimError:
    """One line for a Hub failure; order matters: gated and missing revisions are kinds of not-found."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = f"{constants.ENDPOINT}/{repo_id}"
    status = e.response.status_code if isinstance(e, HfHubHTTPError) and e.response is not None else None
    if isinstance(e, GatedRepoError):
        return HubAuthError(f"{repo_id} is gated: request access at {url}, then {LOGIN} with that account's token")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{repo_id} has no revision {revision!r}: check --revision (a branch, tag or commit)")
    if isinstance(e, RemoteEntryNotFoundError):
        return HubError(f"{repo_id} lacks a file it needs ({_entry(e)}); the repo is incomplete")
    if isinstance(e, RepositoryNotFoundError):
        return HubError(f"{repo_id} not found at {constants.ENDPOINT}: check the name; if it is private, {LOGIN}")
    if isinstance(e, HFValidationError):
        return UsageError(f"{repo_id!r} is not a valid Hub repo id (org/name)")
    if isinstance(e, LocalEntryNotFoundError):
        return not_cached(repo_id)
    if status == 401:
        return HubAuthError(f"the Hub rejected the token (401 invalid credentials): {LOGIN} with a valid token")
    if status == 403:
        need = "write to" if writing else "read"
        return HubAuthError(f"the token may not {need} {repo_id} (403): {LOGIN} with a token that may {need} it")
    if status is not None:
        return HubError(f"{constants.ENDPOINT} answered {status} for {repo_id}; try again later")
    return HubError(f"cannot reach {constants.ENDPOINT} ({type(e).__name__}); check the connection or HF_ENDPOINT")


def not_cached(repo_id: str) -> HubError:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return HubError(
            f"HF_HUB_OFFLINE is set and {repo_id} is not (completely) in the cache {constants.HF_HUB_CACHE};"
            " download it once online, or unset HF_HUB_OFFLINE"
        )
    return HubError(
        f"cannot reach {constants.ENDPOINT} and {repo_id} is not cached; check the connection or HF_ENDPOINT"
    )


def _entry(e: RemoteEntryNotFoundError) -> str:
    url = str(e.response.url) if e.response is not None else ""
    return url.split("/resolve/", 1)[-1].split("/", 1)[-1] if "/resolve/" in url else "a file"


def redact(text: str) -> str:
    """``text`` with the Hugging Face token, if one is set and appears in it, masked."""
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "hf_***") if token else text
