"""POST /github/webhook: signed deliveries of comments that mention the handle start runs; everything else is refused
or ignored, and starts none."""

from __future__ import annotations

import hashlib
import hmac
import asyncio
import json
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from common.redact import Redactor, secret_values
from common.untrusted import OURS
from orchestrator.config import Settings
from orchestrator.runs import RunManager
from orchestrator.store import SQLiteRunStore
from orchestrator.webhook import mentions, request_text
from tests.fakes.github_api import FakeGitHub

from .conftest import of_type, parse_sse, serve, stack
from . import github_stack as gh
from .github_stack import BOT, add_repo, github_stack, realism
from .test_run import BUGGY
from .test_team import coder, planner, reviewer

pytestmark = pytest.mark.asyncio(loop_scope="session")
fake_github, github_pool = gh.fake_github, gh.github_pool  # the fixtures of the service against the fake GitHub
SECRET = "tb-webhook-secret-" + "w" * 24
HOSTS = ("127.0.0.1",)
NOTHING: list = []  # the refusals reach no model


def now(seconds_ago: float = 0) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def issue_comment(body: str, *, login: str = "writer", number: int = 7, pull: bool = False, created: str | None = None,
                  action: str = "created", comment_id: int = 1001, sender_type: str = "User",
                  repo: str = "octo/demo") -> dict[str, Any]:
    """An issue_comment delivery's payload, as GitHub sends it (docs.github.com/webhooks/webhook-events-and-payloads
    #issue_comment)."""
    issue: dict[str, Any] = {"number": number, "title": "Greeting is wrong", "user": {"login": "reporter"}}
    if pull:
        issue["pull_request"] = {"url": f"https://api.github.com/repos/{repo}/pulls/{number}"}
    user = {"login": login, "id": 42, "type": sender_type}
    return {"action": action, "issue": issue, "repository": {"full_name": repo, "id": 99},
            "comment": {"id": comment_id, "body": body, "created_at": created or now(), "user": user},
            "sender": user}


