"""A pushed branch runs the repository's GitHub Actions workflows with its secrets before anyone reviews it, so
commit_changes refuses to touch workflows and actions unless the operator allows it, on both forges."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters

from servers.github.config import Secret, Settings
from servers.github.server import build_server
from tests.conftest import git
from tests.fakes.github_api import FakeGitHub

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "ghp_" + "W0rkf10w" * 4 + "xyzw"
WORKFLOW = ("on: push\njobs:\n  leak:\n    runs-on: ubuntu-latest\n    steps:\n"
            "      - run: echo ${{ secrets.DEPLOY_KEY }}\n")
FILES = {"README.md": "# demo\n", ".github/workflows/ci.yml": "on: pull_request\n",
         ".github/actions/setup/action.yml": "runs:\n  using: composite\n"}
# What a changeset may do to a workflow: add one, rewrite one, delete one, change a composite action, or put a link
# where the .github folder was.
REFUSED = {
    "a new workflow": ({".github/workflows/leak.yml": WORKFLOW.encode()}, [], ".github/workflows/leak.yml"),
    "a changed workflow": ({".github/workflows/ci.yml": WORKFLOW.encode()}, [], ".github/workflows/ci.yml"),
    "a deleted workflow": ({}, [".github/workflows/ci.yml"], ".github/workflows/ci.yml"),
    "a changed composite action": ({".github/actions/setup/action.yml": b"runs:\n  using: node20\n"}, [],
                                   ".github/actions/setup/action.yml"),
    "a workflow in other letter case": ({".GitHub/Workflows/leak.yml": WORKFLOW.encode()}, [],
                                        ".GitHub/Workflows/leak.yml"),
}


def changeset(base: str, files: dict[str, bytes], deleted: list[str] = ()) -> dict[str, Any]:
    return {"base_commit": base, "deleted": list(deleted), "files": [
        {"path": p, "mode": "100644", "content_base64": base64.b64encode(c).decode()} for p, c in files.items()]}


async def call(client: Client, tool: str, **arguments: Any) -> tuple[bool, Any]:
    """Whether the call failed, and its structured result or its error text."""
    async with asyncio.timeout(60):
        result = await client.call_tool(tool, arguments)
    return (True, result.content[0].text) if result.is_error else (False, result.structured_content)


@pytest.fixture
async def fake() -> AsyncIterator[FakeGitHub]:
    api = FakeGitHub()
    api.tokens = {TOKEN: "octocat"}
    api.add_repo("octo/demo", FILES, pushers={"octocat"})
    await api.start()
    yield api
    await api.stop()


@pytest.mark.parametrize("change", REFUSED)
async def test_the_local_forge_refuses_a_change_to_a_workflow_by_default(
        make_repo: Callable[..., Path], change: str) -> None:
    files, deleted, path = REFUSED[change]
    repo = make_repo(FILES)
    base = git(repo, "rev-parse", "main")
    async with Client(build_server(Settings())) as client:
        await call(client, "create_branch", repo=str(repo), branch="tb/ci", from_sha=base)
        failed, text = await call(client, "commit_changes", repo=str(repo), branch="tb/ci", message="Tidy",
                                  changes=changeset(base, files | {"README.md": b"# tidy\n"}, deleted))
    assert failed, text
    assert repr(path) in text and "GITHUB_ALLOW_WORKFLOW_CHANGES=1" in text and "leave it out" in text
    assert git(repo, "rev-parse", "tb/ci") == base


async def test_the_local_forge_refuses_a_link_in_place_of_the_github_folder(make_repo: Callable[..., Path]) -> None:
    repo = make_repo({"README.md": "# demo\n", "ci/leak.yml": WORKFLOW})
    base = git(repo, "rev-parse", "main")
    link = {"base_commit": base, "deleted": [], "files": [
        {"path": ".github", "mode": "120000", "content_base64": base64.b64encode(b"ci").decode()}]}
    async with Client(build_server(Settings())) as client:
        await call(client, "create_branch", repo=str(repo), branch="tb/ci", from_sha=base)
        failed, text = await call(client, "commit_changes", repo=str(repo), branch="tb/ci", message="Link",
                                  changes=link)
    assert failed and "'.github'" in text and "GITHUB_ALLOW_WORKFLOW_CHANGES=1" in text
    assert git(repo, "rev-parse", "tb/ci") == base


async def test_other_files_under_github_are_committed_as_usual(make_repo: Callable[..., Path]) -> None:
    repo = make_repo(FILES)
    base = git(repo, "rev-parse", "main")
    async with Client(build_server(Settings())) as client:
        await call(client, "create_branch", repo=str(repo), branch="tb/docs", from_sha=base)
        failed, commit = await call(client, "commit_changes", repo=str(repo), branch="tb/docs", message="Docs",
                                    changes=changeset(base, {".github/ISSUE_TEMPLATE/bug.md": b"# Bug\n",
                                                             "docs/workflows/guide.md": b"# Guide\n"}))
    assert not failed, commit
    assert git(repo, "rev-parse", "tb/docs") == commit["sha"]


@pytest.mark.parametrize("change", REFUSED)
async def test_the_github_forge_refuses_a_change_to_a_workflow_before_sending_anything(
        fake: FakeGitHub, change: str) -> None:
    files, deleted, path = REFUSED[change]
    base = fake.repos["octo/demo"].refs["main"]
    settings = Settings(token=Secret(TOKEN), api_url=fake.base_url, write_interval_s=0)
    async with Client(build_server(settings)) as client:
        await call(client, "create_branch", repo="octo/demo", branch="tb/ci", from_sha=base)
        failed, text = await call(client, "commit_changes", repo="octo/demo", branch="tb/ci", message="Tidy",
                                  changes=changeset(base, files | {"README.md": b"# tidy\n"}, deleted))
    assert failed, text
    assert repr(path) in text and "GITHUB_ALLOW_WORKFLOW_CHANGES=1" in text
    assert fake.repos["octo/demo"].refs["tb/ci"] == base
    assert not [r for r in fake.requests if r.path.endswith(("/git/blobs", "/git/trees", "/git/commits"))]


async def test_the_github_forge_commits_a_workflow_when_the_operator_allows_it(fake: FakeGitHub) -> None:
    base = fake.repos["octo/demo"].refs["main"]
    settings = Settings(token=Secret(TOKEN), api_url=fake.base_url, write_interval_s=0, allow_workflow_changes=True)
    async with Client(build_server(settings)) as client:
        await call(client, "create_branch", repo="octo/demo", branch="tb/ci", from_sha=base)
        failed, commit = await call(client, "commit_changes", repo="octo/demo", branch="tb/ci", message="CI",
                                    changes=changeset(base, {".github/workflows/ci.yml": WORKFLOW.encode()},
                                                      [".github/actions/setup/action.yml"]))
    assert not failed, commit
    repo = fake.repos["octo/demo"]
    assert repo.refs["tb/ci"] == commit["sha"]
    tree = repo.store.flatten(repo.store.commits[commit["sha"]].tree)
    assert repo.store.blobs[tree[".github/workflows/ci.yml"][1]] == WORKFLOW.encode()
    assert ".github/actions/setup/action.yml" not in tree


async def test_the_local_forge_from_mcp_json_commits_a_workflow_when_the_operator_allows_it(
        make_repo: Callable[..., Path]) -> None:
    entry = json.loads((ROOT / "mcp.json").read_text())["mcpServers"]["github"]
    command = entry["command"] if Path(entry["command"]).is_absolute() else str(ROOT / entry["command"])
    repo = make_repo(FILES)
    base = git(repo, "rev-parse", "main")
    for allow, expect_refused in (("${GITHUB_ALLOW_WORKFLOW_CHANGES}", True), ("1", False)):
        params = StdioServerParameters(command=command, args=entry["args"], cwd=ROOT,
                                       env={"GITHUB_ALLOW_WORKFLOW_CHANGES": allow})
        branch = f"tb/ci-{int(expect_refused)}"
        async with asyncio.timeout(60):
            async with Client(params) as client:
                await call(client, "create_branch", repo=str(repo), branch=branch, from_sha=base)
                failed, result = await call(client, "commit_changes", repo=str(repo), branch=branch, message="CI",
                                            changes=changeset(base, {".github/workflows/ci.yml": WORKFLOW.encode()},
                                                              [".github/actions/setup/action.yml"]))
        assert failed is expect_refused, result
    assert git(repo, "rev-parse", "tb/ci-1") == base
    assert git(repo, "show", "tb/ci-0:.github/workflows/ci.yml") + "\n" == WORKFLOW
    assert "action.yml" not in git(repo, "ls-tree", "-r", "--name-only", "tb/ci-0")
