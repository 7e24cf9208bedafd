"""Hub in and out, against a Hub-compatible server on 127.0.0.1 (tests/hub_server.py) and the real
huggingface_hub client, pointed at it through HF_ENDPOINT. The CLI runs in a subprocess because
huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli
from tests.hub_server import Account, HubServer, folder_files

ROOT = Path(__file__).resolve().parent.parent
# Random, so that finding one anywhere can only mean it leaked.
WRITE = f"hf_alice_{secrets.token_hex(12)}"  # alice: write, member of org
READ = f"hf_bob_{secrets.token_hex(12)}"  # bob: read-only
OUTSIDER = f"hf_carol_{secrets.token_hex(12)}"  # carol: write, but not a member of org
BOGUS = f"hf_bogus_{secrets.token_hex(12)}"  # unknown to the server
SMALL = {"README.md", "LICENSE", "chat_template.jinja", "config.json", "custom_helper.py", "generation_config.json",
         "tokenizer.json", "tokenizer_config.json"}  # fmt: skip
BASE_CARD = "---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\nA tiny test model.\n"


@pytest.fixture(scope="module")
def hub(built: Callable[[str], Path]) -> Iterator[HubServer]:
    server = HubServer().start()
    state = server.state
    state.tokens.update({WRITE: Account("alice", orgs=("org",)), READ: Account("bob", role="read"),
                         OUTSIDER: Account("carol")})  # fmt: skip
    tiny = {**folder_files(built("qwen3_moe")), "README.md": BASE_CARD.encode(), "LICENSE": b"tiny terms\n"}
    state.add_repo("org/tiny", tiny)
    state.add_repo("org/gated", tiny, gated=True)
    config = json.loads(tiny["config.json"])
    state.add_repo("org/llama", {**tiny, "config.json": json.dumps({**config, "model_type": "llama"}).encode()})
    sharded = folder_files(built("qwen3_moe_multishard"))
    state.add_repo("org/sharded", {**sharded, "pytorch_model.bin": b"stale", "original/consolidated.pth": b"x"})
    repo = state.repos["org/sharded"]
    repo.refs["v1"] = repo.refs["main"]  # v1 is good; main then breaks, so only v1 can be pruned
    repo.refs["main"] = f"{int(repo.refs['v1'], 16) ^ 1:040x}"
    repo.commits[repo.refs["main"]] = {**sharded, "config.json": b"{}"}
    yield server
    server.stop()


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def _env(hub: HubServer, home: Path, token: str | None = WRITE, **extra: str) -> dict[str, str]:
    """A clean Hub environment: nothing inherited from the developer's HF_* settings or token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               NO_PROXY="127.0.0.1", no_proxy="127.0.0.1", PYTHONPATH=str(ROOT))  # fmt: skip
    return {**env, **({"HF_TOKEN": token} if token else {}), **extra}


