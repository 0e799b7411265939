"""Secrets the service holds never leave it: not in what it publishes (pull request, commit, committed files), not in
what it stores (the run store, and its files are private), not in the stream, not in the servers' logs, whatever
encoding the model wraps them in."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sqlite3
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

import anthropic
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from orchestrator.config import Settings
from orchestrator.model import AnthropicModel
from orchestrator.run import Services
from orchestrator.store import SQLiteRunStore
from tests.conftest import git, unique_marker
from tests.fakes.messages_api import messages_api, text, tool_use, turn

from .conftest import API_KEY, FAST, GITHUB_TOKEN, ROOT, of_type, post_code, serve
from .test_failures import _processes
from .test_nothing_lost import Following, running, wait_for_process
from .test_run import BUGGY
from .test_team import planner, record, reviewer

pytestmark = pytest.mark.asyncio(loop_scope="session")

TB_TOKEN = "tb-api:" + "Wq7" * 14  # the service's own bearer token (a colon, so URL-encoding changes it)
SECRETS = (API_KEY, GITHUB_TOKEN, TB_TOKEN)
FIX = tool_use("sandbox_edit_file", {"path": "calc.py", "old_text": "a - b", "new_text": "a + b"})


def b64(raw: bytes | str) -> str:
    return base64.b64encode(raw.encode() if isinstance(raw, str) else raw).decode()


def forms(secret: str) -> list[str]:
    """Ways a secret shows in text: as is, base64 at each alignment inside a longer blob, base64url, hex,
    URL-encoded."""
    raw = secret.encode()
    return [secret, b64(raw), b64(b"x" + raw + b"y")[4:-4], b64(b"xy" + raw)[4:-4],
            base64.urlsafe_b64encode(raw).decode(), raw.hex(), raw.hex().upper(), quote(secret, safe="")]


def leaked(text: str) -> list[str]:
    """Each form of each held secret that `text` contains, or a distinctive part of one."""
    return [f for s in SECRETS for f in forms(s) if f[:24] in text]


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> None:
    """The secrets a deployed service holds in its environment."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
    monkeypatch.setenv("GITHUB_TOKEN", GITHUB_TOKEN)  # the value mcp.json hands the github server
    monkeypatch.setenv("TB_API_TOKEN", TB_TOKEN)


@asynccontextmanager
async def service(pool, script: list, data_dir: Path) -> AsyncIterator[str]:
    """The service with its run store under `data_dir`, as `python -m orchestrator` keeps it."""
    store = SQLiteRunStore(data_dir / "runs.sqlite3")
    await store.open()
    async with messages_api(script) as api:
        settings = Settings(model="claude-sonnet-test", limits=FAST)
        client = anthropic.AsyncAnthropic(base_url=api.url, api_key=API_KEY, max_retries=0)
        model = AnthropicModel(client, settings.model, settings.limits.max_output_tokens, 0, 0)
        async with serve(Services(settings, pool, model), store) as url:
            yield url


def stored(data_dir: Path) -> str:
    """Everything the run store holds, read from its file as anyone who can open it would."""
    db = sqlite3.connect(f"file:{data_dir / 'runs.sqlite3'}?mode=ro", uri=True)
    try:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows = [row for table in tables for row in db.execute(f"SELECT * FROM {table}")]
    finally:
        db.close()
    return json.dumps(rows)


def branches(repo: Path) -> list[str]:
    return git(repo, "branch", "--format=%(refname:short)").split()


def pulls(repo: Path) -> list[Path]:
    return sorted((repo / ".git" / "tiny-backspace" / "pulls").glob("*.json"))


async def test_a_secret_in_the_summary_and_prompt_is_redacted_in_the_pull_request_and_the_private_store(
        pool, make_repo, tmp_path, held):
    repo, data = make_repo(BUGGY), tmp_path / "data"
    summary = f"Fixed add(). Debug: {API_KEY} {GITHUB_TOKEN} {b64(TB_TOKEN)}"
    coder = [turn(FIX), turn(text(summary))]
    async with service(pool, planner() + coder + reviewer("approve"), data) as url:
        _, events, raw = await post_code(url, {"repoUrl": str(repo), "prompt": f"Use {TB_TOKEN} to fix add()"})
        modes = {p.name: p.stat().st_mode & 0o777 for p in data.iterdir()}
        dir_mode = data.stat().st_mode & 0o777
        kept = stored(data)
    pr = of_type(events, "pull_request")[0]
    body, message = record(pr)["body"], git(repo, "log", "-1", "--format=%B", pr["head"])
    assert "Fixed add(). Debug: [redacted] [redacted] [redacted]" in body
    assert leaked(body) == [] and leaked(message) == [] and "[redacted]" in message
    assert leaked(raw) == [] and leaked(kept) == [] and "Fixed add()" in kept
    assert dir_mode == 0o700
    assert modes == {"runs.sqlite3": 0o600, "runs.sqlite3-wal": 0o600, "runs.sqlite3-shm": 0o600}


