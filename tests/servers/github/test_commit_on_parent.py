"""Every commit holds the base commit's tree with the sandbox's changes, on top of the branch's tip: on both forges,
the local one with real git and the GitHub one through the real PyGithub against the fake REST API."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from servers.github.config import Secret, Settings
from servers.github.clients import Clients
from servers.github.forge import Changeset, ForgeError
from servers.github.local import LocalForge
from servers.github.remote import GitHubForge
from tests.conftest import git
from tests.fakes.github_api import FakeGitHub

TOKEN = "ghp_" + "P4r3nt" * 6
FILES = {"README.md": "# demo\n", "src/app.py": "print('hi')\n", "old.txt": "bye\n"}
BASE_TREE = {path: text.encode() for path, text in FILES.items()}


@dataclass
class Subject:
    """A forge, the base commit of its repository, and what its branches and commits hold."""

    forge: LocalForge | GitHubForge
    base: str
    tree: Callable[[str], dict[str, bytes]]  # branch -> path -> content
    parents: Callable[[str], list[str]]  # commit -> its parents
    tip: Callable[[str], str | None]  # branch -> the commit it is at


def local_subject(repo: Path) -> Subject:
    def tree(branch: str) -> dict[str, bytes]:
        paths = git(repo, "ls-tree", "-r", "--name-only", branch).splitlines()
        return {p: subprocess.run(["git", "cat-file", "blob", f"{branch}:{p}"], cwd=repo, check=True,
                                  capture_output=True).stdout for p in paths}

    def tip(branch: str) -> str | None:
        return git(repo, "for-each-ref", "--format=%(objectname)", f"refs/heads/{branch}") or None

    return Subject(LocalForge(repo, "tb/"), git(repo, "rev-parse", "main"), tree,
                   lambda sha: git(repo, "rev-list", "--parents", "-n1", sha).split()[1:], tip)


def github_subject(api: FakeGitHub) -> Subject:
    repo = api.repos["octo/demo"]
    store = repo.store

    def tree(branch: str) -> dict[str, bytes]:
        return {p: store.blobs[sha] for p, (_, sha) in store.flatten(store.commits[repo.refs[branch]].tree).items()}

    forge = GitHubForge("octo/demo", Clients(Settings(token=Secret(TOKEN), api_url=api.base_url,
                                                      write_interval_s=0)))
    return Subject(forge, repo.refs["main"], tree, lambda sha: list(store.commits[sha].parents), repo.refs.get)


@pytest.fixture(params=["local", "github"])
async def subject(request: pytest.FixtureRequest, make_repo: Callable[..., Path]) -> AsyncIterator[Subject]:
    if request.param == "local":
        yield local_subject(make_repo(FILES))
        return
    api = FakeGitHub()
    api.tokens = {TOKEN: "octocat"}
    api.add_repo("octo/demo", FILES, pushers={"octocat"})
    await api.start()
    try:
        yield github_subject(api)
    finally:
        await api.stop()


def changes(base: str, files: dict[str, bytes] | None = None, deleted: list[str] = (),
            parent: str | None = None) -> Changeset:
    return Changeset(base_commit=base, parent=parent, deleted=list(deleted), files=[
        {"path": p, "mode": "100644", "content_base64": base64.b64encode(c).decode()}
        for p, c in (files or {}).items()])


async def test_a_file_committed_then_deleted_in_the_sandbox_is_gone_from_the_branch(subject: Subject) -> None:
    forge, base = subject.forge, subject.base
    first = await forge.commit_changes("tb/x", "Add notes", changes(base, {"notes.txt": b"draft\n",
                                                                          "src/app.py": b"print('bye')\n"}))
    # The sandbox deleted notes.txt again: against the base it is neither written nor deleted.
    second = await forge.commit_changes("tb/x", "Drop notes", changes(base, {"src/app.py": b"print('bye')\n"},
                                                                       parent=first.sha))
    assert subject.tree("tb/x") == BASE_TREE | {"src/app.py": b"print('bye')\n"}
    assert (second.parent, subject.parents(second.sha), subject.parents(first.sha)) == (first.sha, [first.sha],
                                                                                         [base])
    assert subject.tip("tb/x") == second.sha


async def test_a_file_renamed_and_changed_after_a_commit_is_only_at_its_new_path(subject: Subject) -> None:
    forge, base = subject.forge, subject.base
    first = await forge.commit_changes("tb/x", "Change app", changes(base, {"src/app.py": b"print('bye')\n"}))
    await forge.commit_changes("tb/x", "Rename app", changes(base, {"src/main.py": b"print('bye!')\n"},
                                                            deleted=["src/app.py"], parent=first.sha))
    assert subject.tree("tb/x") == {"README.md": b"# demo\n", "old.txt": b"bye\n", "src/main.py": b"print('bye!')\n"}


async def test_a_commit_on_a_parent_that_is_not_the_branchs_tip_is_refused(subject: Subject) -> None:
    forge, base = subject.forge, subject.base
    first = await forge.commit_changes("tb/x", "One", changes(base, {"a.txt": b"1"}))
    second = await forge.commit_changes("tb/x", "Two", changes(base, {"a.txt": b"2"}, parent=first.sha))
    for stale in (first.sha, base):
        with pytest.raises(ForgeError, match=f"moved: it is at {second.sha}"):
            await forge.commit_changes("tb/x", "Three", changes(base, {"a.txt": b"3"}, parent=stale))
    with pytest.raises(ForgeError, match="moved: it is at"):  # no parent: the branch must still be at the base
        await forge.commit_changes("tb/x", "Three", changes(base, {"a.txt": b"3"}))
    with pytest.raises(ForgeError, match="'tb/missing' moved: it does not exist"):
        await forge.commit_changes("tb/missing", "Three", changes(base, {"a.txt": b"3"}, parent=second.sha))
    assert subject.tip("tb/x") == second.sha and subject.tip("tb/missing") is None
    assert subject.tree("tb/x")["a.txt"] == b"2"


async def test_changes_the_branch_already_holds_are_nothing_to_commit(subject: Subject) -> None:
    forge, base = subject.forge, subject.base
    first = await forge.commit_changes("tb/x", "One", changes(base, {"a.txt": b"1"}, deleted=["old.txt"]))
    with pytest.raises(ForgeError, match=f"'tb/x' already holds exactly these changes at {first.sha}; there is "
                                         "nothing to commit"):
        await forge.commit_changes("tb/x", "Again", changes(base, {"a.txt": b"1"}, deleted=["old.txt"],
                                                            parent=first.sha))
    assert subject.tip("tb/x") == first.sha


async def test_a_sandbox_back_at_the_base_takes_the_branch_back_with_a_new_commit(subject: Subject) -> None:
    forge, base = subject.forge, subject.base
    first = await forge.commit_changes("tb/x", "One", changes(base, {"a.txt": b"1"}, deleted=["old.txt"]))
    undone = await forge.commit_changes("tb/x", "Undo", changes(base, parent=first.sha))
    assert subject.tree("tb/x") == BASE_TREE and subject.parents(undone.sha) == [first.sha]
    with pytest.raises(ForgeError, match="the changeset is empty"):  # without a parent there is nothing to commit
        await forge.commit_changes("tb/y", "Empty", changes(base))
