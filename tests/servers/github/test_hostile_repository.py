"""A hostile repository handed to the github server's local forge, owned by another user: no program it names
runs, whatever the operation, and no objects it borrows from another repository are read."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from common.git import host_git_env, named_settings
from servers.github.config import Settings
from servers.github.server import build_server
from tests.conftest import git

from .hostile import ATTACKS, ATTRIBUTES, BORROWINGS, SECRET, Attack, borrow, git_dir, plant, ran

ANOTHER_USER = "1000:1000"


async def call(client: Client, tool: str, **arguments: Any) -> tuple[bool, Any]:
    """Whether the call failed, and its structured result or its error text."""
    async with asyncio.timeout(60):
        result = await client.call_tool(tool, arguments)
    return (True, result.content[0].text) if result.is_error else (False, result.structured_content)


def changeset(base: str, files: dict[str, bytes], deleted: list[str] = ()) -> dict[str, Any]:
    return {"base_commit": base, "deleted": list(deleted), "files": [
        {"path": p, "mode": "100644", "content_base64": base64.b64encode(c).decode()} for p, c in files.items()]}


def hand_over(repo: Path) -> None:
    """Give the repository to another user, as someone else's repository on this machine would be."""
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", ANOTHER_USER, str(repo)], check=True)


def plumbing(repo: Path, *args: str) -> str:
    """Read the repository with plumbing that runs nothing, naming its git directory (so whoever owns it)."""
    return subprocess.run(["git", "--git-dir", str(git_dir(repo)), *args], check=True, capture_output=True,
                          text=True, env={"PATH": os.environ["PATH"], "GIT_CONFIG_NOSYSTEM": "1",
                                          "GIT_CONFIG_GLOBAL": "/dev/null"}).stdout


@pytest.mark.parametrize("bare", [False, True], ids=["work-tree", "bare"])
@pytest.mark.parametrize("attack", ATTACKS, ids=str)
async def test_no_forge_operation_runs_a_program_the_repository_names(
        make_repo: Callable[..., Path], tmp_path: Path, attack: Attack, bare: bool) -> None:
    repo = make_repo({"README.md": "# demo\n", ".gitattributes": ATTRIBUTES, "notes.txt": "old\n",
                      "gone.inc": "bye\n"}, bare=bare)
    base = git(repo, "rev-parse", "main")
    marker = plant(repo, attack, tmp_path / "lair")
    hand_over(repo)
    files = {"README.md": b"# changed\n", "notes.txt": b"new\n", "new.inc": b"included\n"}
    async with Client(build_server(Settings())) as client:
        results = {
            "get_repository": await call(client, "get_repository", repo=str(repo)),
            "create_branch": await call(client, "create_branch", repo=str(repo), branch="tb/x", from_sha=base),
            "commit_changes": await call(client, "commit_changes", repo=str(repo), branch="tb/x", message="Change",
                                         changes=changeset(base, files, deleted=["gone.inc"])),
            "open_pull_request": await call(client, "open_pull_request", repo=str(repo), head="tb/x", title="T"),
            "list_pull_requests": await call(client, "list_pull_requests", repo=str(repo)),
        }
        no_issue = await call(client, "get_issue", repo=str(repo), number=1)
    assert ran(marker) == [], f"host git ran the repository's program: {ran(marker)}"
    assert not [name for name, (failed, _) in results.items() if failed], results
    assert no_issue[0] and "no issues" in no_issue[1]
    commit = results["commit_changes"][1]["sha"]
    for path, content in files.items():  # as sent: no filter rewrote them on the way in
        assert plumbing(repo, "cat-file", "blob", f"{commit}:{path}").encode() == content
    assert "gone.inc" not in plumbing(repo, "ls-tree", "--name-only", commit)


@pytest.mark.parametrize("how", BORROWINGS)
async def test_a_repository_borrowing_objects_from_outside_it_is_refused(
        make_repo: Callable[..., Path], how: str) -> None:
    secret = make_repo({"id_rsa": SECRET}, name="secret")
    secret_commit = git(secret, "rev-parse", "main")
    repo = make_repo({"README.md": "# demo\n"}, bare=True)
    borrow(how, repo, secret)
    refs = plumbing(repo, "for-each-ref")
    async with Client(build_server(Settings())) as client:
        results = [await call(client, "get_repository", repo=str(repo)),
                   await call(client, "create_branch", repo=str(repo), branch="tb/leak", from_sha=secret_commit),
                   await call(client, "list_pull_requests", repo=str(repo))]
    assert all(failed for failed, _ in results), results
    for _, text in results:
        assert str(repo) in text and ("borrows objects" in text or "objects directory" in text), text
        assert "git repack -a -d" in text or "give a repository" in text, text
    assert plumbing(repo, "for-each-ref") == refs


# Commands that would run what the attacks plant, were it not disarmed: the forge runs none of them.
PORCELAIN = [("status",), ("add", "-A"), ("diff", "HEAD"), ("log", "-p", "-2"), ("commit", "-qam", "edit"),
             ("merge", "-q", "side"), ("checkout", "-f", "HEAD~1", "--", "."), ("fetch", "-q", "origin"),
             ("ls-remote", "https://example.invalid/r"), ("gc", "--auto")]


@pytest.mark.parametrize("attack", ATTACKS, ids=str)
async def test_host_git_runs_none_of_them_even_in_commands_the_forge_never_uses(
        make_repo: Callable[..., Path], tmp_path: Path, attack: Attack) -> None:
    repo = make_repo({"README.md": "# demo\n", ".gitattributes": ATTRIBUTES, "notes.txt": "old\n", "a.inc": "a\n"})
    git(repo, "checkout", "-qb", "side")
    (repo / "notes.txt").write_text("side\n")
    git(repo, "commit", "-qam", "side")
    git(repo, "checkout", "-q", "main")
    (repo / "notes.txt").write_text("main\n")
    git(repo, "commit", "-qam", "main")
    marker = plant(repo, attack, tmp_path / "lair")
    (repo / "notes.txt").write_text("edited\n")
    (repo / "a.inc").write_text("edited\n")
    env = host_git_env(await named_settings(repo / ".git", repo / ".git")) | {
        "GIT_DIR": str(repo / ".git"), "GIT_WORK_TREE": str(repo), "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    for args in PORCELAIN:
        subprocess.run(["git", *args], cwd=repo, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        assert ran(marker) == [], f"git {' '.join(args)} ran the repository's program: {ran(marker)}"
