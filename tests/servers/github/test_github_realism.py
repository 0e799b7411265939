"""The GitHub forge against what real GitHub does that a simple fake would not: forks copied after they are created,
secondary rate limits, lists in pages, repositories without draft pull requests; and the fake's clones."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from github import Auth, Github
from github.GithubException import GithubException

from servers.github import clients as clients_module, remote
from servers.github.clients import Clients
from servers.github.config import Secret, Settings
from servers.github.forge import ForgeError
from servers.github.remote import GitHubForge
from tests.fakes.github_api import FakeGitHub, SecondaryRateLimit
from tests.servers.github.test_remote import OTHER_TOKEN, TOKEN, changes, forge

FILES = {"README.md": "# demo\n", "src/app.py": "print('hi')\n"}


@pytest.fixture
async def fake() -> AsyncIterator[FakeGitHub]:
    api = FakeGitHub()
    api.tokens = {TOKEN: "octocat", OTHER_TOKEN: "outsider"}
    api.add_repo("octo/demo", FILES, pushers={"octocat"})
    await api.start()
    yield api
    await api.stop()


def git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.mark.parametrize("first", ["create_branch", "commit_changes"])
async def test_a_fork_still_being_copied_is_waited_for(fake: FakeGitHub, first: str) -> None:
    fake.fork_delay_s = 0.7
    gh, base = forge(fake, OTHER_TOKEN), fake.repos["octo/demo"].refs["main"]
    started = time.time()
    async with asyncio.timeout(10):
        if first == "create_branch":
            await gh.create_branch("tb/fork", base)
        made = await gh.commit_changes("tb/fork", "msg", changes(base, {"a.txt": b"a"}))
        pr = await gh.open_pull_request("tb/fork", None, "From a fork", "", False)
    assert time.time() - started >= 0.7
    assert fake.repos["outsider/demo"].refs["tb/fork"] == made.sha and pr.head == "outsider:tb/fork"
    copying = [r for r in fake.requests if r.path.startswith("/repos/outsider/demo/git/") and r.at < started + 0.7]
    assert 2 <= len(copying) <= 4, "asked again after 0.2 s, 0.4 s, …: waits that start short and double"


async def test_a_fork_that_stays_empty_past_the_bound_is_a_clear_error(fake: FakeGitHub,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "FORK_READY_TIMEOUT_S", 0.5)
    fake.fork_delay_s = 60
    async with asyncio.timeout(10):
        with pytest.raises(ForgeError, match=r"fork outsider/demo of octo/demo is still being created; try again in "
                                             r"a minute"):
            await forge(fake, OTHER_TOKEN).create_branch("tb/fork", fake.repos["octo/demo"].refs["main"])
    assert not [r for r in fake.requests if r.method == "POST" and r.path.endswith("/git/refs")]


def retried(fake: FakeGitHub) -> list[tuple[str, str, float]]:
    """For each rate-limited request, its method, path and how long until it was sent again."""
    out = []
    for limited in fake.rate_limited:
        again = next(r for r in fake.requests if r.at > limited.at and (r.method, r.path) == (limited.method,
                                                                                             limited.path))
        out.append((limited.method, limited.path, again.at - limited.at))
    return out


@pytest.mark.parametrize("status", [403, 429])
async def test_a_secondary_rate_limit_is_waited_out_and_the_write_sent_again(fake: FakeGitHub, status: int) -> None:
    fake.secondary = SecondaryRateLimit(next=1, status=status, retry_after=1)
    gh, base = forge(fake), fake.repos["octo/demo"].refs["main"]
    async with asyncio.timeout(20):
        branch = await gh.create_branch("tb/limited", base)
    assert branch.created and fake.repos["octo/demo"].refs["tb/limited"] == base
    [(method, path, gap)] = retried(fake)
    assert (method, path) == ("POST", "/repos/octo/demo/git/refs")
    assert 1.0 <= gap < 1.9, "waits retry-after, once"


async def test_a_rate_limited_ref_update_is_sent_again(fake: FakeGitHub) -> None:
    gh, base = forge(fake), fake.repos["octo/demo"].refs["main"]
    await gh.create_branch("tb/patch", base)
    fake.secondary = SecondaryRateLimit(every=4, status=403, retry_after=1)  # blob, tree, commit, then the PATCH
    async with asyncio.timeout(20):
        made = await gh.commit_changes("tb/patch", "msg", changes(base, {"a.txt": b"a"}))
    assert fake.repos["octo/demo"].refs["tb/patch"] == made.sha
    assert [(m, p) for m, p, _ in retried(fake)] == [("PATCH", "/repos/octo/demo/git/refs/heads/tb/patch")]


async def test_a_rate_limit_longer_than_the_bound_fails_at_once_saying_when_to_try_again(fake: FakeGitHub) -> None:
    fake.secondary = SecondaryRateLimit(next=1, writes_only=False, status=429, retry_after=120)
    started = time.monotonic()
    async with asyncio.timeout(10):
        with pytest.raises(ForgeError, match=r"secondary rate limit.*wait 120 s, longer than "
                                             r"GITHUB_MAX_RATE_LIMIT_WAIT_S "
                                             r"\(60 s\).*try again after \d\d:\d\d:\d\d UTC"):
            await forge(fake).get_repository()
    assert time.monotonic() - started < 5 and len(fake.requests) == 1


async def test_a_write_limited_at_every_try_fails_with_githubs_answer(fake: FakeGitHub) -> None:
    fake.secondary = SecondaryRateLimit(every=1, status=403, retry_after=0)
    async with asyncio.timeout(10):
        with pytest.raises(ForgeError, match=r"secondary rate limit refused the request \(403: You have exceeded a "
                                             r"secondary rate limit.*try again after"):
            await forge(fake).create_branch("tb/never", fake.repos["octo/demo"].refs["main"])
    assert len(fake.rate_limited) == 4 and "tb/never" not in fake.repos["octo/demo"].refs  # the first try, 3 more


async def test_concurrent_operations_send_one_request_at_a_time_for_their_credential(fake: FakeGitHub) -> None:
    # GitHub: "make requests for a single user or client ID serially. Do not make requests [...] concurrently."
    fake.add_repo("octo/two", FILES, pushers={"octocat"})
    fake.latency_s = 0.01  # each request takes a while: concurrent ones would overlap
    clients = Clients(Settings(token=Secret(TOKEN), api_url=fake.base_url, write_interval_s=0))
    forges = [GitHubForge(name, clients) for name in ("octo/demo", "octo/two", "octo/demo", "octo/two")]
    async with asyncio.timeout(20):
        made = await asyncio.gather(*(gh.commit_changes(f"tb/c{n}", "msg", changes(
            fake.repos[gh.full_name].refs["main"], {f"{n}.txt": b"n"})) for n, gh in enumerate(forges)))
    assert [fake.repos[gh.full_name].refs[f"tb/c{n}"] for n, gh in enumerate(forges)] == [c.sha for c in made]
    assert fake.most_in_flight == {TOKEN: 1}


async def test_a_rate_limit_wait_of_one_call_does_not_hold_up_another(fake: FakeGitHub) -> None:
    fake.add_repo("octo/two", FILES, pushers={"octocat"})
    fake.secondary = SecondaryRateLimit(next=1, status=429, retry_after=2)  # the first write waits 2 s
    clients = Clients(Settings(token=Secret(TOKEN), api_url=fake.base_url, write_interval_s=0))
    limited, other = GitHubForge("octo/demo", clients), GitHubForge("octo/two", clients)
    async with asyncio.timeout(20):
        waiting = asyncio.create_task(limited.create_branch("tb/limited", fake.repos["octo/demo"].refs["main"]))
        while not fake.rate_limited:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        info = await other.get_repository()
        took = time.monotonic() - started
        assert info.repo == "octo/two" and took < 1.0, f"held up {took:.1f} s by another call's rate limit"
        assert (await waiting).created
    [(method, path, gap)] = retried(fake)
    assert (method, path) == ("POST", "/repos/octo/demo/git/refs") and gap >= 2.0


async def test_a_request_kept_waiting_too_long_for_its_turn_fails_saying_so(
        fake: FakeGitHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clients_module, "GATE_WAIT_S", 0.3)
    fake.add_repo("octo/two", FILES, pushers={"octocat"})
    fake.latency_s = 1.0  # GitHub answers slowly
    clients = Clients(Settings(token=Secret(TOKEN), api_url=fake.base_url, write_interval_s=0))
    async with asyncio.timeout(20):
        slow = asyncio.create_task(GitHubForge("octo/demo", clients).get_repository())
        while not fake.requests:
            await asyncio.sleep(0.01)
        with pytest.raises(ForgeError, match=r"waited more than 0.3 s for an earlier one to be answered; GitHub is "
                                             r"slow or unreachable: try again in a few minutes"):
            await GitHubForge("octo/two", clients).get_repository()
        assert (await slow).repo == "octo/demo"
    assert [r.path for r in fake.requests] == ["/repos/octo/demo"]


async def test_a_fork_being_copied_is_empty_wherever_github_says_so(fake: FakeGitHub) -> None:
    fake.fork_delay_s = 60

    def answer(call: Callable[[], object]) -> tuple[int, str]:
        try:
            return 200, repr(call())
        except GithubException as exc:
            return exc.status, exc.data.get("message", "") if isinstance(exc.data, dict) else ""

    def probe() -> list[list[tuple[int, str]]]:
        github = Github(auth=Auth.Token(OTHER_TOKEN), base_url=fake.base_url, retry=None)
        upstream = github.get_repo("octo/demo")
        fork = upstream.create_fork()
        calls = [lambda: fork.get_contents("README.md").decoded_content, lambda: [r.ref for r in fork.get_git_refs()],
                 lambda: fork.get_git_ref("heads/main").ref, lambda: upstream.create_pull(
                     base="main", head="outsider:main", title="From the fork").number]
        copying = [answer(call) for call in calls[:3]] + [answer(calls[3])]
        fake.repos["outsider/demo"].ready_at = 0  # copied
        return [copying, [answer(call) for call in calls]]

    copying, copied = await asyncio.to_thread(probe)
    assert copying == [(404, "This repository is empty."), (409, "Git Repository is empty."),
                       (409, "Git Repository is empty."), (422, "Validation Failed")]
    assert copied == [(200, "b'# demo\\n'"), (200, "['refs/heads/main']"), (200, "'refs/heads/main'"), (200, "1")]


def test_the_rate_limit_wait_bound_defaults_to_a_minute() -> None:
    assert Settings.from_env({}).max_rate_limit_wait_s == 60


async def test_every_page_of_pull_requests_is_read_and_a_branchs_is_asked_for_alone(fake: FakeGitHub) -> None:
    gh, repo = forge(fake), fake.repos["octo/demo"]
    for n in range(1, 106):
        repo.refs[f"tb/p{n}"] = repo.store.commit_files({"n.txt": str(n).encode()}, [repo.refs["main"]], f"p{n}")
        await gh.open_pull_request(f"tb/p{n}", None, f"Change {n}", "", False)
    fake.requests.clear()
    assert len(await gh.list_pull_requests(None)) == 105
    assert any("page=2" in r.path for r in fake.requests if r.path.startswith("/repos/octo/demo/pulls?"))
    fake.requests.clear()
    found = await gh.list_pull_requests("tb/p105", "all")
    assert [(p.number, p.head) for p in found] == [(105, "tb/p105")]
    [asked] = [r.path for r in fake.requests if r.path.startswith("/repos/octo/demo/pulls?")]
    assert {k: v for k, v in parse_qs(urlsplit(asked).query).items() if k != "per_page"} == {
        "head": ["octo:tb/p105"], "state": ["all"]}, "one page, of that branch's pull requests alone"


async def test_a_draft_refused_by_the_repository_opens_ready_for_review_saying_so(fake: FakeGitHub) -> None:
    fake.repos["octo/demo"].drafts_supported = False
    gh, base = forge(fake), fake.repos["octo/demo"].refs["main"]
    await gh.commit_changes("tb/draft", "msg", changes(base, {"a.txt": b"a"}))
    pr = await gh.open_pull_request("tb/draft", None, "Add a", "What it does", draft=True)
    assert pr.draft is False and pr.body.endswith("What it does")
    assert pr.body.startswith("> [!NOTE]\n> This pull request would have been a draft")
    posts = [r.body for r in fake.requests if r.method == "POST" and r.path == "/repos/octo/demo/pulls"]
    assert [p["draft"] for p in posts] == [True, False] and len(fake.pulls["octo/demo"]) == 1


async def test_the_fakes_clone_url_clones_the_repository_with_its_branches_and_pull_requests(
        fake: FakeGitHub, tmp_path: Path) -> None:
    gh, base = forge(fake), fake.repos["octo/demo"].refs["main"]
    info = await gh.get_repository()
    assert info.clone_url.startswith("file://")
    git("clone", "-q", info.clone_url, str(tmp_path / "c"))
    assert {p: (tmp_path / "c" / p).read_text() for p in FILES} == FILES
    assert git("rev-parse", "HEAD", cwd=tmp_path / "c").strip() == base
    await gh.create_branch("tb/x", base)
    made = await gh.commit_changes("tb/x", "Add a", changes(base, {"a.txt": b"a"}))
    pr = await gh.open_pull_request("tb/x", None, "Add a", "", False)
    await gh.get_repository()
    git("fetch", "-q", "origin", f"+refs/pull/{pr.number}/head:refs/remotes/pr", cwd=tmp_path / "c")
    git("cat-file", "-e", made.sha, cwd=tmp_path / "c")
    assert git("rev-parse", "refs/remotes/pr", cwd=tmp_path / "c").strip() == made.sha
    git("fsck", "--strict", "--no-dangling", cwd=tmp_path / "c")
    assert "refs/heads/tb/x" in git("ls-remote", info.clone_url)
    mirror = fake.clones
    await fake.stop()
    assert mirror is not None and not mirror.exists()

