"""Range requests for the files of one Hub commit, with huggingface_hub's HTTP session and auth headers.

Every request names the commit (not the branch), so a repo that moves on during a run cannot mix two versions
into one output: a commit that disappears (force-pushed away) or a file whose size or ETag no longer matches what
the run started from is refused in one line. Answers 408/429/5xx and connections that drop are retried with
backoff; a range cut off part way resumes from the last byte received, so no byte is asked for twice.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moeslim import __version__
from moeslim.errors import HubError, SourceChangedError

if TYPE_CHECKING:
    import httpx2

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TRIES = 8  # attempts in a row that bring no byte, before giving up
WAIT = 0.25  # seconds before the first retry, doubled after each, at most MAX_WAIT
MAX_WAIT = 8.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


@dataclass(frozen=True)
class Remote:
    """A file of the pinned commit: its size and ETag as the commit's metadata gave them."""

    name: str
    size: int
    etag: str | None


class Transfer:
    """Downloads byte ranges of ``repo_id`` at ``commit`` into open files; counts what it received."""

    def __init__(self, repo_id: str, commit: str, sleep: Callable[[float], None] = time.sleep) -> None:
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers

        self.repo_id, self.commit, self._sleep = repo_id, commit, sleep
        self._headers = build_hf_headers(library_name="moeslim", library_version=__version__)
        self._endpoint = constants.ENDPOINT
        self.received = 0

    def get(self, remote: Remote, fd: int, start: int, end: int) -> None:
        """Write bytes ``[start, end)`` of ``remote`` into ``fd`` at the same offsets."""
        at, failures = start, 0
        while at < end:
            before = at
            try:
                at = self._once(remote, fd, at, end)
            except _Retry as e:
                at = e.at  # a cut range resumes after its last byte received
                failures = 0 if at > before else failures + 1
                if failures >= TRIES:
                    raise HubError(
                        f"{self._endpoint} kept failing for {self.repo_id}/{remote.name} ({e}); try again later:"
                        " the bytes already downloaded are kept for the rerun"
                    ) from e
                self._sleep(e.wait if e.wait is not None else min(MAX_WAIT, WAIT * 2 ** (failures - 1)))

    def _once(self, remote: Remote, fd: int, start: int, end: int) -> int:
        """One request for ``[start, end)``; returns the offset reached (``end`` when complete)."""
        from huggingface_hub import get_session, hf_hub_url

        from moeslim.hub import http_library

        url = hf_hub_url(self.repo_id, remote.name, revision=self.commit)
        headers = {**self._headers, "Range": f"bytes={start}-{end - 1}"}
        at = start
        try:
            with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=60) as r:
                self._check(remote, r, start, end)
                for chunk in r.iter_bytes():  # as received: a cut connection loses no byte it delivered
                    chunk = chunk[: end - at]
                    os.pwrite(fd, chunk, at)
                    at += len(chunk)
                    self.received += len(chunk)
        except http_library().TransportError as e:  # RemoteProtocolError (a cut body) is one
            raise _Retry(type(e).__name__, at) from e
        if at < end:
            raise _Retry("the connection closed early", at)
        return at

    def _check(self, remote: Remote, r: httpx2.Response, start: int, end: int) -> None:
        if r.status_code in RETRY_STATUS:
            after = r.headers.get("Retry-After", "")
            raise _Retry(f"HTTP {r.status_code}", start, min(MAX_WAIT, float(after)) if after.isdigit() else None)
        if r.status_code == 404:  # the commit was pinned at the start: it, or the file, is gone since
            raise self._changed(remote)
        if r.status_code >= 400:
            r.read()
            from huggingface_hub.utils import hf_raise_for_status

            hf_raise_for_status(r)  # typed: hub.explain turns a vanished commit into one line
        if r.status_code != 206:
            raise HubError(f"{self._endpoint} ignored a range request for {remote.name} (HTTP {r.status_code});"
                           " pass --cache-window full to download whole files")  # fmt: skip
        self._check_same(remote, r, start, end)

    def _check_same(self, remote: Remote, r: httpx2.Response, start: int, end: int) -> None:
        """The answer must be the range asked for, of the file the run started from. A large file is redirected
        to a CDN, which knows nothing of commits (and whose own ETag need not be the Hub's): the commit and ETag
        checked are those of the Hub's last answer, the redirect, as ``get_hf_file_metadata`` read them."""
        got = _CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", ""))
        hub = next((a for a in reversed([*r.history, r]) if "X-Repo-Commit" in a.headers), None if r.history else r)
        commit = hub.headers.get("X-Repo-Commit") if hub is not None else None
        etag = _etag(hub.headers.get("X-Linked-Etag") or hub.headers.get("ETag")) if hub is not None else None
        changed = (commit is not None and commit != self.commit) or (got is not None and int(got[3]) != remote.size)
        changed |= etag is not None and remote.etag is not None and etag != remote.etag
        if changed:
            raise self._changed(remote)
        if got is None or int(got[1]) != start or int(got[2]) > end - 1:
            raise HubError(
                f"{self._endpoint} answered a range request for {remote.name} with the wrong bytes"
                f" ({r.headers.get('Content-Range')!r}); try again, or pass --cache-window full"
            )

    def _changed(self, remote: Remote) -> SourceChangedError:
        return SourceChangedError(
            f"{self.repo_id} changed on the Hub during the run: {remote.name} of commit {self.commit[:12]} is gone or"
            " differs; rerun to prune the repo as it is now"
        )


def _etag(value: str | None) -> str | None:
    return None if value is None else value.removeprefix("W/").strip('"')


class _Retry(Exception):
    def __init__(self, why: str, at: int, wait: float | None = None) -> None:
        super().__init__(why)
        self.at, self.wait = at, wait
