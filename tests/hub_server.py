"""A Hub-compatible HTTP server on 127.0.0.1, for tests: enough of the Hub API for huggingface_hub's own
client to download a model repo, create a repo, make branches and pull requests, and commit files.

Repos live in memory as commits of ``{path: bytes}``. Tokens map to accounts (read or write role, orgs,
gated repos they were granted). Errors carry the ``X-Error-Code`` / ``X-Error-Message`` headers the Hub
sends, so the client raises its real typed errors. Every request is logged for tests to assert on.

Downloads answer ``Range: bytes=a-b`` requests as the Hub does (206 with ``Content-Range``), and every byte of
a file's content sent is counted (``HubState.served``). ``HubState.faults`` lets a test make the server answer a
range request with an error status, cut the connection part way through, or change the repo first.

Redirects to a CDN, as the Hub answers for the large (LFS) files, are opt-in: ``HubServer.with_cdn()`` starts a
second server on another host (127.0.0.2: another origin, and another host name, which is what huggingface_hub
1.x compares before it follows a redirect), and from then on ``resolve`` answers ``*.safetensors`` with a 302
whose ``Location`` is on it, carrying the file's metadata as the Hub does (``X-Repo-Commit``, ``X-Linked-Etag``,
``X-Linked-Size``). The CDN serves the same bytes, with ranges, counts them in the same ``sent``, and records the
headers of every request it receives (``CdnServer.received``).

Not implemented: LFS and Xet uploads (preupload always answers ``regular``, so file contents travel inline
in the commit), pagination, deletions of folders, spaces and datasets.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import secrets
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
CDN_HOST = "127.0.0.2"  # loopback too, but not the Hub's host


@dataclass
class Account:
    name: str
    role: str = "write"  # "read" or "write", as the Hub's access tokens
    orgs: tuple[str, ...] = ()
    granted: set[str] = field(default_factory=set)  # gated repos this account may download


@dataclass
class Repo:
    private: bool = False
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N → commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit → files
    prs: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # unquoted
    status: int
    user: str | None  # account name; None without a token


@dataclass(frozen=True)
class Sent:
    """File content sent in one GET: ``[start, start + count)`` of ``path`` in ``repo_id``."""

    repo_id: str
    path: str
    start: int
    count: int


@dataclass(frozen=True)
class Fault:
    """What a fault hook makes the server do with one range request: answer ``status`` (with ``Retry-After: 0``)
    instead, or send only ``cut_after`` bytes of the range and drop the connection."""

    status: int | None = None
    cut_after: int | None = None


# (repo id, path, start, end inclusive or -1) of a range request → what to do; called under the state's lock,
# before the request is answered, so a hook may change the repo (``force_push``) for this very request
FaultHook = Callable[[str, str, int, int], Fault | None]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, Account] = {}
        self.log: list[Request] = []
        self.sent: list[Sent] = []
        self.faults: list[FaultHook] = []
        self.lock = threading.Lock()

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False, gated: bool = False) -> None:
        repo = self.repos[repo_id] = Repo(private=private, gated=gated)
        _commit(repo, "main", {".gitattributes": GITATTRIBUTES, **files})

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs[revision]]

    def downloads(self, repo_id: str, since: int = 0) -> list[str]:
        """Files of ``repo_id`` whose content was sent (GET on resolve) from log entry ``since`` on, in order."""
        marker = f"/{repo_id}/resolve/"
        with self.lock:
            hits = [r.path.split(marker, 1)[1] for r in self.log[since:] if r.method == "GET" and marker in r.path
                    and r.status == 200]  # fmt: skip
        return [hit.split("/", 1)[1] for hit in hits]

    def served(self, repo_id: str, since: int = 0) -> int:
        """Bytes of file content of ``repo_id`` sent from entry ``since`` of ``sent`` on."""
        with self.lock:
            return sum(s.count for s in self.sent[since:] if s.repo_id == repo_id)

    def force_push(self, repo_id: str, files: dict[str, bytes], ref: str = "main") -> str:
        """Replace ``ref`` by a new commit of ``files`` and forget the old one, as a force push and garbage
        collection do; call under the lock (from a fault hook) or before requests."""
        repo = self.repos[repo_id]
        old = repo.refs[ref]
        sha = _commit(repo, ref, {".gitattributes": GITATTRIBUTES, **files}, parent=old)
        del repo.commits[old]
        return sha


def folder_files(folder: Path) -> dict[str, bytes]:
    """Relative path → content of every file under ``folder``: a repo's files as the Hub stores them."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _commit(repo: Repo, ref: str, files: dict[str, bytes], parent: str | None = None) -> str:
    digest = hashlib.sha1((parent or "").encode())
    for path, data in sorted(files.items()):
        digest.update(path.encode() + b"\0" + hashlib.sha1(data).digest())
    sha = digest.hexdigest()
    repo.commits[sha] = files
    repo.refs[ref] = sha
    return sha


