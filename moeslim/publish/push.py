"""Publishing a folder to the Hub: create the repo if needed, upload the folder in one go, give the URL.

Option names follow ``hf upload``: ``--private`` (only when the repo is created), ``--revision`` (a branch,
created from the default branch if missing), ``--create-pr`` (a pull request against the default branch),
``--commit-message``. The token is huggingface_hub's (``HF_TOKEN`` or ``hf auth login``); it is checked
before any work so that a long prune does not end in an authentication error. huggingface_hub is imported by the
functions that use it, so that commands that publish nothing start without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moeslim import __version__
from moeslim.errors import HubAuthError, MissingFileError, UsageError
from moeslim.hub import LOGIN, hub_errors, is_repo_id

if TYPE_CHECKING:
    from huggingface_hub import HfApi


@dataclass(frozen=True)
class PushOptions:
    repo_id: str
    private: bool = False
    revision: str | None = None  # branch to commit to (default: the repo's default branch)
    create_pr: bool = False
    commit_message: str | None = None


def check_push_options(opts: PushOptions) -> None:
    """Refuse contradictory options before any work."""
    if not is_repo_id(opts.repo_id):
        raise UsageError(f"{opts.repo_id!r} is not a Hub repo id; push to one like org/name")
    if opts.create_pr and opts.revision not in (None, "main"):
        raise UsageError("a pull request always targets the default branch: drop the branch or --create-pr")


def check_write_access(opts: PushOptions) -> None:
    """A token must exist, be valid and not be read-only; fine-grained scopes are left to the Hub to judge."""
    from huggingface_hub import get_token

    check_push_options(opts)
    if get_token() is None:
        raise HubAuthError(f"pushing to {opts.repo_id} needs a token with write access: {LOGIN}")
    with hub_errors(opts.repo_id, writing=True):
        me = _api().whoami()
    role = (me.get("auth") or {}).get("accessToken", {}).get("role")
    if role == "read":
        raise HubAuthError(f"the token is read-only, so it cannot push to {opts.repo_id}: {LOGIN} with a write token")


def push_folder(folder: Path, opts: PushOptions) -> str:
    """Upload every file of ``folder`` to ``opts.repo_id``; return the URL to look at.

    Call ``check_write_access`` first (``slim`` does so before pruning, long before it pushes).
    """
    if not folder.is_dir():
        raise MissingFileError(f"{folder} is not a folder; pass the output folder of `moeslim slim`")
    api = _api()
    with hub_errors(opts.repo_id, opts.revision, writing=True):
        repo_url = api.create_repo(opts.repo_id, private=opts.private, exist_ok=True)
        if opts.revision is not None and not opts.create_pr:
            _ensure_branch(api, opts.repo_id, opts.revision)
        commit = api.upload_folder(
            repo_id=opts.repo_id,
            folder_path=folder,
            revision=opts.revision,
            create_pr=opts.create_pr,
            commit_message=opts.commit_message or f"Upload {folder.name}, pruned with moeslim {__version__}",
        )
    if commit.pr_url:
        return str(commit.pr_url)
    return f"{repo_url}/tree/{opts.revision}" if opts.revision else str(repo_url)


def upload_list(folder: Path) -> list[tuple[str, int]]:
    """(path in repo, bytes) of every file ``push_folder`` would upload, as huggingface_hub selects them."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    if not folder.is_dir():
        raise MissingFileError(f"{folder} is not a folder; pass the output folder of `moeslim slim`")
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    kept = filter_repo_objects(list(files), ignore_patterns=DEFAULT_IGNORE_PATTERNS)
    return [(rel, files[rel].stat().st_size) for rel in kept]


def _ensure_branch(api: HfApi, repo_id: str, branch: str) -> None:
    """Like ``hf upload --revision``: a missing branch is created from the default branch."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        api.repo_info(repo_id, revision=branch)
    except RevisionNotFoundError:
        api.create_branch(repo_id, branch=branch, exist_ok=True)


def _api() -> HfApi:
    from huggingface_hub import HfApi

    return HfApi(library_name="moeslim", library_version=__version__)
