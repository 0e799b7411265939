"""The local forge against real git: bare and non-bare repositories, written with plumbing only."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from servers.github.forge import Changeset, ForgeError
from servers.github.local import LocalForge, local_path
from tests.conftest import GIT_ENV, git


def changes(base: str, files: dict[str, bytes] | None = None, deleted: list[str] = (),
            modes: dict[str, str] | None = None) -> Changeset:
    return Changeset(base_commit=base, deleted=list(deleted), files=[
        {"path": p, "mode": (modes or {}).get(p, "100644"), "content_base64": base64.b64encode(c).decode()}
        for p, c in (files or {}).items()])


def blob(repo: Path, rev: str, path: str) -> bytes:
    return subprocess.run(["git", "cat-file", "blob", f"{rev}:{path}"], cwd=repo, env=os.environ | GIT_ENV, check=True,
                          capture_output=True).stdout


@pytest.fixture(params=[False, True], ids=["non-bare", "bare"])
def repo(request: pytest.FixtureRequest, make_repo: Callable[..., Path]) -> Path:
    return make_repo({"README.md": "# demo\n", "src/app.py": "print('hi')\n", "old.txt": "bye\n"},
                     bare=request.param)


def test_absolute_paths_and_file_urls_name_local_repositories() -> None:
    assert local_path("/srv/repo.git") == Path("/srv/repo.git")
    assert local_path("file:///srv/my%20repo") == Path("/srv/my repo")
    assert local_path("octo/demo") is None
    with pytest.raises(ForgeError, match="another host"):
        local_path("file://example.com/srv/repo")


async def test_a_commit_lands_on_its_branch_with_deletions_modes_and_binary_content(repo: Path) -> None:
    forge, base = LocalForge(repo, "tb/"), git(repo, "rev-parse", "main")
    assert (await forge.create_branch("tb/change", base)).created is True
    binary = bytes(range(256)) + b"\r\n\x00end"
    result = await forge.commit_changes("tb/change", "Change things\n\nDetails.", changes(
        base, {"src/app.py": b"print('bye')\n", "run.sh": b"#!/bin/sh\n", "data.bin": binary, "link": b"README.md"},
        deleted=["old.txt"], modes={"run.sh": "100755", "link": "120000"}))
    assert git(repo, "rev-parse", "tb/change") == result.sha and result.parent == base
    assert git(repo, "rev-parse", "main") == base
    listing = dict(line.split("\t")[::-1] for line in git(repo, "ls-tree", "-r", "tb/change").splitlines())
    assert set(listing) == {"README.md", "src/app.py", "run.sh", "data.bin", "link"}
    assert listing["run.sh"].startswith("100755") and listing["link"].startswith("120000")
    assert blob(repo, "tb/change", "data.bin") == binary
    assert git(repo, "log", "-1", "--format=%B", "tb/change") == "Change things\n\nDetails."


async def test_a_dirty_working_tree_its_index_and_its_branch_survive_a_commit(
        make_repo: Callable[..., Path]) -> None:
    repo = make_repo({"README.md": "# demo\n", "a.txt": "a\n"})
    base = git(repo, "rev-parse", "HEAD")
    (repo / "README.md").write_text("edited, not staged\n")
    (repo / "staged.txt").write_text("staged\n")
    git(repo, "add", "staged.txt")
    (repo / "untracked.txt").write_text("untracked\n")
    before = (git(repo, "status", "--porcelain"), git(repo, "diff", "--cached"), git(repo, "diff"),
              (repo / ".git" / "index").read_bytes())
    forge = LocalForge(repo, "tb/")
    await forge.create_branch("tb/x", base)
    await forge.commit_changes("tb/x", "msg", changes(base, {"README.md": b"new\n"}, deleted=["a.txt"]))
    after = (git(repo, "status", "--porcelain"), git(repo, "diff", "--cached"), git(repo, "diff"),
             (repo / ".git" / "index").read_bytes())
    assert after == before
    assert git(repo, "symbolic-ref", "HEAD") == "refs/heads/main" and git(repo, "rev-parse", "HEAD") == base
    assert (repo / "README.md").read_text() == "edited, not staged\n" and (repo / "a.txt").exists()


async def test_an_empty_changeset_is_a_clear_error_and_makes_no_commit(repo: Path) -> None:
    forge, base = LocalForge(repo, "tb/"), git(repo, "rev-parse", "main")
    await forge.create_branch("tb/empty", base)
    with pytest.raises(ForgeError, match="empty"):
        await forge.commit_changes("tb/empty", "msg", changes(base))
    with pytest.raises(ForgeError, match="nothing to commit"):
        await forge.commit_changes("tb/empty", "msg", changes(base, {"README.md": b"# demo\n"}))
    assert git(repo, "rev-parse", "tb/empty") == base


async def test_commits_to_two_branches_at_once_both_land(repo: Path) -> None:
    forge, base = LocalForge(repo, "tb/"), git(repo, "rev-parse", "main")
    await asyncio.gather(forge.create_branch("tb/one", base), forge.create_branch("tb/two", base))
    async with asyncio.timeout(30):
        one, two = await asyncio.gather(
            forge.commit_changes("tb/one", "one", changes(base, {"one.txt": b"1"})),
            forge.commit_changes("tb/two", "two", changes(base, {"two.txt": b"2"})))
    assert blob(repo, "tb/one", "one.txt") == b"1" and blob(repo, "tb/two", "two.txt") == b"2"
    assert (git(repo, "rev-parse", "tb/one"), git(repo, "rev-parse", "tb/two")) == (one.sha, two.sha)


async def test_a_branch_that_moved_since_its_base_is_refused(repo: Path) -> None:
    forge, base = LocalForge(repo, "tb/"), git(repo, "rev-parse", "main")
    await forge.create_branch("tb/moved", base)
    first = await forge.commit_changes("tb/moved", "one", changes(base, {"one.txt": b"1"}))
    with pytest.raises(ForgeError, match="moved"):
        await forge.commit_changes("tb/moved", "two", changes(base, {"two.txt": b"2"}))
    assert git(repo, "rev-parse", "tb/moved") == first.sha


async def test_a_branch_that_is_a_symbolic_ref_to_the_default_one_never_moves_it(repo: Path) -> None:
    forge, base = LocalForge(repo, "tb/"), git(repo, "rev-parse", "main")
    git(repo, "symbolic-ref", "refs/heads/tb/alias", "refs/heads/main")
    made = await forge.commit_changes("tb/alias", "msg", changes(base, {"a.txt": b"a"}))
    assert git(repo, "rev-parse", "main") == base and git(repo, "rev-parse", "tb/alias") == made.sha


async def test_a_commit_to_a_missing_branch_makes_it_and_a_refused_one_leaves_none(repo: Path) -> None:
    forge, base = LocalForge(repo, "tb/"), git(repo, "rev-parse", "main")
    made = await forge.commit_changes("tb/new", "msg", changes(base, {"a.txt": b"a"}))
    assert git(repo, "rev-parse", "tb/new") == made.sha and git(repo, "rev-parse", "tb/new^") == base
    with pytest.raises(ForgeError, match="workflow"):
        await forge.commit_changes("tb/ci", "msg", changes(base, {".github/workflows/x.yml": b"on: push"}))
    assert git(repo, "branch", "--list", "tb/ci") == ""


async def test_create_branch_succeeds_again_at_the_same_sha_and_refuses_another(repo: Path) -> None:
    forge, base = LocalForge(repo, "tb/"), git(repo, "rev-parse", "main")
    await forge.create_branch("tb/x", base)
    assert (await forge.create_branch("tb/x", base)).created is False
    moved = await forge.commit_changes("tb/x", "msg", changes(base, {"a": b"a"}))
    with pytest.raises(ForgeError, match=f"already exists at {moved.sha}"):
        await forge.create_branch("tb/x", base)
    with pytest.raises(ForgeError, match="is not in"):
        await forge.create_branch("tb/y", "f" * 40)
    assert "tb/y" not in git(repo, "branch", "--list")


@pytest.mark.parametrize("branch", ["main", "feature/x", "tb/", "tb/a..b", "tb/x.lock", "tb/has space", "-tb/x"])
async def test_the_default_branch_names_outside_the_prefix_and_malformed_names_are_refused(
        repo: Path, branch: str) -> None:
    forge, base = LocalForge(repo, "tb/"), git(repo, "rev-parse", "main")
    refs = git(repo, "for-each-ref")
    with pytest.raises(ForgeError):
        await forge.create_branch(branch, base)
    assert git(repo, "for-each-ref") == refs


async def test_a_branch_checked_out_in_the_working_tree_is_never_written(make_repo: Callable[..., Path]) -> None:
    repo = make_repo()
    git(repo, "checkout", "-q", "-b", "tb/current")
    with pytest.raises(ForgeError, match="checked-out"):
        await LocalForge(repo, "tb/").commit_changes("tb/current", "m", changes(git(repo, "rev-parse", "HEAD"),
                                                                                {"a": b"a"}))


async def test_pull_requests_are_records_listed_by_head_and_never_duplicated(repo: Path) -> None:
    forge, base = LocalForge(repo, "tb/"), git(repo, "rev-parse", "main")
    await forge.create_branch("tb/pr", base)
    with pytest.raises(ForgeError, match="no commits"):
        await forge.open_pull_request("tb/pr", None, "Title", "Body", False)
    await forge.commit_changes("tb/pr", "msg", changes(base, {"a": b"a"}))
    with pytest.raises(ForgeError, match="base branch 'nope' does not exist"):
        await forge.open_pull_request("tb/pr", "nope", "Title", "Body", False)
    pr = await forge.open_pull_request("tb/pr", None, "Title", "Body", True)
    assert (pr.number, pr.head, pr.base, pr.draft, pr.existing) == (1, "tb/pr", "main", True, False)
    record = json.loads(Path(urlsplit(pr.url).path).read_text())
    assert record["title"] == "Title" and record["created_at"]
    again = await forge.open_pull_request("tb/pr", None, "Other", "", False)
    assert (again.number, again.existing) == (1, True)
    assert [p.number for p in await forge.list_pull_requests("tb/pr")] == [1]
    assert await forge.list_pull_requests("tb/other") == []
    if (repo / ".git").exists():
        assert git(repo, "status", "--porcelain") == ""


async def test_a_path_that_is_not_a_repository_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ForgeError, match="not a git repository"):
        await LocalForge(tmp_path, "tb/").get_repository()