@functools.lru_cache(maxsize=1024)  # a bytes object caches its own hash: looking a file up again is cheap
def blob_id(data: bytes) -> str:
    """The git blob id, which the Hub uses as ETag and tree oid of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_oid(data: bytes) -> str:
    """The sha256 of an LFS file's content, which the Hub gives as its ``X-Linked-Etag``."""
    return hashlib.sha256(data).hexdigest()


def _ranged(data: bytes, header: str, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    """The answer to a GET of ``data`` with ``Range`` ``header`` ("" for none): 200 whole, 206 with
    ``Content-Range``, or 416; ``headers`` gain ``Content-Range`` and the start in ``X-Test-Sent``."""
    wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", header)
    if wanted is None:
        return 200, data, headers
    start = int(wanted[1])
    end = min(int(wanted[2]) if wanted[2] else len(data) - 1, len(data) - 1)
    if start > end:
        return 416, b"", {"Content-Range": f"bytes */{len(data)}"}
    sent = headers["X-Test-Sent"].rsplit("\0", 1)[0]
    headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}", "X-Test-Sent": f"{sent}\0{start}"}
    return 206, data[start : end + 1], headers


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms wait for a delayed ACK between

    def log_message(self, format: str, *args: object) -> None:  # quiet: the state keeps its own log
        pass

    def _reply(self, method: str, status: int, payload: bytes, headers: dict[str, str]) -> None:
        state: HubState = self.server.state  # type: ignore[attr-defined]
        sent, cut = headers.pop("X-Test-Sent", None), headers.pop("X-Test-Cut", None)
        self.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", headers.get("Content-Length", str(len(payload))))
        self.end_headers()
        if method == "HEAD":
            return
        body = payload if cut is None else payload[: int(cut)]
        self.wfile.write(body)
        if sent is not None:
            repo_id, path, start = sent.split("\0")
            with state.lock:
                state.sent.append(Sent(repo_id, path, int(start), len(body)))
        if cut is not None:  # the client sees the connection end inside the body
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


