"""Hub sources whose large files the Hub redirects to a CDN on another host, as the real Hub does: the test
server's opt-in CDN mode (tests/hub_server.py ``with_cdn``, on 127.0.0.2), against the same repo on a server that
does not redirect. The bytes sent are the same, range for range; the token never reaches the CDN; a file changed
during the run is still refused, though the CDN's answers carry no commit."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.hub_server import CDN_HOST, Account, CdnServer, HubServer, folder_files
from tests.test_hub import WRITE, _moeslim
from tests.test_hub import _env as _hub_env
from tests.test_hub_stream import _output_spans, _same_weights, _sent, refused_as_changed_during_the_run

REPOS = ("free", "full", "stats", "edited", "moved")


def _env(server: HubServer, home: Path) -> dict[str, str]:
    """The test Hub's environment, with no proxy for the CDN's host either."""
    return {**_hub_env(server, home), "NO_PROXY": f"127.0.0.1,{CDN_HOST}", "no_proxy": f"127.0.0.1,{CDN_HOST}"}


@pytest.fixture(scope="module")
def servers(built: Callable[[str], Path]) -> Iterator[tuple[HubServer, HubServer, CdnServer]]:
    """(a Hub that redirects its safetensors to a CDN, a Hub that serves them itself, that CDN)."""
    redirecting, plain = HubServer().start(), HubServer().start()
    cdn = redirecting.with_cdn()
    for server in (redirecting, plain):
        server.state.tokens[WRITE] = Account("alice", orgs=("org",))
        for name in REPOS:
            server.state.add_repo(f"org/{name}", folder_files(built("qwen3_moe_multishard")))
    yield redirecting, plain, cdn
    redirecting.stop()
    plain.stop()


def _no_token_at(cdn: CdnServer, since: int) -> int:
    """How many requests the CDN received from ``since`` on; asserts none carried the token or any credential."""
    received = cdn.received[since:]
    assert not [h for h in received if "authorization" in h or "cookie" in h or WRITE in json.dumps(h)], received
    return len(received)


@pytest.mark.hub
@pytest.mark.parametrize("window", ["3layers", "full"])
def test_a_data_free_prune_through_the_cdn(servers, built, tmp_path: Path, window: str, capsys) -> None:
    redirecting, plain, cdn = servers
    repo_id = "org/free" if window != "full" else "org/full"
    args = ["slim", repo_id, "--keep", "4", "--criterion", "random", "--seed", "3", "--out", "o", "--no-validate",
            "--cache-window", window]  # fmt: skip
    since = len(cdn.received)
    runs = {}
    for name, server in (("cdn", redirecting), ("plain", plain)):
        (tmp_path / name).mkdir()
        runs[name] = _moeslim(args, _env(server, tmp_path / name / "hf"), tmp_path / name)
        assert runs[name].code == 0, runs[name].err
    assert _no_token_at(cdn, since) > 0  # the shards did come from the CDN
    assert any(r.status == 302 and r.user == "alice" for r in redirecting.state.log)  # the Hub saw the token
    assert _sent(redirecting, repo_id) == _sent(plain, repo_id)  # range for range, each byte once
    folder = built("qwen3_moe_multishard")
    if window != "full":
        assert _sent(redirecting, repo_id) == _output_spans(folder, tmp_path / "cdn" / "o" / "moeslim_plan.json")
    _same_weights(tmp_path / "cdn" / "o", tmp_path / "plain" / "o")
    code, _, err = run_cli(["slim", str(folder), "--plan", str(tmp_path / "cdn" / "o" / "moeslim_plan.json"), "--out",
                            str(tmp_path / "local"), "--no-validate"], capsys)  # fmt: skip
    assert code == 0, err
    _same_weights(tmp_path / "cdn" / "o", tmp_path / "local")


@pytest.mark.hub
def test_calibration_through_the_cdn(servers, tmp_path: Path) -> None:
    redirecting, plain, cdn = servers
    args = ["calibrate", "org/stats", "--out", "stats", "--samples", "8", "--seq-len", "32", "--cache-window",
            "2layers"]  # fmt: skip
    since = len(cdn.received)
    for name, server in (("cdn", redirecting), ("plain", plain)):
        (tmp_path / name).mkdir()
        run = _moeslim(args, _env(server, tmp_path / name / "hf"), tmp_path / name)
        assert run.code == 0, run.err
    assert _no_token_at(cdn, since) > 0
    assert _sent(redirecting, "org/stats") == _sent(plain, "org/stats")
    for file in ("stats.safetensors", "stats.json"):
        assert (tmp_path / "cdn" / "stats" / file).read_bytes() == (tmp_path / "plain" / "stats" / file).read_bytes()


@pytest.mark.hub
@pytest.mark.parametrize("how", ["file edited", "force-pushed"])
def test_a_source_changed_behind_the_cdn_is_refused(servers, tmp_path: Path, how: str) -> None:
    """The CDN sends no X-Repo-Commit, and its ETag is of the bytes it serves: the Hub's redirect, which carries
    the commit and the file's X-Linked-Etag, is what tells."""
    redirecting, _, _ = servers
    repo_id = "org/edited" if how == "file edited" else "org/moved"
    refused_as_changed_during_the_run(redirecting, repo_id, how, _env(redirecting, tmp_path / "hf"), tmp_path)
