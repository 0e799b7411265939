"""Nothing lost: however a run stops after its sandbox has changes (a model error, a server killed, a cancel, a
forge that cannot be reached), the changes end as a draft pull request, or kept with the run for
`POST /runs/{id}/publish` and `/retry`; and a user can steer a run in flight with `POST /runs/{id}/messages`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator import resume
from orchestrator.runs import RunManager
from orchestrator.store import SQLiteRunStore
from orchestrator.tools import ToolFailed
from tests.conftest import git, unique_marker
from tests.fakes.messages_api import http_error, text, tool_use, turn

from .conftest import of_type, parse_sse, serve, stack
from .test_failures import _processes, sandboxes
from .test_run import BUGGY

pytestmark = pytest.mark.asyncio(loop_scope="session")
FIXED = "def add(a, b):\n    return a + b\n"
WRITE_FIX = turn(tool_use("sandbox_write_file", {"path": "calc.py", "content": FIXED}))


def pull_request_record(url: str) -> dict[str, Any]:
    return json.loads(Path(url.removeprefix("file://")).read_text())


async def request(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        async with http.request(method, url + path, json=body) as resp:
            return resp.status, await resp.json()


class Following:
    """A run started with POST /code whose events are read as they come."""

    def __init__(self, url: str, body: dict[str, Any]):
        self.url, self.body = url, body
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async with aiohttp.ClientSession() as http:
            async with http.post(self.url + "/code", json=self.body) as resp:
                buffer = ""
                async for chunk in resp.content.iter_any():
                    buffer += chunk.decode()
                    *blocks, buffer = buffer.split("\n\n")
                    self.events += parse_sse("\n\n".join(blocks) + "\n\n") if blocks else []
                    self.changed.set()

    async def until(self, predicate) -> dict[str, Any]:
        async with asyncio.timeout(60):
            while True:
                if found := next((e for e in self.events if predicate(e)), None):
                    return found
                self.changed.clear()
                await self.changed.wait()

    @property
    def run_id(self) -> str:
        return self.events[0]["run_id"]

    async def end(self) -> list[dict[str, Any]]:
        async with asyncio.timeout(120):
            await self.task
        return self.events


def running(marker: str):
    return lambda e: e["type"] == "tool_call" and e["state"] == "complete" and marker in json.dumps(e["input"])


async def wait_for_process(marker: str) -> None:
    async with asyncio.timeout(30):
        while not _processes(marker):
            await asyncio.sleep(0.05)


async def test_a_model_error_mid_run_publishes_the_changes_as_a_draft(pool, make_repo, sandbox_root):
    repo = make_repo(BUGGY)
    script = [WRITE_FIX, http_error(400, message="messages: something the API refused")]
    async with stack(pool, script) as s:
        follow = Following(s.url, {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"})
        events = await follow.end()
        _, record = await request(s.url, "GET", f"/runs/{follow.run_id}")
    assert of_type(events, "error")[0]["reason"] == "model"
    pr = of_type(events, "pull_request")[0]
    assert pr["draft"] is True and events[-1]["status"] == "error" and events[-1]["pull_request_url"] == pr["url"]
    assert git(repo, "show", f"{pr['head']}:calc.py") == FIXED.rstrip("\n")
    assert "the run failed: the model API failed" in pull_request_record(pr["url"])["body"]
    # Kept with the run as well, marked published: a retry can start from it.
    assert record["kept"]["files"] == ["calc.py"] and record["kept"]["published_url"] == pr["url"]
    assert of_type(events, "usage") and sandboxes(sandbox_root) == []


async def test_a_sandbox_server_killed_mid_run_publishes_its_last_checkpoint(pool, make_repo, sandbox_root):
    marker = unique_marker()
    repo = make_repo(BUGGY)
    script = [WRITE_FIX, turn(tool_use("sandbox_exec", {"command": f"sleep {marker}"}))]
    conn = pool.connections["sandbox"]
    async with stack(pool, script) as s:
        follow = Following(s.url, {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"})
        await follow.until(running(marker))
        await wait_for_process(marker)
        server_pid = next(p for p in _processes("servers.sandbox") if str(sandbox_root).encode()
                          in open(f"/proc/{p}/environ", "rb").read())
        os.kill(int(server_pid), signal.SIGKILL)
        events = await follow.end()
    async with asyncio.timeout(30):
        while conn.state != "up":
            await asyncio.sleep(0.05)
    assert "sandbox" in of_type(events, "error")[0]["message"]
    assert any("as of the agent's last turn" in e.get("message", "") for e in of_type(events, "status"))
    pr = of_type(events, "pull_request")[0]
    assert pr["draft"] is True and git(repo, "show", f"{pr['head']}:calc.py") == FIXED.rstrip("\n")


def forge_goes_away(repo: Path, away: Path, then: str = "Fixed add().") -> Any:
    """A scripted step that moves the repository away, so that the forge cannot serve it from then on."""

    def step(_: dict) -> Any:
        shutil.move(repo, away)
        return turn(text(then))

    return step


async def test_a_forge_that_fails_keeps_the_changes_for_publish_and_retry(pool, make_repo, tmp_path):
    repo = make_repo(BUGGY)
    away = tmp_path / "away"
    script = [WRITE_FIX, forge_goes_away(repo, away)]
    async with stack(pool, script) as s:
        follow = Following(s.url, {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"})
        events = await follow.end()
        run_id = follow.run_id
        kept = of_type(events, "kept")[0]
        assert events[-1]["status"] == "error" and events[-1]["kept"] is True and not of_type(events, "pull_request")
        assert kept["files"] == ["calc.py"] and kept["publish_url"] == f"/runs/{run_id}/publish"
        status, answer = await request(s.url, "POST", f"/runs/{run_id}/publish")
        assert status == 409 and "the forge refused" in answer["error"] and "still kept" in answer["error"]

        shutil.move(away, repo)  # the forge is back
        status, answer = await request(s.url, "POST", f"/runs/{run_id}/publish")
        assert status == 200 and answer["draft"] is True
        assert pull_request_record(answer["pull_request_url"])["draft"] is True
        head = pull_request_record(answer["pull_request_url"])["head"]
        assert git(repo, "show", f"{head}:calc.py") == FIXED.rstrip("\n")
        status, again = await request(s.url, "POST", f"/runs/{run_id}/publish")
        assert status == 409 and "already published" in again["error"]
        _, record = await request(s.url, "GET", f"/runs/{run_id}")
        assert record["pull_request_url"] == answer["pull_request_url"]


async def test_retry_starts_a_new_run_from_the_kept_changes(pool, make_repo):
    repo = make_repo(BUGGY)
    script = [WRITE_FIX, http_error(400, message="refused"),
              turn(tool_use("sandbox_read_file", {"path": "calc.py"})), turn(text("It was done already."))]
    async with stack(pool, script) as s:
        first = Following(s.url, {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"})
        await first.end()
        status, answer = await request(s.url, "POST", f"/runs/{first.run_id}/retry")
        assert status == 202 and answer["retries"] == first.run_id
        async with aiohttp.ClientSession() as http:
            async with http.get(s.url + answer["events_url"]) as resp:
                events = parse_sse(await resp.text())
    assert events[0]["resumes"] == first.run_id
    brief = s.api.requests[2]["messages"][0]["content"]
    brief = brief if isinstance(brief, str) else brief[0]["text"]
    assert f"This continues run {first.run_id}" in brief
    # The new sandbox holds the kept change before any agent wrote.
    assert "return a + b" in of_type(events, "tool_result")[0]["content"]
    pr = of_type(events, "pull_request")[0]
    assert events[-1]["status"] == "success" and git(repo, "show", f"{pr['head']}:calc.py") == FIXED.rstrip("\n")


@pytest.mark.parametrize("changes", ["keep", "discard"])
async def test_cancel_keeps_the_changes_as_a_draft_or_discards_them(pool, make_repo, sandbox_root, changes):
    marker = unique_marker()
    repo = make_repo(BUGGY)
    script = [WRITE_FIX, turn(tool_use("sandbox_exec", {"command": f"sleep {marker}"}))]
    async with stack(pool, script) as s:
        follow = Following(s.url, {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"})
        await follow.until(running(marker))
        status, answer = await request(s.url, "POST", f"/runs/{follow.run_id}/cancel", {"changes": changes})
        events = await follow.end()
    assert status == 200 and answer["status"] == "cancelled" and answer["changes"] == changes
    error = of_type(events, "error")[0]
    assert error["reason"] == "cancelled" and error["changes"] == changes
    assert events[-1]["status"] == "cancelled" and of_type(events, "usage")
    prs = of_type(events, "pull_request")
    if changes == "keep":
        assert prs[0]["draft"] is True and answer["pull_request_url"] == prs[0]["url"]
        assert git(repo, "show", f"{prs[0]['head']}:calc.py") == FIXED.rstrip("\n")
    else:
        assert not prs and answer["kept"] is None
        assert git(repo, "branch", "--list", "tb/*") == ""
    async with asyncio.timeout(20):
        while sandboxes(sandbox_root) or _processes(marker):
            await asyncio.sleep(0.05)


async def test_cancel_publish_and_retry_say_what_is_wrong(pool, make_repo):
    async with stack(pool, [turn(text("Nothing to do."))]) as s:
        done = Following(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Look", "mode": "single"})
        await done.end()
        run = f"/runs/{done.run_id}"
        for body, message in [({"changes": "maybe"}, '{"changes": "discard"}'), ({"changes": "keep", "x": 1}, "keep"),
                              ([1], "keep")]:
            status, answer = await request(s.url, "POST", run + "/cancel", body)
            assert status == 400 and message in answer["error"], body
        assert (await request(s.url, "POST", run + "/cancel", {"changes": "keep"}))[0] == 409
        status, answer = await request(s.url, "POST", run + "/publish")
        assert status == 404 and "kept no changes" in answer["error"]
        status, answer = await request(s.url, "POST", run + "/retry")
        assert status == 404 and "kept no changes" in answer["error"]
        for action in ("cancel", "publish", "retry", "messages"):
            status, answer = await request(s.url, "POST", f"/runs/run_0000000000000000/{action}", {"text": "x"})
            assert status == 404 and "no run" in answer["error"], action


async def test_a_message_from_the_user_reaches_the_agent_at_its_next_turn(pool, make_repo):
    marker = unique_marker()
    script = [turn(tool_use("sandbox_exec", {"command": f"sleep {marker}"})), turn(text("Understood, stopping."))]
    async with stack(pool, script) as s:
        follow = Following(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Look around", "mode": "single"})
        await follow.until(running(marker))
        run_id = follow.run_id
        for bad, expected in [({"text": ""}, 400), ({"text": 5}, 400), ({"text": "x" * 20_001}, 413),
                              ({"text": "bell\x07"}, 400), ({"text": "a", "b": 1}, 400)]:
            got, _ = await request(s.url, "POST", f"/runs/{run_id}/messages", bad)
            assert got == expected, bad
        # The run's record shows what it has spent so far, while it runs.
        _, record = await request(s.url, "GET", f"/runs/{run_id}")
        assert record["status"] == "running" and record["usage"]["cost_usd"] > 0
        assert record["usage"]["by_role"]["agent"]["input_tokens"] == record["usage"]["input_tokens"] > 0
        status, answer = await request(s.url, "POST", f"/runs/{run_id}/messages",
                                       {"text": "Do not change anything; just stop."})
        assert status == 202 and answer["accepted"] is True
        for k in range(9):
            assert (await request(s.url, "POST", f"/runs/{run_id}/messages", {"text": f"also {k}"}))[0] == 202
        status, answer = await request(s.url, "POST", f"/runs/{run_id}/messages", {"text": "one too many"})
        assert status == 409 and "10 messages already wait" in answer["error"]
        await wait_for_process(marker)
        for pid in _processes(marker):
            os.kill(int(pid), signal.SIGKILL)
        events = await follow.end()
        status, _ = await request(s.url, "POST", f"/runs/{run_id}/messages", {"text": "too late"})
        assert status == 409
    said = of_type(events, "user_message")
    assert [(e["agent"], e["text"]) for e in said] == [("agent", "Do not change anything; just stop."),
                                                       *(("agent", f"also {k}") for k in range(9))]
    sent = json.dumps(s.api.requests[1]["messages"][-1])
    assert "Do not change anything; just stop." in sent
    # Handed over between the tool's result and the next model call.
    kinds = [e["type"] for e in events]
    assert kinds.index("tool_result") < kinds.index("user_message") < kinds.index("text")


async def test_a_publish_that_stopped_after_its_commit_is_finished_later_without_a_second_commit(pool, make_repo):
    repo = make_repo(BUGGY)

    def base_goes_away(_: dict) -> Any:
        git(repo, "symbolic-ref", "HEAD", "refs/heads/gone")  # the commit is made; the pull request has no base
        return turn(text("Fixed add()."))

    async with stack(pool, [WRITE_FIX, base_goes_away]) as s:
        follow = Following(s.url, {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"})
        events = await follow.end()
        assert of_type(events, "kept") and events[-1]["status"] == "error"
        branch = git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/tb/")
        commit = git(repo, "rev-parse", branch)
        git(repo, "symbolic-ref", "HEAD", "refs/heads/main")
        # Three at once: one publishes, the others are told it is under way.
        answers = await asyncio.gather(*(request(s.url, "POST", f"/runs/{follow.run_id}/publish")
                                         for _ in range(3)))
    assert sorted(status for status, _ in answers) == [200, 409, 409]
    assert all("being published" in a["error"] for status, a in answers if status == 409)
    published = next(a for status, a in answers if status == 200)
    assert pull_request_record(published["pull_request_url"])["head"] == branch
    assert git(repo, "rev-parse", branch) == commit  # the commit made during the run, not a second one


async def test_a_cancel_while_the_sandbox_is_set_up_ends_the_run_at_once(pool, make_repo, sandbox_root):
    marker = unique_marker()
    async with stack(pool, []) as s:
        follow = Following(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Fix add()", "mode": "single",
                                   "setup": f"sleep {marker}"})
        await follow.until(lambda e: e["type"] == "status" and e["stage"] == "sandbox")
        await wait_for_process(marker)
        status, answer = await request(s.url, "POST", f"/runs/{follow.run_id}/cancel")
        events = await follow.end()
    assert status == 200 and answer["status"] == "cancelled"
    assert of_type(events, "error")[0]["message"] == "the run was cancelled before its agents started"
    assert events[-1]["status"] == "cancelled" and not of_type(events, "sandbox")
    async with asyncio.timeout(60):  # the setup's sandbox goes with the call that made it
        while sandboxes(sandbox_root) or _processes(marker):
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("changeset, said", [
    ({"files": [], "deleted": ["../outside"]}, "no path inside the repository"),
    ({"files": [{"path": "/etc/passwd", "mode": "100644", "content_base64": ""}], "deleted": []}, "no path inside"),
    ({"files": [{"path": ".git/hooks/pre-commit", "mode": "100755", "content_base64": ""}], "deleted": []},
     "no path inside"),
    ({"files": [{"path": "a/./b", "mode": "100644", "content_base64": ""}], "deleted": []}, "no path inside"),
    ({"files": [{"path": "x", "mode": "100644", "content_base64": "$(reboot)"}], "deleted": []}, "not base64"),
])
async def test_kept_changes_no_export_makes_are_refused_before_a_retry_runs_anything(changeset, said):
    with pytest.raises(ToolFailed, match=re.escape(said)):
        resume._scripts(changeset)


async def test_a_service_that_dies_mid_run_leaves_its_last_checkpoint_for_publish(pool, make_repo, tmp_path):
    marker = unique_marker()
    repo = make_repo(BUGGY)
    script = [WRITE_FIX, turn(tool_use("sandbox_exec", {"command": f"sleep {marker}"}))]
    store = SQLiteRunStore(tmp_path / "live" / "runs.sqlite3")
    await store.open()
    async with stack(pool, script) as s:
        async with serve(s.services, store) as url:
            follow = Following(url, {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"})
            await follow.until(running(marker))
            async with asyncio.timeout(30):
                while await store.checkpoint_of(follow.run_id) is None:
                    await asyncio.sleep(0.05)
            # What a service killed now leaves on disk: the store as it is, the run in flight.
            crashed = tmp_path / "crashed" / "runs.sqlite3"
            crashed.parent.mkdir(mode=0o700)
            with sqlite3.connect(crashed) as copy:
                store.db.backup(copy)
                copy.execute("UPDATE replicas SET expires = 0")  # and, later, its lease has run out
            await request(url, "POST", f"/runs/{follow.run_id}/cancel", {"changes": "discard"})
            await follow.end()
        s.api.problems.clear()  # the unused steps are not this test's subject
        restarted = SQLiteRunStore(crashed)
        await restarted.open()
        manager = RunManager(s.services, restarted)
        assert await manager.recover() == [follow.run_id]
        assert await restarted.checkpoint_of(follow.run_id) is None  # now kept work, for publish and retry
        async with serve(s.services, restarted) as url:
            _, record = await request(url, "GET", f"/runs/{follow.run_id}")
            status, answer = await request(url, "POST", f"/runs/{follow.run_id}/publish")
    assert record["status"] == "interrupted" and record["kept"]["files"] == ["calc.py"]
    assert record["kept"]["reason"] == "the service stopped while this run was in flight"
    assert status == 200 and answer["draft"] is True
    head = pull_request_record(answer["pull_request_url"])["head"]
    assert git(repo, "show", f"{head}:calc.py") == FIXED.rstrip("\n")