class Handler(_Quiet):
    server: HubServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = self._body()
        user = "(invalid token)" if self.headers.get("Authorization") else None
        try:
            account = self._account()
            user = account.name if account else None
            status, payload, headers = self._route(method, parts, query, body, account)
        except HubError as e:
            status, payload = e.status, json.dumps({"error": e.message, **e.extra}).encode()
            headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {})}
        with self.server.state.lock:
            self.server.state.log.append(Request(method, "/" + "/".join(parts), status, user))
        self._reply(method, status, payload, headers)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _account(self) -> Account | None:
        header = self.headers.get("Authorization")
        if not header:
            return None
        account = self.server.state.tokens.get(header.removeprefix("Bearer ").strip())
        if account is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return account

    def _route(self, method: str, p: list[str], query: dict, body: bytes, who: Account | None) -> tuple:
        state = self.server.state
        with state.lock:
            if method == "GET" and p == ["api", "whoami-v2"]:
                return _whoami(who)
            if method == "POST" and p == ["api", "repos", "create"]:
                return self._create(json.loads(body), who)
            if method == "POST" and p == ["api", "validate-yaml"]:
                return _validate_yaml(json.loads(body)["content"])
            if len(p) >= 5 and p[0] == "api" and p[1] == "models":
                return self._api(method, f"{p[2]}/{p[3]}", p[4:], query, body, who)
            if len(p) >= 5 and p[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]), who)
            if method == "GET" and len(p) == 2 and p[0] != "api":
                return self._model_info(f"{p[0]}/{p[1]}", "main", who)  # never called by the client; for show
        raise HubError(404, f"no route for {method} /{'/'.join(p)}")

    def _api(self, method: str, repo_id: str, rest: list[str], query: dict, body: bytes, who: Account | None) -> tuple:
        op = rest[0]
        if method == "GET" and op == "revision":
            return self._model_info(repo_id, "/".join(rest[1:]), who)
        if method == "GET" and op == "tree":
            return self._tree(repo_id, rest[1], who)
        if method == "POST" and op == "preupload":
            return self._preupload(repo_id, "/".join(rest[1:]), json.loads(body), who)
        if method == "POST" and op == "commit":
            return self._commit(repo_id, "/".join(rest[1:]), body, query.get("create_pr") == "1", who)
        if method == "POST" and op == "branch":
            return self._branch(repo_id, "/".join(rest[1:]), who)
        if op == "discussions":
            return self._discussions(method, repo_id, rest[1:], json.loads(body or b"{}"), who)
        raise HubError(404, f"no route for {method} /api/models/{repo_id}/{'/'.join(rest)}")

    # reading -------------------------------------------------------------------------------------------

    def _readable(self, repo_id: str, who: Account | None) -> Repo:
        repo = self.server.state.repos.get(repo_id)
        if repo is None or (repo.private and not _member(who, repo_id.split("/")[0])):
            raise HubError(401 if who is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> str:
        if revision in repo.refs:
            return repo.refs[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _model_info(self, repo_id: str, revision: str, who: Account | None) -> tuple:
        repo = self._readable(repo_id, who)
        sha = self._commit_of(repo, revision)
        siblings = [{"rfilename": path} for path in sorted(repo.commits[sha])]
        info = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "disabled": False,
                "gated": "manual" if repo.gated else False, "siblings": siblings, "tags": []}  # fmt: skip
        return 200, json.dumps(info).encode(), {}

    def _tree(self, repo_id: str, revision: str, who: Account | None) -> tuple:
        repo = self._readable(repo_id, who)
        files = repo.commits[self._commit_of(repo, revision)]
        tree = [{"type": "file", "oid": blob_id(d), "size": len(d), "path": p} for p, d in sorted(files.items())]
        return 200, json.dumps(tree).encode(), {}

    def _resolve(self, repo_id: str, revision: str, path: str, who: Account | None) -> tuple:
        repo = self._readable(repo_id, who)
        if repo.gated and (who is None or repo_id not in who.granted):
            raise HubError(401 if who is None else 403, f"Access to model {repo_id} is restricted", "GatedRepo")
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")) if self.command == "GET" else None
        cut = None
        for hook in self.server.state.faults if wanted else ():  # first: a hook may change the repo
            fault = hook(repo_id, path, int(wanted[1]), int(wanted[2]) if wanted[2] else -1)
            if fault is not None and fault.status is not None:
                return fault.status, b"{}", {"Retry-After": "0"}
            cut = fault.cut_after if fault is not None and fault.cut_after is not None else cut
        sha = self._commit_of(repo, revision)
        if path not in repo.commits[sha]:
            raise HubError(404, "Entry not found", "EntryNotFound")
        data = repo.commits[sha][path]
        cdn = self.server.cdn
        if cdn is not None and path.endswith(".safetensors"):  # an LFS file: the Hub sends the client to its CDN
            return 302, b"", {"Location": cdn.location(repo_id, sha, path), "X-Repo-Commit": sha,
                              "X-Linked-Etag": f'"{lfs_oid(data)}"', "X-Linked-Size": str(len(data))}  # fmt: skip
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob_id(data)}"', "Content-Type": "application/octet-stream",
                   "Accept-Ranges": "bytes", "X-Test-Sent": f"{repo_id}\0{path}\0{0}",
                   **({"X-Test-Cut": str(cut)} if cut is not None and wanted else {})}  # fmt: skip
        return _ranged(data, self.headers.get("Range", "") if wanted else "", headers)

    # writing -------------------------------------------------------------------------------------------

    def _writable(self, repo_id: str, who: Account | None) -> Repo:
        namespace = repo_id.split("/")[0]
        if who is None:
            raise HubError(401, "Invalid username or password.")
        if not _may_write(who, namespace):
            raise HubError(403, f"You don't have the rights to write to {namespace}")
        return self._readable(repo_id, who)

    def _create(self, payload: dict, who: Account | None) -> tuple:
        namespace = payload.get("organization") or (who.name if who else "")
        repo_id = f"{namespace}/{payload['name']}"
        if who is None:
            raise HubError(401, "Invalid username or password.")
        if not _may_write(who, namespace):
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace}")
        if repo_id in self.server.state.repos:
            raise HubError(409, "You already created this model repo", url=f"{self.server.url}/{repo_id}")
        repo = self.server.state.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        _commit(repo, "main", {".gitattributes": GITATTRIBUTES})
        return 200, json.dumps({"url": f"{self.server.url}/{repo_id}", "name": repo_id}).encode(), {}

    def _preupload(self, repo_id: str, revision: str, payload: dict, who: Account | None) -> tuple:
        repo = self._writable(repo_id, who)
        current = repo.commits[self._commit_of(repo, revision)]
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": blob_id(current[f["path"]]) if f["path"] in current else None}
            for f in payload["files"]
        ]  # fmt: skip
        return 200, json.dumps({"files": files}).encode(), {}

    def _commit(self, repo_id: str, revision: str, body: bytes, create_pr: bool, who: Account | None) -> tuple:
        repo = self._writable(repo_id, who)
        parent = self._commit_of(repo, revision)
        files = dict(repo.commits[parent])
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
            elif item["key"] != "header":
                raise HubError(400, f"this test server does not take {item['key']} operations")
        ref = revision
        if create_pr:
            ref = self._open_pr(repo_id, repo, "commit", parent)
        sha = _commit(repo, ref, files, parent)
        pr_url = f"{self.server.url}/{repo_id}/discussions/{ref.rsplit('/', 1)[1]}" if create_pr else None
        answer = {"commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": pr_url}
        return 200, json.dumps(answer).encode(), {}

    def _branch(self, repo_id: str, branch: str, who: Account | None) -> tuple:
        repo = self._writable(repo_id, who)
        if branch in repo.refs:
            raise HubError(409, f"Branch {branch} already exists")
        repo.refs[branch] = repo.refs["main"]
        return 200, b"{}", {}

    def _open_pr(self, repo_id: str, repo: Repo, title: str, base: str) -> str:
        num = len(repo.prs) + 1
        ref = f"refs/pr/{num}"
        repo.refs[ref] = base
        repo.prs.append({"num": num, "title": title, "ref": ref})
        return ref

    def _discussions(self, method: str, repo_id: str, rest: list[str], payload: dict, who: Account | None) -> tuple:
        repo = self._readable(repo_id, who)
        if method == "POST" and not rest and payload.get("pullRequest"):
            self._writable(repo_id, who)
            ref = self._open_pr(repo_id, repo, payload.get("title", ""), repo.refs["main"])
            num = int(ref.rsplit("/", 1)[1])
            return 200, json.dumps({"num": num, "url": f"{self.server.url}/{repo_id}/discussions/{num}"}).encode(), {}
        if method == "GET" and len(rest) == 1 and rest[0].isdigit() and int(rest[0]) <= len(repo.prs):
            pr = repo.prs[int(rest[0]) - 1]
            details = {"num": pr["num"], "title": pr["title"], "status": "open", "isPullRequest": True,
                       "createdAt": "2026-01-01T00:00:00.000Z", "author": {"name": who.name if who else "anonymous"},
                       "repo": {"name": repo_id, "type": "model"}, "events": [], "changes": {"base": "refs/heads/main"},
                       "filesWithConflicts": []}  # fmt: skip
            return 200, json.dumps(details).encode(), {}
        raise HubError(404, "Discussion not found")