async def deliver(url: str, payload: Any, *, event: str = "issue_comment", delivery: str | None = None,
                  secret: str | None = SECRET, signature: str | None = None,
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """POST a delivery as GitHub does: the raw JSON body signed with HMAC-SHA256 of the secret."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    sent = {"Content-Type": "application/json", "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()), "User-Agent": "GitHub-Hookshot/test"}
    if signature is not None:
        sent["X-Hub-Signature-256"] = signature
    elif secret is not None:
        sent["X-Hub-Signature-256"] = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/github/webhook", data=raw, headers=sent | (headers or {})) as resp:
            return resp.status, await resp.json()


async def run_count(url: str, headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(url + "/runs") as resp:
            return len((await resp.json())["runs"])


def webhook_stack(pool, script=NOTHING, **settings):
    return stack(pool, script, github_webhook_secret=SECRET, github_hosts=HOSTS,
                 local_roots=tuple(gh.CLONE_ROOTS), **settings)


async def test_without_a_secret_the_webhook_is_off(pool):
    async with stack(pool, NOTHING) as s:
        status, answer = await deliver(s.url, issue_comment("@tiny-backspace fix it"))
    assert status == 503 and "GITHUB_WEBHOOK_SECRET" in answer["error"]


async def test_unsigned_and_badly_signed_deliveries_are_refused_and_start_nothing(pool):
    payload = issue_comment("@tiny-backspace fix it")
    async with webhook_stack(pool) as s:
        unsigned = await deliver(s.url, payload, secret=None)
        wrong_secret = await deliver(s.url, payload, secret="not-the-secret-at-all")
        garbage = await deliver(s.url, payload, signature="sha256=" + "0" * 64)
        raw = json.dumps(payload).encode()
        other_body = await deliver(s.url, raw + b" ", signature="sha256=" + hmac.new(
            SECRET.encode(), raw, hashlib.sha256).hexdigest())
        runs = await run_count(s.url)
    assert unsigned[0] == 401 and "unsigned" in unsigned[1]["error"]
    for status, answer in (wrong_secret, garbage, other_body):
        assert status == 401 and "bad signature" in answer["error"] and "GITHUB_WEBHOOK_SECRET" in answer["error"]
    assert runs == 0


async def test_a_ping_is_answered(pool):
    async with webhook_stack(pool) as s:
        status, answer = await deliver(s.url, {"zen": "Design for failure.", "hook_id": 1}, event="ping")
        unsigned = await deliver(s.url, {"zen": "x"}, event="ping", secret=None)
    assert status == 200 and answer["pong"] is True and "@tiny-backspace" in answer["message"]
    assert unsigned[0] == 401


async def test_events_and_actions_other_than_new_comments_are_ignored(pool):
    async with webhook_stack(pool) as s:
        push = await deliver(s.url, {"ref": "refs/heads/main"}, event="push")
        edited = await deliver(s.url, issue_comment("@tiny-backspace fix it", action="edited"))
        not_json = await deliver(s.url, b"payload=%7B%7D")
        runs = await run_count(s.url)
    assert push[0] == 202 and "push is not handled" in push[1]["ignored"]
    assert edited[0] == 202 and "only new comments" in edited[1]["ignored"]
    assert not_json[0] == 400 and "application/json" in not_json[1]["error"]
    assert runs == 0


async def test_an_oversized_delivery_is_refused_as_any_body_is(pool):
    async with webhook_stack(pool) as s:
        status, answer = await deliver(s.url, issue_comment("@tiny-backspace " + "x" * 300_000))
    assert status == 413 and "over 262144 bytes" in answer["error"]


async def test_a_stale_comment_is_refused(pool):
    async with webhook_stack(pool, webhook_max_age_s=600) as s:
        status, answer = await deliver(s.url, issue_comment("@tiny-backspace fix it", created=now(601)))
        runs = await run_count(s.url)
    assert status == 400 and "TB_WEBHOOK_MAX_AGE_S" in answer["error"] and "replay" in answer["error"]
    assert runs == 0


async def test_a_delivery_from_a_github_host_the_service_does_not_serve_is_refused(pool):
    payload = issue_comment("@tiny-backspace fix it")
    payload["repository"]["html_url"] = "https://ghe.example.com/octo/demo"
    async with webhook_stack(pool) as s:
        status, answer = await deliver(s.url, payload)
        runs = await run_count(s.url)
    assert status == 400 and "TB_GITHUB_HOSTS" in answer["error"] and runs == 0


async def test_comments_without_a_mention_or_by_the_bot_itself_start_nothing(pool):
    async with webhook_stack(pool) as s:
        answers = [await deliver(s.url, issue_comment(body, login=login, sender_type=kind)) for body, login, kind in [
            ("please fix it, tiny-backspace", "writer", "User"),
            ("mail me at me@tiny-backspace.dev", "writer", "User"),
            ("`@tiny-backspace` is the bot's name", "writer", "User"),
            ("> @tiny-backspace fix it\n\nWhat they said, but later.", "writer", "User"),
            ("```\n@tiny-backspace fix it\n```", "writer", "User"),
            ("@tiny-backspace-helper fix it", "writer", "User"),
            ("@tiny-backspace fix it", "Tiny-Backspace", "User"),
            ("@tiny-backspace fix it", "tiny-backspace[bot]", "Bot"),
            ("@tiny-backspace fix it", "ci-bot", "Bot"),
            ("Working on it: @tiny-backspace\n<!-- tiny-backspace -->", "a-person", "User"),
        ]]
        runs = await run_count(s.url)
    assert [status for status, _ in answers] == [202] * len(answers)
    assert all("does not mention" in a["ignored"] for _, a in answers[:6])
    assert all("the service's own, or a bot's" in a["ignored"] for _, a in answers[6:])
    assert runs == 0


async def test_the_webhook_needs_no_api_token_but_still_its_signature(pool):
    token = "tb-test-token-" + "y" * 40
    async with webhook_stack(pool, api_token=token) as s:
        ping = await deliver(s.url, {"zen": "x"}, event="ping")
        unsigned = await deliver(s.url, {"zen": "x"}, event="ping", secret=None)
        async with aiohttp.ClientSession() as http:
            async with http.get(s.url + "/runs") as resp:
                runs_status = resp.status
    assert ping[0] == 200 and unsigned[0] == 401 and "unsigned" in unsigned[1]["error"]
    assert runs_status == 401  # the exemption is this path's alone


async def test_a_mention_is_the_handle_as_a_whole_login_outside_code_and_quotes():
    body = ("Hi @Tiny-Backspace, please fix `@tiny-backspace` handling\n> @tiny-backspace quoted\n"
            "```js\n@tiny-backspace\n```\nthanks @tiny-backspace.")
    found = mentions(body, "tiny-backspace")
    assert [body[a:b] for a, b in found] == ["@Tiny-Backspace", "@tiny-backspace"]
    assert found[1][0] == body.rindex("@tiny-backspace")
    assert mentions("x@tiny-backspace @tiny-backspace2 @tiny-backspace_x", "tiny-backspace") == []
    assert request_text("@tiny-backspace: rename add() to plus()", mentions(
        "@tiny-backspace: rename add() to plus()", "tiny-backspace")) == "rename add() to plus()"
    assert request_text("@tiny-backspace", mentions("@tiny-backspace", "tiny-backspace")) == ""


async def test_the_webhook_secret_is_masked_and_never_printed():
    env = {"GITHUB_WEBHOOK_SECRET": SECRET}
    assert SECRET not in repr(Settings.from_env(env))
    assert Redactor(secret_values(env))(f"the secret is {SECRET}") == "the secret is [redacted]"


async def test_two_stores_claiming_one_delivery_at_once_claim_it_once(tmp_path: Path):
    """Service processes sharing one store: of deliveries claimed at the same moment, one wins, the others read it."""
    path = tmp_path / "runs.sqlite3"
    made = SQLiteRunStore(path)
    await made.open()
    await made.close()
    count = 8
    start = threading.Barrier(count)
    results: list[Any] = [None] * count

    async def claim_once(index: int) -> None:
        store = SQLiteRunStore(path)
        await store.open()
        try:
            start.wait(timeout=30)
            results[index] = await store.claim_delivery("d-1", "issue_comment:octo/demo:1001")
        finally:
            await store.close()

    def claim(index: int) -> None:  # each a process of its own would be: a thread with its own event loop
        asyncio.run(claim_once(index))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results.count(None) == 1
    assert all(r == {"id": "d-1", "run_id": None, "outcome": None} for r in results if r is not None)
    store = SQLiteRunStore(path)
    await store.open()
    await store.settle_delivery("d-1", "run_first", "started")
    again = await store.claim_delivery("d-2", "issue_comment:octo/demo:1001")  # another hook, the same comment
    await store.forget_delivery("d-1")
    assert again == {"id": "d-1", "run_id": "run_first", "outcome": "started"}
    assert await store.claim_delivery("d-1", "issue_comment:octo/demo:1001") is None
    await store.close()


# End to end: the service, the github server and the fake GitHub, a run by the scripted model.

PUBLIC = "https://tb.example.test"


def from_fake(fake: FakeGitHub, full_name: str, number: int, comment: dict[str, Any], *, pull: bool = False
              ) -> dict[str, Any]:
    """The issue_comment delivery GitHub sends for a comment the fake holds."""
    issue: dict[str, Any] = {"number": number, "title": "add() subtracts"}
    if pull:
        issue["pull_request"] = {"url": f"{fake.base_url}/repos/{full_name}/pulls/{number}"}
    return {"action": "created", "issue": issue, "comment": comment, "sender": comment["user"],
            "repository": {"full_name": full_name, "id": 99}}


def answers(fake: FakeGitHub, full_name: str, number: int, author: str = BOT) -> list[dict[str, Any]]:
    return [c for c in fake.conversations.of(full_name, number) if c["user"]["login"] == author]


async def until(check: Any, timeout: float = 60) -> Any:
    """`check()` once it is truthy, waiting at most `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not (found := check()):
            await asyncio.sleep(0.05)
    return found


async def events_of(url: str, run_id: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        async with http.get(f"{url}/runs/{run_id}/events") as resp:
            return parse_sse(await resp.text())


def issue_repo(fake: FakeGitHub, writer: str = "alice") -> str:
    repo = add_repo(fake, BUGGY)
    fake.add_issue(repo.full_name, 1, "add() subtracts", "add(2, 3) gives -1; it must give 5.", [])
    fake.conversations.set_permission(repo.full_name, writer, "write")
    return repo.full_name


async def test_a_mention_by_a_writer_starts_a_run_answered_with_its_link_then_its_pull_request(
        github_pool, fake_github):
    full_name = issue_repo(fake_github)
    for n in range(104):  # the issue's conversation takes two pages of 100
        fake_github.conversations.add_issue_comment(full_name, 1, f"Seen it too ({n}).", author=f"user{n}")
    comment = fake_github.conversations.add_issue_comment(full_name, 1, "@tiny-backspace please fix this",
                                                          author="alice")
    script = planner() + coder() + reviewer("approve")
    with realism(fake_github, rate_limit_every=3):  # every third write is refused once, with retry-after
        async with github_stack(github_pool, script, github_webhook_secret=SECRET, public_url=PUBLIC) as s:
            status, answer = await deliver(s.url, from_fake(fake_github, full_name, 1, comment))
            assert status == 202 and answer["events_url"] == f"/runs/{answer['run_id']}/events"
            run_id = answer["run_id"]
            events = await events_of(s.url, run_id)
            done = await until(lambda: [c for c in answers(fake_github, full_name, 1) if "Done" in c["body"]])
    assert fake_github.rate_limited and any("page=2" in r.path for r in fake_github.requests
                                            if f"/{full_name}/issues/1/comments" in r.path)
    posted = [r for r in fake_github.requests if r.method == "POST" and r.path.endswith("/issues/1/comments")
              and r not in fake_github.rate_limited]
    assert len(posted) == 1 and f"Working on it: [run `{run_id}`]({PUBLIC}/#{run_id})" in posted[0].body["body"]
    run = of_type(events, "run")[0]
    assert run["issue"] == 1 and run["mode"] == "team" and run["prompt"] == "please fix this"
    pr = of_type(events, "pull_request")[0]
    assert events[-1]["status"] == "success"
    edited = [r for r in fake_github.requests if r.method == "PATCH" and r.path.endswith(f"/comments/{done[0]['id']}")
              and r not in fake_github.rate_limited]
    assert len(answers(fake_github, full_name, 1)) == 1 and len(edited) == 1  # the answer, edited: no second one
    assert done[0]["body"].startswith(f"Done: {pr['url']}") and f"({PUBLIC}/#{run_id})" in done[0]["body"]


async def test_a_mention_by_a_reader_starts_nothing_and_gets_no_answer(github_pool, fake_github):
    full_name = issue_repo(fake_github)
    fake_github.conversations.set_permission(full_name, "bob", "triage")
    comment = fake_github.conversations.add_issue_comment(full_name, 1, "@tiny-backspace do it", author="bob")
    async with github_stack(github_pool, [], github_webhook_secret=SECRET) as s:
        status, answer = await deliver(s.url, from_fake(fake_github, full_name, 1, comment))
        again = await deliver(s.url, from_fake(fake_github, full_name, 1, comment))
        runs = await run_count(s.url)
    assert status == 202 and "@bob cannot write" in answer["ignored"]
    assert again[0] == 200 and again[1]["run_id"] is None and "@bob cannot write" in again[1]["outcome"]
    assert runs == 0 and answers(fake_github, full_name, 1) == []


async def test_a_replayed_or_doubled_delivery_starts_one_run(github_pool, fake_github):
    full_name = issue_repo(fake_github)
    comment = fake_github.conversations.add_issue_comment(full_name, 1, "@tiny-backspace fix it", author="alice")
    payload = from_fake(fake_github, full_name, 1, comment)
    script = planner() + coder() + reviewer("approve")
    async with github_stack(github_pool, script, github_webhook_secret=SECRET) as s:
        both = await asyncio.gather(deliver(s.url, payload, delivery="d-same"), deliver(s.url, payload,
                                                                                      delivery="d-same"))
        first = next(a for status, a in both if status == 202)
        await events_of(s.url, first["run_id"])
        replayed = await deliver(s.url, payload, delivery="d-same")
        other_hook = await deliver(s.url, payload, delivery="d-another-hook")
        await until(lambda: [c for c in answers(fake_github, full_name, 1) if "Done" in c["body"]])
        runs = await run_count(s.url)
    assert sorted(status for status, _ in both) == [200, 202]
    assert replayed == (200, {"duplicate": True, "run_id": first["run_id"], "delivery": "d-same",
                              "outcome": "started"})
    assert other_hook[0] == 200 and other_hook[1]["run_id"] == first["run_id"]
    assert runs == 1 and len(answers(fake_github, full_name, 1)) == 1


async def test_a_mention_on_a_pull_request_follows_it_up_and_a_failure_is_the_answer(github_pool, fake_github):
    full_name = issue_repo(fake_github)
    fake_github.add_issue(full_name, 5, "Not a pull request of ours", "", [])  # commented on; no pull request #5
    comment = fake_github.conversations.add_issue_comment(full_name, 5, "@tiny-backspace", author="alice")
    # A review comment on a line of the pull request (docs.github.com/webhooks/webhook-events-and-payloads
    # #pull_request_review_comment).
    review = {**comment, "id": comment["id"] + 500_000, "path": "calc.py", "line": 2,
              "body": "@tiny-backspace rename add() to plus()"}
    review_delivery = {"action": "created", "comment": review, "pull_request": {"number": 5},
                       "repository": {"full_name": full_name}, "sender": comment["user"]}
    async with github_stack(github_pool, [], github_webhook_secret=SECRET) as s:
        status, answer = await deliver(s.url, from_fake(fake_github, full_name, 5, comment, pull=True))
        events = await events_of(s.url, answer["run_id"])
        on_a_line = await deliver(s.url, review_delivery, event="pull_request_review_comment")
        review_events = await events_of(s.url, on_a_line[1]["run_id"])
        stopped = await until(lambda: [c for c in answers(fake_github, full_name, 5) if "Stopped" in c["body"]][1:])
    run = of_type(events, "run")[0]
    assert status == 202 and run["pull_request"] == 5 and run["prompt"] == ""
    error = of_type(events, "error")[0]["message"]
    assert stopped[0]["body"].startswith(f"Stopped (error): {error}") and "get_pull_request" in error
    assert on_a_line[0] == 202 and of_type(review_events, "run")[0] == {
        **of_type(review_events, "run")[0], "pull_request": 5, "prompt": "rename add() to plus()"}


async def test_a_mention_past_the_admission_limits_is_answered_and_a_redelivery_may_start_it(
        github_pool, fake_github):
    full_name = issue_repo(fake_github)
    first = fake_github.conversations.add_issue_comment(full_name, 1, "@tiny-backspace fix it", author="alice")
    second = fake_github.conversations.add_issue_comment(full_name, 1, "@tiny-backspace now", author="alice")
    script = planner() + coder() + reviewer("approve")
    async with github_stack(github_pool, script, github_webhook_secret=SECRET, rate_burst=1,
                            rate_per_minute=0.01) as s:
        started = await deliver(s.url, from_fake(fake_github, full_name, 1, first))
        refused = await deliver(s.url, from_fake(fake_github, full_name, 1, second), delivery="d-refused")
        await events_of(s.url, started[1]["run_id"])
        said = await until(lambda: [c for c in answers(fake_github, full_name, 1) if "cannot start" in c["body"]])
        again = await deliver(s.url, from_fake(fake_github, full_name, 1, second), delivery="d-refused")
        runs = await run_count(s.url)
    assert started[0] == 202 and refused[0] == 429 and f"github:{full_name}" in refused[1]["error"]
    assert said[0]["body"].startswith("@alice I cannot start a run now: too many runs started from "
                                      f"github:{full_name}")
    assert again[0] == 429 and runs == 1  # not a duplicate: the refused delivery left no claim behind


APP_ID = 4242


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def app_pool(fake_github: FakeGitHub, mcp_config: Path, tmp_path_factory: pytest.TempPathFactory):
    """The MCP servers, the github server authenticated as a GitHub App the fake knows (no token of its own)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    fake_github.apps.add(APP_ID, public, slug="tiny-backspace")
    config = json.loads(mcp_config.read_text())
    env = config["mcpServers"]["github"]["env"]
    env.pop("GITHUB_TOKEN", None)
    env.update({"GITHUB_API_URL": fake_github.base_url, "GITHUB_APP_ID": str(APP_ID), "GITHUB_APP_PRIVATE_KEY": pem,
                "GITHUB_WRITE_INTERVAL_S": "0"})
    pool = await gh.started_pool(config, tmp_path_factory)
    yield pool
    await pool.close()


async def test_the_webhook_works_with_the_github_server_as_a_github_app(app_pool, fake_github):
    repo = add_repo(fake_github, BUGGY, pushers=set())
    full_name = repo.full_name
    fake_github.apps.install(APP_ID, full_name)
    fake_github.add_issue(full_name, 1, "add() subtracts", "add(2, 3) gives -1; it must give 5.", [])
    fake_github.conversations.set_permission(full_name, "alice", "maintain")
    comment = fake_github.conversations.add_issue_comment(full_name, 1, "@Tiny-Backspace fix add()", author="alice")
    issued = len(fake_github.apps.issued)
    script = planner() + coder() + reviewer("approve")
    async with github_stack(app_pool, script, github_webhook_secret=SECRET) as s:
        status, answer = await deliver(s.url, from_fake(fake_github, full_name, 1, comment))
        events = await events_of(s.url, answer["run_id"])
        done = await until(lambda: [c for c in answers(fake_github, full_name, 1, "tiny-backspace[bot]")
                                    if "Done" in c["body"]])
        # GitHub delivers the App's own answer too: it starts nothing.
        own = await deliver(s.url, from_fake(fake_github, full_name, 1, done[0]))
        runs = await run_count(s.url)
    assert status == 202 and events[-1]["status"] == "success"
    assert done[0]["body"].startswith(f"Done: {of_type(events, 'pull_request')[0]['url']}")
    assert own[0] == 202 and "the service's own" in own[1]["ignored"] and runs == 1
    assert len(fake_github.apps.issued) > issued  # the server got installation tokens from its App's JWT


async def test_the_answer_of_a_run_a_dead_service_left_says_how_it_ended_after_the_restart(
        github_pool, fake_github, tmp_path):
    full_name = issue_repo(fake_github)
    repo = f"https://127.0.0.1/{full_name}"
    # What a service that died mid-run leaves: its run in flight, the delivery that started it, the answer posted.
    answer = fake_github.conversations.add_issue_comment(full_name, 1, "Working on it: [run `run_left`](…).\n\n"
                                                         + OURS, author=BOT)
    dead = SQLiteRunStore(tmp_path / "runs.sqlite3")
    await dead.open()
    await dead.create("run_left", repo, "please fix this", "team")
    assert await dead.claim_delivery("d-left", f"issue_comment:{full_name.lower()}:1") is None
    await dead.settle_delivery("d-left", "run_left", "started")
    await dead.answering("d-left", repo, 1, f"{PUBLIC}/#run_left", answer["id"])
    await dead.close()
    store = SQLiteRunStore(tmp_path / "runs.sqlite3")
    await store.open()
    async with github_stack(github_pool, [], github_webhook_secret=SECRET) as s:
        assert await RunManager(s.services, store).recover() == ["run_left"]
        async with serve(s.services, store):
            done = await until(lambda: [c for c in answers(fake_github, full_name, 1) if "Stopped" in c["body"]])
            left = await store.unanswered()
    assert [c["id"] for c in answers(fake_github, full_name, 1)] == [answer["id"]]  # edited, not a second one
    assert done[0]["body"].startswith("Stopped (interrupted): ") and f"({PUBLIC}/#run_left)" in done[0]["body"]
    assert left == []