def _moeslim(args: list[str], env: dict[str, str], cwd: Path) -> Run:
    done = subprocess.run([sys.executable, "-m", "moeslim", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    return Run(done.returncode, done.stdout, done.stderr)


def _assert_no_token(token: str, texts: list[str], folders: list[Path]) -> None:
    assert not [t for t in texts if token in t]
    for folder in folders:
        leaks = [p for p in folder.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
        assert not leaks, leaks


def _one_line_error(run: Run, message: str) -> None:
    assert run.code == 2, run
    assert run.err.startswith("moeslim: error: ") and run.err.count("\n") == 1 and message in run.err, run.err
    assert "Traceback" not in run.out + run.err


@pytest.mark.hub
def test_slim_from_the_hub_and_push(hub: HubServer, tmp_path: Path) -> None:
    home, start = tmp_path / "hf", len(hub.state.log)
    command = ["slim", "org/tiny", "--keep", "4", "--out", "tiny-keep4", "--push-to", "org/tiny-slim"]
    run = _moeslim(command, _env(hub, home), tmp_path)
    assert run.code == 0, run.err
    out = tmp_path / "tiny-keep4"
    assert run.out.splitlines()[-1] == f"pushed to {hub.url}/org/tiny-slim"
    pushed = hub.state.files("org/tiny-slim")
    assert pushed.pop(".gitattributes") and pushed == folder_files(out)  # byte for byte, card and image included
    downloads = hub.state.downloads("org/tiny", since=start)
    assert set(downloads) == SMALL  # small files whole, into the standard cache; the weights read in place by ranges
    snapshot = home / "hub" / "models--org--tiny" / "snapshots" / hub.state.repos["org/tiny"].refs["main"]
    assert (snapshot / "config.json").is_file() and not (snapshot / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "hf"] == ["tiny-keep4"]  # no work folder left

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "org/tiny" and meta["tags"][:4] == ["moe", "pruned", "expert-pruning", "moeslim"]
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "tiny-license", "LICENSE")
    assert (out / "LICENSE").read_bytes() == b"tiny terms\n"
    assert f"```bash\nmoeslim {' '.join(command)}\n```" in card
    assert "![" in card and "](expert_map.png)" in card
    assert (out / "expert_map.png").read_bytes().startswith(b"\x89PNG")
    _assert_no_token(WRITE, [run.out, run.err, *(d.decode("latin-1") for d in pushed.values())], [out, home])


@pytest.mark.hub
def test_revision_and_sharded_repo_then_offline_from_the_cache(hub: HubServer, tmp_path: Path) -> None:
    home, start = tmp_path / "hf", len(hub.state.log)
    args = ["slim", "org/sharded", "--revision", "v1", "--keep", "4", "--out", "a", "--cache-window", "full"]
    run = _moeslim(args, _env(hub, home), tmp_path)
    assert run.code == 0, run.err
    downloads = hub.state.downloads("org/sharded", since=start)
    shards = {f"model-0000{i}-of-00007.safetensors" for i in range(1, 8)}
    assert shards <= set(downloads) and "pytorch_model.bin" not in downloads
    assert not [d for d in downloads if d.startswith("original/")]

    offline = _env(hub, home, HF_HUB_OFFLINE="1")
    start = len(hub.state.log)
    run = _moeslim(["slim", "org/sharded", "--revision", "v1", "--keep", "4", "--out", "b"], offline, tmp_path)
    assert run.code == 0, run.err
    assert hub.state.log[start:] == []  # served from the cache alone
    a, b = folder_files(tmp_path / "a"), folder_files(tmp_path / "b")
    assert {k: v for k, v in a.items() if k != "README.md"} == {k: v for k, v in b.items() if k != "README.md"}


# Refusals: (token, arguments, extra environment, the error's message). Each case has a repo of its own,
# so that what the server saw can be told apart while the cases run side by side.
REFUSALS = {
    "unsupported family": (WRITE, ["slim", "org/llama", "--keep", "4"], {}, "unsupported model family 'llama'"),
    "infeasible keep": (WRITE, ["slim", "org/tiny-8", "--keep", "8"], {}, "--keep 8 must be between 1 and 7"),
    "no safetensors": (WRITE, ["slim", "org/bin-only", "--keep", "4"], {}, "org/bin-only has no model.safetensors or"),
    "shard missing": (WRITE, ["slim", "org/holes", "--keep", "4"], {},
                      "model.safetensors.index.json of org/holes names model-00003-of-00007.safetensors, which"),
    "no token when pushing": (None, ["slim", "org/tiny-anon", "--keep", "4", "--push-to", "org/x"], {},
                              "pushing to org/x needs a token with write access: log in with `hf auth login`"),
    "invalid token": (BOGUS, ["slim", "org/tiny", "--keep", "4"], {}, "the Hub rejected the token (401"),
    "read-only token": (READ, ["slim", "org/tiny-bob", "--keep", "4", "--push-to", "bob/x"], {},
                        "the token is read-only, so it cannot push to bob/x"),
    "no write permission": (OUTSIDER, ["slim", "org/tiny-carol", "--keep", "4", "--push-to", "org/x"], {},
                            "the token may not write to org/x (403): log in with `hf auth login` or set HF_TOKEN"),
    "repo not found": (WRITE, ["slim", "org/missing", "--keep", "4"], {}, "org/missing not found at http://127"),
    "gated repo": (WRITE, ["slim", "org/gated", "--keep", "4"], {}, "org/gated is gated: request access at http://"),
    "unknown revision": (WRITE, ["slim", "org/tiny", "--revision", "v9", "--keep", "4"], {},
                         "org/tiny has no revision 'v9'"),
    "offline, nothing cached": (WRITE, ["slim", "org/tiny", "--keep", "4"], {"HF_HUB_OFFLINE": "1"},
                                "HF_HUB_OFFLINE is set and org/tiny is not (completely) in the cache"),
}  # fmt: skip


@pytest.fixture(scope="module")
def refused(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every refusal run at once: each run is a fresh interpreter whose imports take most of its time."""
    tiny, sharded = hub.state.files("org/tiny"), hub.state.files("org/sharded", "v1")
    for repo_id in ("org/tiny-8", "org/tiny-anon", "org/tiny-bob", "org/tiny-carol"):
        hub.state.add_repo(repo_id, tiny)
    hub.state.add_repo("org/bin-only", {**{k: v for k, v in tiny.items() if k != "model.safetensors"},
                                        "pytorch_model.bin": b"pickles"})  # fmt: skip
    hub.state.add_repo("org/holes", {k: v for k, v in sharded.items() if k != "model-00003-of-00007.safetensors"})

    def attempt(case: str) -> tuple[Run, Path]:
        token, args, extra, _ = REFUSALS[case]
        cwd = tmp_path_factory.mktemp("refused")
        args = [*args, "--out", "o"] if args[0] == "slim" else args
        return _moeslim(args, _env(hub, cwd / "hf", token, **extra), cwd), cwd

    with ThreadPoolExecutor(len(REFUSALS)) as pool:
        return dict(zip(REFUSALS, pool.map(attempt, REFUSALS), strict=True))


@pytest.mark.hub
@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line(case: str, refused: dict, hub: HubServer) -> None:
    run, cwd = refused[case]
    _one_line_error(run, REFUSALS[case][3])
    if case == "no write permission":  # refused by the Hub only at upload: the finished output stays
        assert "; the pruned model is complete in o: push it later with `moeslim push o org/x`" in run.err
        assert (cwd / "o" / "README.md").is_file()
    else:
        assert not (cwd / "o").exists()
    for secret in (WRITE, READ, OUTSIDER, BOGUS):
        _assert_no_token(secret, [run.out, run.err], [cwd])


@pytest.mark.hub
@pytest.mark.parametrize("repo_id", ["org/llama", "org/tiny-8"])
def test_refused_from_the_config_before_weights_move(repo_id: str, refused: dict, hub: HubServer) -> None:
    assert set(hub.state.downloads(repo_id)) == SMALL  # config, tokenizer, card: no weights


@pytest.mark.hub
def test_push_access_is_checked_before_any_download(refused: dict, hub: HubServer) -> None:
    assert not [r for r in hub.state.log if r.user is None]  # without a token: not one request
    assert [r.path for r in hub.state.log if r.user == "bob"] == ["/api/whoami-v2"]
    assert not hub.state.downloads("org/tiny-anon") and not hub.state.downloads("org/tiny-bob")


@pytest.mark.hub
def test_push_to_a_new_branch(hub: HubServer, built: Callable[[str], Path], tmp_path: Path) -> None:
    folder = built("qwen3_moe")
    args = ["push", str(folder), "org/branches", "--revision", "dev", "--commit-message", "first", "--private"]
    run = _moeslim(args, _env(hub, tmp_path / "hf"), tmp_path)
    assert run.code == 0, run.err
    assert run.out.strip() == f"pushed to {hub.url}/org/branches/tree/dev"
    assert hub.state.repos["org/branches"].private
    assert {k: v for k, v in hub.state.files("org/branches", "dev").items() if k != ".gitattributes"} == folder_files(
        folder
    )
    assert list(hub.state.files("org/branches", "main")) == [".gitattributes"]


@pytest.mark.hub
@pytest.mark.parametrize("xet", ["installed", "disabled"])  # huggingface_hub's two upload paths
def test_push_as_a_pull_request(xet: str, hub: HubServer, built: Callable[[str], Path], tmp_path: Path) -> None:
    folder, repo_id = built("qwen3_moe"), f"org/prs-{xet}"
    hub.state.add_repo(repo_id, {"README.md": b"already here\n"})
    env = _env(hub, tmp_path / "hf", **({"HF_HUB_DISABLE_XET": "1"} if xet == "disabled" else {}))
    run = _moeslim(["push", str(folder), repo_id, "--create-pr"], env, tmp_path)
    assert run.code == 0, run.err
    assert run.out.strip() == f"pushed to {hub.url}/{repo_id}/discussions/1"
    assert hub.state.files(repo_id, "main")["README.md"] == b"already here\n"
    assert hub.state.files(repo_id, "refs/pr/1")["model.safetensors"] == (folder / "model.safetensors").read_bytes()


def test_push_dry_run_lists_files_and_sends_nothing(built: Callable[[str], Path], tmp_path: Path, capsys) -> None:
    folder = Path(built("qwen3_moe"))
    copy = tmp_path / "out"
    for rel, data in folder_files(folder).items():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(data)
    (copy / ".git").mkdir()
    (copy / ".git" / "config").write_text("[core]\n")
    code, out, err = run_cli(["push", str(copy), "org/x", "--dry-run"], capsys)
    assert code == 0, err
    listed = [line.split()[-1] for line in out.splitlines()[:-1]]
    assert listed == sorted(folder_files(folder))  # as upload_folder selects them: no .git
    assert out.splitlines()[-1].startswith(f"would upload {len(listed)} file(s)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["push", "{folder}", "org/x", "--create-pr", "--revision", "dev"], "a pull request always targets the"),
        (["push", "{folder}", "not a repo"], "'not a repo' is not a Hub repo id"),
        (["slim", "{folder}", "--keep", "4", "--revision", "v1"], "--revision selects a Hub revision, but"),
        (["slim", "./no/such", "--keep", "4"], "./no/such does not exist: pass a checkpoint folder or a Hub repo"),
    ],
)
def test_usage_errors_before_any_request(args: list[str], message: str, built, tmp_path: Path, capsys) -> None:
    args = [a.replace("{folder}", str(built("qwen3_moe"))) for a in args]
    code, out, err = run_cli([*args, *(["--out", str(tmp_path / "o")] if args[0] == "slim" else [])], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.hub
def test_slim_does_not_push_a_model_over_max_kl(hub: HubServer, tmp_path: Path) -> None:
    command = ["slim", "org/tiny", "--keep", "4", "--out", "strict", "--push-to", "org/tiny-strict", "--max-kl", "0"]
    run = _moeslim(command, _env(hub, tmp_path / "hf"), tmp_path)
    assert run.code == 1, run  # the pruned model differs from the original: its mean KL is above 0
    assert run.err.endswith("exceeds --max-kl 0; not pushed\n") and run.err.count("\n") == 1, run.err
    assert "org/tiny-strict" not in hub.state.repos and (tmp_path / "strict" / "validation.json").is_file()
