"""How a run ends when things go wrong: tool errors, limits, the model API, the client, the servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import replace

import aiohttp
import anthropic
import pytest

from orchestrator.model import AnthropicModel
from orchestrator.run import Services
from tests.conftest import git, unique_marker
from tests.fakes.messages_api import http_error, stream_error, text, tool_use, turn

from .conftest import API_KEY, FAST, GITHUB_TOKEN, free_port, of_type, post_code, serve, stack
from .test_run import BUGGY, fix_script

DISCONNECT_MARK = unique_marker()
CRASH_MARK = unique_marker()
pytestmark = pytest.mark.asyncio(loop_scope="session")


def sandboxes(root) -> list:
    return list(root.glob("*/sbx-*"))


async def test_an_unknown_tool_and_a_failing_tool_are_results_the_model_reads(pool, make_repo, sandbox_root):
    repo = make_repo(BUGGY)
    script = [
        turn(tool_use("sandbox_teleport", {"to": "mars"}),
             tool_use("sandbox_edit_file", {"path": "calc.py", "old_text": "nope", "new_text": "x"})),
        turn(text("Nothing I can do.")),
    ]
    async with stack(pool, script) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Try things.", "mode": "single"})
    results = of_type(events, "tool_result")
    assert [r["is_error"] for r in results] == [True, True]
    assert "unknown tool 'sandbox_teleport'" in results[0]["content"] and "not found" in results[1]["content"]
    fed_back = s.api.requests[1]["messages"][-1]["content"]
    assert [b["is_error"] for b in fed_back] == [True, True]
    assert events[-1]["status"] == "no_changes"
    assert sandboxes(sandbox_root) == []


async def test_changes_left_unpublished_are_published_by_the_run(pool, make_repo):
    repo = make_repo(BUGGY)
    script = [
        turn(tool_use("sandbox_edit_file", {"path": "calc.py", "old_text": "a - b", "new_text": "a + b"})),
        turn(text("Fixed the sign in add().")),
    ]
    async with stack(pool, script) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Fix add() in calc.py",
                                               "mode": "single"})
    pr = of_type(events, "pull_request")[0]
    assert events[-1]["status"] == "success" and pr["draft"] is False
    assert pr["head"].startswith("tb/fix-add-in-calc-py-")
    assert git(repo, "show", f"{pr['head']}:calc.py").endswith("return a + b")
    record = json.loads(open(pr["url"].removeprefix("file://")).read())
    assert record["title"] == "Fix add() in calc.py" and "Fixed the sign" in record["body"]


async def test_the_turn_limit_stops_the_run_and_publishes_a_draft(pool, make_repo):
    repo = make_repo(BUGGY)
    script = [turn(tool_use("sandbox_edit_file", {"path": "calc.py", "old_text": "a - b", "new_text": "a + b"})),
              turn(tool_use("sandbox_exec", {"command": "true"}))]
    async with stack(pool, script, limits=replace(FAST, max_turns=2)) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"})
    error = of_type(events, "error")[0]
    assert error["limit"] == "turns" and "TB_MAX_TURNS" in error["message"]
    assert of_type(events, "pull_request")[0]["draft"] is True
    assert events[-1]["status"] == "limit" and events[-1]["limit"] == "turns"


async def test_the_token_limit_stops_the_run(pool, make_repo):
    script = [turn(tool_use("sandbox_exec", {"command": "true"}), input_tokens=900, output_tokens=200)]
    async with stack(pool, script, limits=replace(FAST, max_tokens=1000)) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Go", "mode": "single"})
    assert of_type(events, "error")[0]["limit"] == "tokens"
    assert events[-1]["status"] == "limit"


async def test_the_wall_clock_limit_interrupts_a_long_tool_call(pool, make_repo, sandbox_root):
    script = [turn(tool_use("sandbox_exec", {"command": "sleep 120"}))]
    async with stack(pool, script, limits=replace(FAST, run_seconds=3)) as s:
        async with asyncio.timeout(30):
            _, events, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Go", "mode": "single"})
    assert of_type(events, "error")[0]["limit"] == "run_seconds"
    assert events[-1]["status"] == "limit"
    assert sandboxes(sandbox_root) == []


async def test_a_tool_call_past_its_time_limit_is_an_error_result(pool, make_repo):
    script = [turn(tool_use("sandbox_exec", {"command": "sleep 60"})), turn(text("It hung."))]
    async with stack(pool, script, limits=replace(FAST, tool_seconds=1)) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Go", "mode": "single"})
    result = of_type(events, "tool_result")[0]
    assert result["is_error"] and "within 1 s" in result["content"]
    assert events[-1]["status"] == "no_changes"


async def test_an_overloaded_api_is_retried_by_the_sdk_and_in_the_stream(pool, make_repo):
    script = [http_error(529), turn(tool_use("sandbox_exec", {"command": "true"})),
              stream_error("overloaded_error", partial_text="Let me"), turn(text("Done."))]
    async with stack(pool, script) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Go", "mode": "single"})
    retry = [e for e in of_type(events, "status") if e.get("stage") == "retry"]
    assert len(retry) == 1 and "overloaded" in retry[0]["message"]
    assert events[-1]["status"] == "no_changes"
    assert not of_type(events, "error")


async def test_an_overload_the_sdk_already_retried_is_not_retried_again(pool, make_repo):
    # The SDK makes 1 + max_retries requests for an HTTP 529; a retry of our own on top would make 3 times as many.
    script = [http_error(529), http_error(529), http_error(529)]
    async with stack(pool, script, max_retries=2) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Go", "mode": "single"})
        assert len(s.api.requests) == 3
    assert of_type(events, "error")[0]["reason"] == "model"
    assert events[-1]["status"] == "error"


async def test_a_model_api_that_is_down_ends_the_run_with_an_error(pool, make_repo, sandbox_root):
    dead = f"http://127.0.0.1:{free_port()}"
    client = anthropic.AsyncAnthropic(base_url=dead, api_key=API_KEY, max_retries=0)
    async with stack(pool, []) as s:
        services = Services(s.services.settings, pool, AnthropicModel(client, "claude-sonnet-test", 1000))
        async with serve(services) as url:
            _, events, _ = await post_code(url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Go", "mode": "single"})
    error = of_type(events, "error")[0]
    assert error["reason"] == "model" and "model API" in error["message"]
    assert events[-1]["type"] == "completion" and events[-1]["status"] == "error"
    assert sandboxes(sandbox_root) == []


async def test_a_client_that_disconnects_with_on_disconnect_cancel_cancels_its_run(pool, make_repo, sandbox_root):
    script = [turn(tool_use("sandbox_exec", {"command": f"sleep {DISCONNECT_MARK}"}))]
    async with stack(pool, script) as s:
        async with aiohttp.ClientSession() as http:
            body = {"repoUrl": str(make_repo(BUGGY)), "prompt": "Go", "mode": "single", "on_disconnect": "cancel"}
            async with http.post(s.url + "/code", json=body) as resp:
                async with asyncio.timeout(30):
                    async for line in resp.content:
                        if b'"state":"complete"' in line:
                            break
        # The unused steps are not this test's subject.
        s.api.problems.clear()
        async with asyncio.timeout(20):
            while sandboxes(sandbox_root) or _processes(DISCONNECT_MARK):
                await asyncio.sleep(0.05)


def _processes(marker: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and marker.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                found.append(pid)
        except OSError:
            pass
    return found


async def test_two_runs_at_once_on_one_repository_both_open_pull_requests(pool, make_repo):
    repo = make_repo(BUGGY)
    scripts = {"first": fix_script("tb/first"), "second": fix_script("tb/second")}
    progress = {"first": 0, "second": 0}

    def step(body: dict) -> object:
        which = "first" if "(first)" in json.dumps(body["messages"][0]) else "second"
        progress[which] += 1
        return scripts[which][progress[which] - 1]

    async with stack(pool, [step] * 14) as s:
        runs = await asyncio.gather(*(post_code(s.url, {"repoUrl": str(repo), "prompt": f"Fix add() ({name})",
                                                           "mode": "single"})
                                      for name in scripts))
    assert [r[1][-1]["status"] for r in runs] == ["success", "success"]
    assert git(repo, "show", "tb/first:calc.py") == git(repo, "show", "tb/second:calc.py")
    assert git(repo, "show", "main:calc.py").endswith("a - b")


async def test_secrets_are_redacted_even_when_the_model_writes_them(pool, make_repo, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
    monkeypatch.setenv("GITHUB_TOKEN", GITHUB_TOKEN)
    script = [turn(text(f"The key is {API_KEY} and the token {GITHUB_TOKEN}; also ghp_{'z' * 36}."))]
    async with stack(pool, script) as s:
        _, events, raw = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Leak", "mode": "single"})
    streamed = "".join(e["text"] for e in of_type(events, "text"))
    assert streamed == "The key is [redacted] and the token [redacted]; also [redacted]."
    assert API_KEY[:20] not in raw and GITHUB_TOKEN[:20] not in raw and "z" * 20 not in raw


@pytest.mark.parametrize("body, status, message", [
    ("not json", 400, "not JSON"),
    ([1, 2], 400, "JSON object"),
    ({"prompt": "x"}, 400, "repoUrl"),
    ({"repoUrl": 5, "prompt": "x"}, 400, "repoUrl"),
    ({"repoUrl": "octo/repo"}, 400, "prompt"),
    ({"repoUrl": "octo/repo", "prompt": "   "}, 400, "prompt"),
    ({"repoUrl": "octo/repo", "prompt": "x" * 20_001}, 413, "TB_MAX_PROMPT_CHARS"),
    ({"repoUrl": "ftp://example.com/x", "prompt": "x"}, 400, "repoUrl must be"),
    ({"repoUrl": "https://gitlab.com/o/r", "prompt": "x"}, 400, "repoUrl must be"),
    ({"repoUrl": "/nonexistent/repo", "prompt": "x"}, 400, "not a git repository"),
])
async def test_bad_requests_get_a_json_error_before_any_stream(pool, body, status, message):
    async with stack(pool, []) as s:
        code, answer, _ = await post_code(s.url, body)
    assert code == status and message in answer["error"]


async def test_health_reports_each_mcp_server(pool):
    async with stack(pool, []) as s:
        async with aiohttp.ClientSession() as http:
            async with http.get(s.url + "/health") as resp:
                health = await resp.json()
    assert health["status"] == "healthy"
    assert health["servers"]["sandbox"]["state"] == "up" and health["servers"]["github"]["tools"] == 13


async def test_a_crashed_server_ends_its_run_and_is_restarted(pool, make_repo, sandbox_root):
    script = [turn(tool_use("sandbox_exec", {"command": f"sleep {CRASH_MARK}"}))]
    conn = pool.connections["sandbox"]
    restarts = conn.restarts
    async with stack(pool, script) as s:
        run = asyncio.create_task(post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Go",
                                                    "mode": "single"}))
        async with asyncio.timeout(30):
            while not _processes(CRASH_MARK):
                await asyncio.sleep(0.05)
        server_pid = next(p for p in _processes("servers.sandbox") if str(sandbox_root).encode()
                          in open(f"/proc/{p}/environ", "rb").read())
        os.kill(int(server_pid), signal.SIGKILL)
        _, events, _ = await run
    error = of_type(events, "error")[0]
    assert "sandbox" in error["message"] and events[-1]["status"] == "error"
    async with asyncio.timeout(30):
        while conn.state != "up" or conn.restarts == restarts:
            await asyncio.sleep(0.05)
    # The jail died with its server: nothing it ran is left behind.
    async with asyncio.timeout(10):
        while _processes(CRASH_MARK):
            await asyncio.sleep(0.05)


async def test_a_turn_cut_at_the_output_limit_runs_none_of_its_calls_and_the_model_goes_on(pool, make_repo):
    repo = make_repo(BUGGY)
    script = [turn(text("I will edit"), tool_use("sandbox_write_file", {"path": "calc.py", "content": "trunc"}),
                   stop_reason="max_tokens"),
              turn(text("Nothing more to do."))]
    async with stack(pool, script) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Go", "mode": "single"})
    told = s.api.requests[1]["messages"][-1]["content"]
    assert told[0]["is_error"] and "cut off" in told[0]["content"] and "cut off" in told[-1]["text"]
    assert not of_type(events, "tool_result") and events[-1]["status"] == "no_changes"