async def test_secrets_the_model_writes_into_its_commit_message_and_pull_request_are_redacted(
        pool, make_repo, tmp_path, held):
    repo, data = make_repo(BUGGY), tmp_path / "data"
    script = [
        turn(FIX),
        turn(tool_use("github_create_branch", {"branch": "tb/fix-add"})),
        turn(tool_use("github_commit_changes", {"branch": "tb/fix-add",
                                                "message": f"Fix add\n\nSigned: {API_KEY} {TB_TOKEN.encode().hex()}"})),
        turn(tool_use("github_open_pull_request", {
            "head": "tb/fix-add", "title": f"Fix add() {quote(TB_TOKEN)}",
            "body": f"token {GITHUB_TOKEN}, key {b64(b'k=' + API_KEY.encode())}"})),
        turn(text("Opened the pull request.")),
    ]
    async with service(pool, script, data) as url:
        _, events, raw = await post_code(url, {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"})
        kept = stored(data)
    assert events[-1]["status"] == "success"
    message = git(repo, "log", "-1", "--format=%B", "tb/fix-add")
    pr = record(of_type(events, "pull_request")[0])
    assert message == "Fix add\n\nSigned: [redacted] [redacted]"
    assert pr["title"] == "Fix add() [redacted]" and pr["body"].startswith("token [redacted], key ")
    assert leaked(pr["body"]) == [] and leaked(raw) == [] and leaked(kept) == []


@pytest.mark.parametrize("leak", [
    API_KEY,
    b64(b"PK\x03\x04" + GITHUB_TOKEN.encode() + b"\x00\x01"),  # inside a longer base64 blob, off alignment
    TB_TOKEN.encode().hex().upper(),
], ids=["raw-api-key", "base64-github-token", "hex-api-token"])
async def test_a_changeset_holding_a_secret_is_refused_and_nothing_is_published(
        pool, make_repo, tmp_path, held, leak):
    repo, data = make_repo(BUGGY), tmp_path / "data"
    script = [turn(FIX, tool_use("sandbox_write_file", {"path": "settings.py", "content": f"BLOB = '{leak}'\n"})),
              turn(text("Fixed add() and added settings."))]
    async with service(pool, script, data) as url:
        _, events, raw = await post_code(url, {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"})
        kept = stored(data)
    errors = of_type(events, "error")
    assert len(errors) == 1 and "settings.py" in errors[0]["message"] and "calc.py" not in errors[0]["message"]
    assert of_type(events, "pull_request") == [] and events[-1]["status"] == "error"
    assert branches(repo) == ["main"] and pulls(repo) == []
    assert leak[:24] not in raw and leak[:24] not in kept and leaked(raw) == []


@pytest.mark.parametrize("leak", [API_KEY, base64.b64encode(GITHUB_TOKEN.encode()).decode()])
async def test_changes_holding_a_secret_are_never_checkpointed_kept_or_published(pool, make_repo, tmp_path, held,
                                                                                  leak):
    marker = unique_marker()
    repo, data = make_repo(BUGGY), tmp_path / "data"
    script = [turn(FIX, tool_use("sandbox_write_file", {"path": "settings.py", "content": f"BLOB = '{leak}'\n"})),
              turn(tool_use("sandbox_exec", {"command": f"sleep {marker}"})), turn(text("Done."))]
    async with service(pool, script, data) as url:
        follow = Following(url, {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"})
        await follow.until(running(marker))
        await wait_for_process(marker)
        # Mid-run, as a service that died now would leave it: no checkpoint for a restart to keep.
        mid_run = stored(data)
        for pid in _processes(marker):
            os.kill(int(pid), signal.SIGKILL)
        events = await follow.end()
        at_end = stored(data)
    assert "\"changeset\"" not in mid_run and leaked(mid_run) == []
    assert of_type(events, "error")[-1]["reason"] == "secret" and not of_type(events, "kept")
    assert of_type(events, "pull_request") == [] and branches(repo) == ["main"] and pulls(repo) == []
    assert leaked(at_end) == [] and '"changeset"' not in at_end


async def test_a_model_publishing_a_secret_itself_is_refused_before_any_branch_exists(
        pool, make_repo, tmp_path, held):
    repo, data = make_repo(BUGGY), tmp_path / "data"
    script = [
        turn(FIX, tool_use("sandbox_write_file", {"path": "leak.txt", "content": b64(API_KEY) + "\n"})),
        turn(tool_use("github_create_branch", {"branch": "tb/fix-add"})),
        turn(tool_use("github_commit_changes", {"branch": "tb/fix-add", "message": "Fix add"})),
        turn(text("Could not publish.")),
    ]
    async with service(pool, script, data) as url:
        _, events, raw = await post_code(url, {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"})
    results = {r["name"]: r for r in of_type(events, "tool_result")}
    for name in ("github_create_branch", "github_commit_changes"):
        assert results[name]["is_error"] and "leak.txt" in results[name]["content"]
    assert "leak.txt" in of_type(events, "error")[0]["message"] and events[-1]["status"] == "error"
    assert branches(repo) == ["main"] and pulls(repo) == [] and leaked(raw) == []


async def test_base64_and_hex_of_a_secret_in_model_text_are_masked_in_the_stream(pool, make_repo, tmp_path, held):
    said = (f"a {b64(API_KEY)} b {b64(b'--' + GITHUB_TOKEN.encode() + b'--')} c {TB_TOKEN.encode().hex()} "
            f"d {base64.urlsafe_b64encode(b'?' + API_KEY.encode()).decode()} e")
    async with service(pool, [turn(text(said))], tmp_path / "data") as url:
        _, events, raw = await post_code(url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Talk", "mode": "single"})
    streamed = "".join(e["text"] for e in of_type(events, "text"))
    assert leaked(streamed) == [] and leaked(raw) == []
    assert streamed.startswith("a [redacted] b ") and " c [redacted] d " in streamed and streamed.endswith(" e")


async def server_log(module: str, env: dict[str, str], tool: str, arguments: dict) -> tuple[str, str]:
    """Start an MCP server as a subprocess, make one call that fails, and return (its error text, its stderr)."""
    params = StdioServerParameters(command=sys.executable, args=["-m", module], cwd=ROOT,
                                   env={"PATH": os.environ["PATH"], **env})
    with tempfile.TemporaryFile("w+") as errlog:
        async with asyncio.timeout(60):
            async with Client(stdio_client(params, errlog=errlog)) as client:
                result = await client.call_tool(tool, arguments)
        errlog.seek(0)
        return result.content[0].text, errlog.read()


async def test_the_github_servers_log_masks_its_token_even_base64_encoded():
    token = "ghp_" + "L0g" * 12
    encoded = b64(b"\x01" + token.encode())
    answer, log = await server_log("servers.github", {"GITHUB_TOKEN": token}, "get_repository",
                                   {"repo": f"/nonexistent/{encoded}"})
    assert "is not a git repository" in answer and "Tool 'get_repository' failed" in log
    assert encoded[4:28] not in log and encoded[4:28] not in answer and "[redacted]" in log


async def test_the_sandbox_servers_log_masks_the_secrets_in_its_environment(tmp_path):
    secret = "modal-secret-" + "M4d" * 10
    _, log = await server_log("servers.sandbox", {"SANDBOX_BACKEND": "local", "SANDBOX_ROOT": str(tmp_path),
                                                   "MODAL_TOKEN_SECRET": secret},
                              "read_file", {"sandbox_id": f"sbx-{secret}", "path": "x"})
    assert "Tool 'read_file' failed" in log and secret not in log and "[redacted]" in log


async def test_the_github_server_refuses_to_publish_its_own_token(make_repo):
    token = "ghp_" + "S3lf" * 9
    repo = make_repo(BUGGY)
    base = git(repo, "rev-parse", "main")
    params = StdioServerParameters(command=sys.executable, args=["-m", "servers.github"], cwd=ROOT,
                                   env={"PATH": os.environ["PATH"], "GITHUB_TOKEN": token})

    def changes(files: dict[str, str]) -> dict:
        return {"base_commit": base, "deleted": [], "files": [
            {"path": p, "mode": "100644", "content_base64": b64(c)} for p, c in files.items()]}

    async with asyncio.timeout(60):
        async with Client(params) as client:
            await client.call_tool("create_branch", {"repo": str(repo), "branch": "tb/x", "from_sha": base})
            leaky = await client.call_tool("commit_changes", {
                "repo": str(repo), "branch": "tb/x", "message": "CI",
                "changes": changes({"ci.env": f"T={token.encode().hex()}"})})
            clean = await client.call_tool("commit_changes", {"repo": str(repo), "branch": "tb/x", "message": "CI",
                                                              "changes": changes({"ci.env": "T=${{ secrets.T }}"})})
            opened = await client.call_tool("open_pull_request", {"repo": str(repo), "head": "tb/x", "title": "CI",
                                                                  "body": f"uses {b64(token)}"})
    refusal = leaky.content[0].text
    assert leaky.is_error and "ci.env" in refusal and "GITHUB_TOKEN" in refusal and token not in refusal
    assert not clean.is_error and git(repo, "rev-parse", "tb/x") == clean.structured_content["sha"]
    assert opened.is_error and "GITHUB_TOKEN" in opened.content[0].text and pulls(repo) == []