def _member(who: Account | None, namespace: str) -> bool:
    return who is not None and (namespace == who.name or namespace in who.orgs)


def _may_write(who: Account | None, namespace: str) -> bool:
    return who is not None and who.role == "write" and _member(who, namespace)


def _whoami(who: Account | None) -> tuple:
    if who is None:
        raise HubError(401, "Invalid username or password.")
    me = {"type": "user", "name": who.name, "orgs": [{"name": org} for org in who.orgs],
          "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": who.role}}}  # fmt: skip
    return 200, json.dumps(me).encode(), {}


def _validate_yaml(content: str) -> tuple:
    match = re.match(r"---\n(.*?)\n---\n", content, re.DOTALL)
    try:
        meta = yaml.safe_load(match.group(1)) if match else {}
    except yaml.YAMLError as e:
        return 400, json.dumps({"errors": [{"message": str(e)}]}).encode(), {}
    if not isinstance(meta, dict):
        return 400, json.dumps({"errors": [{"message": "metadata must be a mapping"}]}).encode(), {}
    return 200, json.dumps({"errors": [], "warnings": []}).encode(), {}


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.cdn: CdnServer | None = None

    def with_cdn(self) -> CdnServer:
        """Redirect downloads of ``*.safetensors`` to a CDN server started now on another port."""
        self.cdn = CdnServer(self.state).start()
        return self.cdn

    def handle_error(self, request: object, client_address: object) -> None:
        """Quiet about clients that drop the connection (tests make them); anything else is printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    def start(self) -> HubServer:
        threading.Thread(target=self.serve_forever, name="hub-server", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.cdn is not None:
            self.cdn.stop()
        self.shutdown()
        self.server_close()


class CdnHandler(_Quiet):
    server: CdnServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        with self.server.state.lock:
            self.server.received.append({k.lower(): v for k, v in self.headers.items()})
        org, name, sha, path = (unquote(p) for p in url.path.lstrip("/").split("/", 3))
        repo = self.server.state.repos.get(f"{org}/{name}")
        data = repo.commits.get(sha, {}).get(path) if repo is not None and parse_qs(url.query).get("sig") else None
        if data is None:  # a signed URL of a commit gone, or not one this CDN made
            self._reply(method, 403, b"AccessDenied", {"Content-Type": "text/plain"})
            return
        headers = {"ETag": f'"{lfs_oid(data)}"', "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                   "X-Test-Sent": "\0".join((f"{org}/{name}", path, "0"))}  # fmt: skip
        self._reply(method, *_ranged(data, self.headers.get("Range", ""), headers))


class CdnServer(ThreadingHTTPServer):
    """The Hub's CDN: serves the files of a ``HubState`` by the signed locations the Hub redirects to; it sends no
    ``X-Repo-Commit`` and knows nothing of tokens."""

    daemon_threads = True

    def __init__(self, state: HubState) -> None:
        super().__init__((CDN_HOST, 0), CdnHandler)
        self.state = state
        self.url = f"http://{CDN_HOST}:{self.server_address[1]}"
        self.received: list[dict[str, str]] = []  # the headers of each request, names in lower case

    def location(self, repo_id: str, sha: str, path: str) -> str:
        return f"{self.url}/{quote(repo_id)}/{sha}/{quote(path)}?sig={secrets.token_hex(8)}&expires=3600"

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    def start(self) -> CdnServer:
        threading.Thread(target=self.serve_forever, name="cdn-server", daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
