"""The github server as MCP clients see it: in process, and over stdio started from mcp.json."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from servers.github.config import Secret, Settings
from servers.github.server import build_server
from tests.conftest import git
from tests.fakes.github_api import FakeGitHub

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "ghp_" + "T0k3n" * 7 + "x"


@pytest.fixture
async def fake() -> AsyncIterator[FakeGitHub]:
    api = FakeGitHub()
    api.tokens = {TOKEN: "octocat"}
    api.add_repo("octo/demo", {"README.md": "# demo\n"}, pushers={"octocat"})
    await api.start()
    yield api
    await api.stop()


async def call(client: Client, tool: str, **arguments: Any) -> tuple[bool, Any]:
    """Whether the call failed, and its structured result or its error text."""
    async with asyncio.timeout(30):
        result = await client.call_tool(tool, arguments)
    if result.is_error:
        return True, result.content[0].text
    return False, result.structured_content


def changeset(base: str, files: dict[str, bytes]) -> dict[str, Any]:
    return {"base_commit": base, "deleted": [], "files": [
        {"path": p, "mode": "100644", "content_base64": base64.b64encode(c).decode()} for p, c in files.items()]}


async def test_the_server_lists_the_contract_tools_with_read_only_hints() -> None:
    async with Client(build_server(Settings())) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {"get_repository", "create_branch", "commit_changes", "open_pull_request", "get_issue",
                          "list_pull_requests", "get_pull_request", "reply_to_review_comment", "comment_on_issue",
                          "edit_issue_comment", "add_review_comment", "get_permission", "delete_branch"}
    assert {n for n, t in tools.items() if t.annotations.read_only_hint} == {
        "get_repository", "get_issue", "list_pull_requests", "get_pull_request", "get_permission"}


async def test_a_github_repository_without_a_token_is_an_error_result_naming_the_variable(
        make_repo: Callable[..., Path]) -> None:
    async with Client(build_server(Settings())) as client:
        failed, text = await call(client, "get_repository", repo="octo/demo")
        assert failed and "GITHUB_TOKEN" in text
        failed, info = await call(client, "get_repository", repo=str(make_repo()))
        assert not failed and info["forge"] == "local"


async def test_bad_input_is_an_error_result_and_writes_nothing(fake: FakeGitHub,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = Settings(token=Secret(TOKEN), api_url=fake.base_url, write_interval_s=0)
    base = fake.repos["octo/demo"].refs["main"]
    fake.repos["octo/demo"].refs["tb/taken"] = fake.repos["octo/demo"].store.commit_files({"a": b"a"}, [base], "x")
    async with Client(build_server(settings)) as client:
        results = [
            await call(client, "get_repository", repo="octo/unknown"),
            await call(client, "create_branch", repo="octo/demo", branch="tb/taken", from_sha=base),
            await call(client, "create_branch", repo="octo/demo", branch="tb/bad..name", from_sha=base),
            await call(client, "create_branch", repo="octo/demo", branch="main", from_sha=base),
            await call(client, "open_pull_request", repo="octo/demo", head="tb/taken", base="nope", title="t"),
            await call(client, "get_repository", repo=f"https://user:{TOKEN}@github.com/octo/demo"),
        ]
    assert all(failed for failed, _ in results), results
    messages = [text for _, text in results]
    assert "not found" in messages[0] and "already exists at" in messages[1] and "not valid" in messages[2]
    assert "start with 'tb/'" in messages[3] and "base branch 'nope' does not exist" in messages[4]
    assert not [r for r in fake.requests if r.method != "GET"] and not fake.pulls["octo/demo"]
    assert all(TOKEN not in m for m in messages) and TOKEN not in caplog.text


async def test_a_change_is_published_to_github_through_the_tools(fake: FakeGitHub) -> None:
    settings = Settings(token=Secret(TOKEN), api_url=fake.base_url, write_interval_s=0)
    base = fake.repos["octo/demo"].refs["main"]
    async with Client(build_server(settings)) as client:
        assert not (await call(client, "create_branch", repo="octo/demo", branch="tb/x", from_sha=base))[0]
        failed, commit = await call(client, "commit_changes", repo="octo/demo", branch="tb/x", message="Add",
                                    changes=changeset(base, {"new.txt": b"new\n"}))
        assert not failed, commit
        failed, pr = await call(client, "open_pull_request", repo="octo/demo", head="tb/x",
                                title="Add new.txt", draft=True)
    assert not failed and pr["number"] == 1 and pr["draft"] is True, pr
    assert fake.repos["octo/demo"].refs["tb/x"] == commit["sha"]


async def test_the_server_from_mcp_json_publishes_a_local_change_over_stdio(
        make_repo: Callable[..., Path], fake: FakeGitHub) -> None:
    entry = json.loads((ROOT / "mcp.json").read_text())["mcpServers"]["github"]
    command = entry["command"] if Path(entry["command"]).is_absolute() else str(ROOT / entry["command"])
    env = entry.get("env", {}) | {"GITHUB_TOKEN": TOKEN, "GITHUB_API_URL": fake.base_url,
                                  "GITHUB_WRITE_INTERVAL_S": "0"}
    params = StdioServerParameters(command=command, args=entry["args"], env=env, cwd=ROOT)
    repo = make_repo(bare=True)
    base = git(repo, "rev-parse", "main")
    async with asyncio.timeout(60):
        async with Client(params) as client:
            _, info = await call(client, "get_repository", repo=repo.as_uri())
            _, branch = await call(client, "create_branch", repo=str(repo), branch="tb/stdio", from_sha=base)
            _, commit = await call(client, "commit_changes", repo=str(repo), branch="tb/stdio", message="Add",
                                   changes=changeset(base, {"hello.txt": b"hello\n"}))
            _, pr = await call(client, "open_pull_request", repo=str(repo), head="tb/stdio", title="Say hello")
            _, listed = await call(client, "list_pull_requests", repo=str(repo), head="tb/stdio")
            _, remote = await call(client, "get_repository", repo="octo/demo")
    assert info["default_branch"] == "main" and branch["created"] is True
    assert git(repo, "rev-parse", "tb/stdio") == commit["sha"]
    assert pr["url"].startswith("file://") and [p["number"] for p in listed["pull_requests"]] == [pr["number"]]
    assert remote["can_push"] is True


async def test_the_stdio_server_logs_never_carry_the_token(fake: FakeGitHub) -> None:
    fake.rate_limit_exhausted = True
    entry = json.loads((ROOT / "mcp.json").read_text())["mcpServers"]["github"]
    params = StdioServerParameters(command=str(ROOT / entry["command"]), args=entry["args"], cwd=ROOT,
                                   env={"GITHUB_TOKEN": TOKEN, "GITHUB_API_URL": fake.base_url})
    with tempfile.TemporaryFile("w+") as errlog:
        async with asyncio.timeout(60):
            async with Client(stdio_client(params, errlog=errlog)) as client:
                failed, text = await call(client, "get_repository", repo="octo/demo")
                await call(client, "get_repository", repo=f"https://x:{TOKEN}@github.com/octo/demo")
        errlog.seek(0)
        logs = errlog.read()
    assert failed and "rate limit" in text
    assert "rate limit" in logs and TOKEN not in logs


async def test_a_commit_on_the_branchs_tip_through_the_tool_holds_the_changes_against_the_base(
        make_repo: Callable[..., Path]) -> None:
    repo = make_repo({"README.md": "# demo\n", "old.txt": "bye\n"})
    base = git(repo, "rev-parse", "main")
    async with Client(build_server(Settings())) as client:
        _, first = await call(client, "commit_changes", repo=str(repo), branch="tb/tip", message="Add",
                              changes=changeset(base, {"new.txt": b"new\n", "other.txt": b"x\n"}))
        failed, second = await call(client, "commit_changes", repo=str(repo), branch="tb/tip", message="Drop",
                                    changes=changeset(base, {"other.txt": b"x\n"}) | {"parent": first["sha"]})
        assert not failed, second
        failed, stale = await call(client, "commit_changes", repo=str(repo), branch="tb/tip", message="Stale",
                                   changes=changeset(base, {"other.txt": b"y\n"}) | {"parent": first["sha"]})
    assert second["parent"] == first["sha"] and git(repo, "rev-parse", "tb/tip^") == first["sha"]
    assert git(repo, "ls-tree", "--name-only", "tb/tip").split() == ["README.md", "old.txt", "other.txt"]
    assert failed and "moved" in stale and git(repo, "rev-parse", "tb/tip") == second["sha"]
