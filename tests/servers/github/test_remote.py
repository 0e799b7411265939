"""The GitHub forge: the real PyGithub against the fake GitHub REST API, checking what it sent and what it did."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator

import pytest

from servers.github.config import Secret, Settings
from servers.github.forge import Changeset, ForgeError, ForgeUnavailable
from servers.github.clients import Clients, github_name
from servers.github.remote import GitHubForge
from tests.fakes.github_api import FakeGitHub

TOKEN = "ghp_" + "A1b2C3d4E5" * 3 + "f6G7h8"
OTHER_TOKEN = "ghp_" + "Z9y8X7w6V5" * 3 + "u4T3s2"


@pytest.fixture
async def fake() -> AsyncIterator[FakeGitHub]:
    api = FakeGitHub()
    api.tokens = {TOKEN: "octocat", OTHER_TOKEN: "outsider"}
    api.add_repo("octo/demo", {"README.md": "# demo\n", "src/app.py": "print('hi')\n", "old.txt": "bye\n"},
                 pushers={"octocat"})
    await api.start()
    yield api
    await api.stop()


def forge(api: FakeGitHub, token: str = TOKEN, repo: str = "octo/demo") -> GitHubForge:
    settings = Settings(token=Secret(token), api_url=api.base_url, write_interval_s=0)
    return GitHubForge(repo, Clients(settings))


def changes(base: str, files: dict[str, bytes], deleted: list[str] = (), mode: str = "100644") -> Changeset:
    return Changeset(base_commit=base, deleted=list(deleted), files=[
        {"path": p, "mode": mode, "content_base64": base64.b64encode(c).decode()} for p, c in files.items()])


def test_owner_name_and_github_urls_name_a_github_repository_and_other_hosts_are_refused() -> None:
    api = "https://api.github.com"
    assert github_name("octo/demo", api) == "octo/demo"
    assert github_name("https://github.com/octo/demo.git", api) == "octo/demo"
    assert github_name("https://ghe.example.com/octo/demo", "https://ghe.example.com/api/v3") == "octo/demo"
    assert github_name("/srv/repo", api) is None
    with pytest.raises(ForgeError, match="not a GitHub repository"):
        github_name("https://gitlab.com/octo/demo", api)
    with pytest.raises(ForgeError, match="credentials") as caught:
        github_name(f"https://x:{TOKEN}@github.com/octo/demo", api)
    assert TOKEN not in str(caught.value)


def test_a_github_repository_without_a_token_is_a_clear_error_naming_the_variable() -> None:
    with pytest.raises(ForgeUnavailable, match="GITHUB_TOKEN"):
        GitHubForge("octo/demo", Clients(Settings()))


async def test_get_repository_reports_the_default_branch_and_push_rights(fake: FakeGitHub) -> None:
    info = await forge(fake).get_repository()
    assert (info.repo, info.default_branch, info.can_push) == ("octo/demo", "main", True)
    assert (await forge(fake, OTHER_TOKEN).get_repository()).can_push is False


async def test_a_commit_goes_through_blobs_a_tree_with_deletions_a_commit_and_a_ref(fake: FakeGitHub) -> None:
    gh, base = forge(fake), fake.repos["octo/demo"].refs["main"]
    branch = await gh.create_branch("tb/change", base)
    assert (branch.sha, branch.created) == (base, True)
    result = await gh.commit_changes("tb/change", "Change app", changes(
        base, {"src/app.py": b"print('bye')\n", "bin/run": b"\x00\xff binary"}, deleted=["old.txt"]))
    repo = fake.repos["octo/demo"]
    assert repo.refs["tb/change"] == result.sha and repo.refs["main"] == base
    files = repo.store.flatten(repo.store.commits[result.sha].tree)
    assert set(files) == {"README.md", "src/app.py", "bin/run"}
    assert repo.store.blobs[files["bin/run"][1]] == b"\x00\xff binary"
    sent = [(r.method, r.path.split("/repos/octo/demo")[-1]) for r in fake.requests if r.method != "GET"]
    assert sent == [("POST", "/git/refs"), ("POST", "/git/blobs"), ("POST", "/git/blobs"), ("POST", "/git/trees"),
                    ("POST", "/git/commits"), ("PATCH", "/git/refs/heads/tb/change")]
    ref_post = next(r for r in fake.requests if r.path.endswith("/git/refs"))
    assert ref_post.body == {"ref": "refs/heads/tb/change", "sha": base}
    tree_post = next(r for r in fake.requests if r.path.endswith("/git/trees"))
    assert {"path": "old.txt", "mode": "100644", "type": "blob", "sha": None} in tree_post.body["tree"]
    assert tree_post.body["base_tree"] == repo.store.commits[base].tree
    assert next(r for r in fake.requests if r.method == "PATCH").body == {"sha": result.sha, "force": False}
    assert all(TOKEN not in r.path for r in fake.requests)
    assert all(r.headers["Authorization"] == f"token {TOKEN}" for r in fake.requests)


async def test_create_branch_succeeds_again_at_the_same_sha_and_refuses_another_sha(fake: FakeGitHub) -> None:
    gh, base = forge(fake), fake.repos["octo/demo"].refs["main"]
    await gh.create_branch("tb/x", base)
    assert (await gh.create_branch("tb/x", base)).created is False
    fake.repos["octo/demo"].refs["tb/y"] = fake.repos["octo/demo"].store.commit_files({"a": b"a"}, [base], "other")
    writes = len([r for r in fake.requests if r.method != "GET"])
    with pytest.raises(ForgeError, match="already exists at"):
        await gh.create_branch("tb/y", base)
    assert len([r for r in fake.requests if r.method != "GET"]) == writes


async def test_writes_to_the_default_branch_or_outside_the_prefix_send_nothing(fake: FakeGitHub) -> None:
    gh, base = forge(fake), fake.repos["octo/demo"].refs["main"]
    for branch in ("main", "feature/x", "tb/bad..name", "tb/"):
        with pytest.raises(ForgeError):
            await gh.create_branch(branch, base)
    with pytest.raises(ForgeError, match="default"):
        await GitHubForge("octo/demo", Clients(Settings(token=Secret(TOKEN), api_url=fake.base_url,
                                                        branch_prefix=""))).create_branch("main", base)
    assert not [r for r in fake.requests if r.method != "GET"]


async def test_a_commit_on_a_branch_that_moved_is_refused_before_anything_is_written(fake: FakeGitHub) -> None:
    gh, base = forge(fake), fake.repos["octo/demo"].refs["main"]
    await gh.create_branch("tb/moved", base)
    repo = fake.repos["octo/demo"]
    repo.refs["tb/moved"] = repo.store.commit_files({"x": b"x"}, [base], "someone else")
    with pytest.raises(ForgeError, match="moved"):
        await gh.commit_changes("tb/moved", "msg", changes(base, {"a.txt": b"a"}))
    assert not [r for r in fake.requests if r.path.endswith(("/git/blobs", "/git/trees"))]


async def test_a_changeset_that_changes_nothing_makes_no_commit(fake: FakeGitHub) -> None:
    gh, base = forge(fake), fake.repos["octo/demo"].refs["main"]
    await gh.create_branch("tb/same", base)
    with pytest.raises(ForgeError, match="nothing to commit"):
        await gh.commit_changes("tb/same", "msg", changes(base, {"README.md": b"# demo\n"}))
    assert fake.repos["octo/demo"].refs["tb/same"] == base


async def test_a_pull_request_opens_once_even_when_the_post_is_retried(fake: FakeGitHub) -> None:
    gh, base = forge(fake), fake.repos["octo/demo"].refs["main"]
    await gh.create_branch("tb/pr", base)
    await gh.commit_changes("tb/pr", "msg", changes(base, {"a.txt": b"a"}))
    fake.lose_responses.append(("POST", "/pulls"))
    pr = await gh.open_pull_request("tb/pr", None, "Add a", "body", draft=True)
    assert (pr.number, pr.head, pr.base, pr.draft, pr.existing) == (1, "tb/pr", "main", True, True)
    assert len(fake.pulls["octo/demo"]) == 1
    assert len([r for r in fake.requests if r.method == "POST" and r.path.endswith("/pulls")]) == 2
    again = await gh.open_pull_request("tb/pr", "main", "Add a", "body", draft=False)
    assert (again.number, again.existing) == (1, True)
    listed = await gh.list_pull_requests("tb/pr")
    assert [p.number for p in listed] == [1]


async def test_a_missing_base_branch_or_head_branch_is_a_clear_error(fake: FakeGitHub) -> None:
    gh = forge(fake)
    with pytest.raises(ForgeError, match="base branch 'nope' does not exist"):
        await gh.open_pull_request("tb/x", "nope", "t", "", False)
    with pytest.raises(ForgeError, match="head branch 'tb/x' does not exist"):
        await gh.open_pull_request("tb/x", None, "t", "", False)
    assert not fake.pulls["octo/demo"]


async def test_a_token_without_push_rights_forks_and_opens_the_pull_request_from_the_fork(fake: FakeGitHub) -> None:
    gh, base = forge(fake, OTHER_TOKEN), fake.repos["octo/demo"].refs["main"]
    branch = await gh.create_branch("tb/fork", base)
    assert branch.repo == "outsider/demo"
    await gh.commit_changes("tb/fork", "msg", changes(base, {"a.txt": b"a"}))
    pr = await gh.open_pull_request("tb/fork", None, "From a fork", "", False)
    assert pr.head == "outsider:tb/fork"
    assert "tb/fork" not in fake.repos["octo/demo"].refs
    sent = next(r for r in fake.requests if r.method == "POST" and r.path == "/repos/octo/demo/pulls").body
    assert sent["head"] == "outsider:tb/fork" and sent["maintainer_can_modify"] is True


async def test_an_unknown_repository_is_a_clear_error(fake: FakeGitHub) -> None:
    with pytest.raises(ForgeError, match="octo/missing was not found"):
        await forge(fake, repo="octo/missing").get_repository()


async def test_an_exhausted_rate_limit_says_when_it_resets_without_waiting(fake: FakeGitHub,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    fake.rate_limit_exhausted = True
    caplog.set_level(logging.DEBUG)
    async with __import__("asyncio").timeout(10):
        with pytest.raises(ForgeError, match=r"rate limit exhausted.*resets at .* UTC, in \d+ s") as caught:
            await forge(fake).get_repository()
    assert TOKEN not in str(caught.value) and TOKEN not in caplog.text


async def test_a_rejected_token_is_reported_without_the_token(fake: FakeGitHub,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    planted = "ghp_" + "Q" * 36
    with pytest.raises(ForgeUnavailable, match="Bad credentials") as caught:
        await forge(fake, planted).get_repository()
    assert planted not in str(caught.value) and planted not in caplog.text


async def test_an_issue_is_read_with_its_labels(fake: FakeGitHub) -> None:
    fake.add_issue("octo/demo", 7, "Login fails", "Steps...", ["bug"])
    issue = await forge(fake).get_issue(7)
    assert (issue.number, issue.title, issue.labels, issue.author) == (7, "Login fails", ["bug"], "reporter")
    with pytest.raises(ForgeError, match="issue #8 was not found"):
        await forge(fake).get_issue(8)


async def test_a_commit_to_a_missing_branch_makes_the_branch_last(fake: FakeGitHub) -> None:
    gh, base = forge(fake), fake.repos["octo/demo"].refs["main"]
    made = await gh.commit_changes("tb/new", "msg", changes(base, {"a.txt": b"a"}))
    assert fake.repos["octo/demo"].refs["tb/new"] == made.sha
    writes = [r.path for r in fake.requests if r.method != "GET"]
    assert writes[-1].endswith("/git/refs")  # the ref is made only once the commit exists


async def test_a_commit_on_a_parent_builds_on_the_base_tree_and_moves_the_branch_without_force(
        fake: FakeGitHub) -> None:
    gh, repo = forge(fake), fake.repos["octo/demo"]
    base = repo.refs["main"]
    first = await gh.commit_changes("tb/x", "Add", changes(base, {"a.txt": b"a", "b.txt": b"b"}))
    fake.requests.clear()
    second = await gh.commit_changes("tb/x", "Drop b", changes(base, {"a.txt": b"a"}).model_copy(
        update={"parent": first.sha}))
    tree_post = next(r for r in fake.requests if r.path.endswith("/git/trees"))
    commit_post = next(r for r in fake.requests if r.path.endswith("/git/commits") and r.method == "POST")
    assert tree_post.body["base_tree"] == repo.store.commits[base].tree
    assert commit_post.body["parents"] == [first.sha]
    assert next(r for r in fake.requests if r.method == "PATCH").body == {"sha": second.sha, "force": False}
    assert set(repo.store.flatten(repo.store.commits[repo.refs["tb/x"]].tree)) == {"README.md", "src/app.py",
                                                                                 "old.txt", "a.txt"}
