"""Real repositories get an environment, and output streams live: the `setup` a request gives, the `environment`
event and what the agents are told of it, `output` events while a tool runs, and a pull request body that states
only the test results the sandbox saw.

The tests marked `needs_sandbox_setup` need the sandbox server's setup phase and live output (create_sandbox's
`setup` and `environment`, progress notifications from exec); they are expected to fail until it is there. The
plumbing of progress into `output` events is proved meanwhile with an MCP server built here, over real stdio.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import os
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import anthropic
import pytest
import pytest_asyncio
from mcp import StdioServerParameters

from common.redact import Redactor
from orchestrator.agent import AgentResult, run_agent
from orchestrator.budget import Budget
from orchestrator.cli import Terminal
from orchestrator.events import EventLog
from orchestrator.mcp_pool import ServerSpec, ToolPool
from orchestrator.model import AnthropicModel
from orchestrator.output import OUTPUT_EVENT_CHARS, OUTPUT_INTERVAL_S, LiveOutput
from orchestrator.prompts import environment_note
from orchestrator.roles import Role, RoleTools
from orchestrator.tools import RunTools
from tests.fakes.messages_api import messages_api, text, tool_use, turn

from .conftest import API_KEY, of_type, parse_sse, post_code, stack
from .test_run import BUGGY, TESTS
from .test_team import PLAN, coder, planner, record, reviewer

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _sandbox_has_setup() -> bool:
    from servers.sandbox.base import SandboxInfo

    live_output = importlib.util.find_spec("servers.sandbox.progress") is not None
    return "environment" in SandboxInfo.model_fields and live_output


needs_sandbox_setup = pytest.mark.xfail(
    not _sandbox_has_setup(), strict=True,
    reason="needs the sandbox server's setup phase and live output (servers/sandbox: create_sandbox(setup=...), "
           "SandboxInfo.environment, progress notifications from exec)")

HELLO = """mkdir -p /env/bin
printf '#!/bin/sh\\necho hello from the environment\\n' > /env/bin/hello
chmod +x /env/bin/hello
echo 'export PATH=/env/bin:$PATH' >> /env/profile
echo SETUP-RAN
"""
FAILING_SETUP = "echo preparing the environment\nexit 3\n"

# An MCP server named like the sandbox one, whose `exec` prints the JSON list `command` as progress messages, one
# piece each; "WAIT:<key>" waits until `release(key)` is called, so a test decides when the call may end.
PROGRESS_SERVER = '''
import json

import anyio
from pydantic import BaseModel
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("sandbox")
releases = {}


class Ran(BaseModel):
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool


@server.tool(name="exec")
async def run(sandbox_id: str, command: str, ctx: Context, read_only: bool = False) -> Ran:
    """Print each piece of the JSON list `command` as a progress message; wait at "WAIT:<key>"."""
    printed = []
    for piece in json.loads(command):
        if piece.startswith("WAIT:"):
            await releases.setdefault(piece[5:], anyio.Event()).wait()
        else:
            await ctx.report_progress(len(printed), None, piece)
            printed.append(piece)
    return Ran(exit_code=0, stdout="".join(printed), stderr="", timed_out=False)


@server.tool()
async def release(key: str) -> str:
    """Let the exec waiting at "WAIT:<key>" go on."""
    releases.setdefault(key, anyio.Event()).set()
    return "released"


server.run("stdio")
'''


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def progress_pool() -> AsyncIterator[ToolPool]:
    """The server above over stdio: the real SDK on both sides, progress as real `notifications/progress`."""
    pool = ToolPool([ServerSpec("sandbox", StdioServerParameters(command=sys.executable, args=["-c", PROGRESS_SERVER],
                                                                 env={"PATH": os.environ["PATH"]}))])
    await pool.start(wait_s=60)
    assert pool.health()["sandbox"]["state"] == "up", pool.health()
    yield pool
    await pool.close()


def run_tools(pool: ToolPool, output: LiveOutput) -> RunTools:
    return RunTools(pool, "sbx_test", "/repo", "0" * 40, timeout_s=30, output=output)


async def agent_run(pool: ToolPool, script: list, events: EventLog, on_event=None) -> tuple[list[dict], RunTools]:
    """The real agent loop over the scripted model and `pool`, its events merged with the live output as a run's
    are; `on_event` sees each event as it arrives."""
    output = LiveOutput(events, Redactor())
    tools = run_tools(pool, output)
    seen: list[dict] = []
    async with messages_api(script) as api:
        client = anthropic.AsyncAnthropic(base_url=api.url, api_key=API_KEY, max_retries=0)
        model = AnthropicModel(client, "claude-sonnet-test", 1000, 0, 0)
        coder = Role("coder", "system", frozenset({"sandbox_exec"}), max_turns=5)
        loop = run_agent(model, RoleTools(tools, coder), coder.system, "brief", Budget(10**6, time.monotonic() + 60),
                         events, AgentResult(), max_turns=coder.max_turns, redact=output.redact, agent=coder.name)
        async with asyncio.timeout(30):
            async for event in output.merged(loop):
                seen.append(event)
                if on_event:
                    await on_event(event)
    return seen, tools


def pieces(*items: str) -> dict:
    return {"command": json.dumps(list(items))}


async def test_a_tools_output_reaches_the_stream_while_the_call_is_still_running(progress_pool):
    async def release_once_output_shows(event: dict) -> None:
        if event["type"] == "output":
            await progress_pool.call("sandbox", "release", {"key": "live"}, 10)

    script = [turn(tool_use("sandbox_exec", pieces("compiling\n", "WAIT:live", "linking\n"), id="toolu_live")),
              turn(text("Built."))]
    events, tools = await agent_run(progress_pool, script, EventLog("run_live"), release_once_output_shows)
    kinds = [(e["type"], e.get("state")) for e in events if e["type"] in ("tool_call", "output", "tool_result")]
    # The call could only end after its first output was in the stream.
    call = kinds.index(("tool_call", "complete"))
    assert kinds[call + 1:] == [("output", None), ("output", None), ("tool_result", None)]
    outputs = of_type(events, "output")
    assert [o["text"] for o in outputs] == ["compiling\n", "linking\n"]
    assert all(o["tool"] == "exec" and o["id"] == "toolu_live" and o["agent"] == "coder" for o in outputs)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    (seen,) = tools.commands
    assert (seen.agent, seen.command, seen.exit_code, seen.timed_out) == (
        "coder", pieces("compiling\n", "WAIT:live", "linking\n")["command"], 0, False)
    assert seen.tail.split() == ["compiling", "linking"] and seen.duration_s > 0


async def test_chatty_output_is_joined_into_a_few_events_a_second_each_within_its_size_limit(progress_pool):
    flood = [f"<{i:03d}>" + "x" * 995 for i in range(120)]  # 120 000 characters at once
    chatter = [f"line {i}\n" for i in range(40)]
    script = [turn(tool_use("sandbox_exec", pieces(*flood), id="toolu_flood"),
                   tool_use("sandbox_exec", pieces(*chatter), id="toolu_chatter")), turn(text("Done."))]
    events, _ = await agent_run(progress_pool, script, EventLog("run_flood"))
    for call, sent in (("toolu_flood", flood), ("toolu_chatter", chatter)):
        outputs = [e for e in of_type(events, "output") if e["id"] == call]
        span = outputs[-1]["ts"] - outputs[0]["ts"]
        assert 1 <= len(outputs) <= 2 + span / OUTPUT_INTERVAL_S, (call, len(outputs), span)
        assert all(len(o["text"]) <= OUTPUT_EVENT_CHARS for o in outputs)
        assert outputs[0]["text"].startswith(sent[0]) and outputs[-1]["text"].endswith(sent[-1])
    flooded = "".join(e["text"] for e in of_type(events, "output") if e["id"] == "toolu_flood")
    assert "characters dropped" in flooded
    assert "".join(e["text"] for e in of_type(events, "output") if e["id"] == "toolu_chatter") == "".join(chatter)


async def test_a_secret_split_across_two_pieces_of_output_is_still_redacted(progress_pool):
    token = "ghp_" + "S" * 36

    async def release_once_output_shows(event: dict) -> None:
        if event["type"] == "output":
            await progress_pool.call("sandbox", "release", {"key": "secret"}, 10)

    script = [turn(tool_use("sandbox_exec", pieces(f"using {token[:12]}", "WAIT:secret", f"{token[12:]} now\n"),
                            id="toolu_secret")), turn(text("Done."))]
    events, _ = await agent_run(progress_pool, script, EventLog("run_secret"), release_once_output_shows)
    shown = "".join(e["text"] for e in of_type(events, "output"))
    assert len(of_type(events, "output")) == 2
    assert shown == "using [redacted] now\n"


async def test_a_run_cut_short_forgets_the_events_it_never_sent_so_its_numbering_has_no_gap(progress_pool):
    events = EventLog("run_cut")
    output = LiveOutput(events, Redactor())
    tools = run_tools(progress_pool, output)
    seen: list[dict] = []
    shown, called = asyncio.Event(), asyncio.Event()

    async def run() -> AsyncIterator[dict]:
        yield events("status", stage="work", message="working")
        await tools.call("sandbox_exec", pieces("first\n", "WAIT:cut", "second\n"), "toolu_cut")
        called.set()
        yield events("status", stage="done", message="ran it")

    async def follow() -> None:
        async with contextlib.aclosing(output.merged(run())) as stream:
            async for event in stream:
                seen.append(event)
                if event["type"] == "output":
                    shown.set()
                    await asyncio.Event().wait()  # a reader that stalls while the run goes on, until cancelled

    following = asyncio.create_task(follow())
    async with asyncio.timeout(30):
        await shown.wait()
        await progress_pool.call("sandbox", "release", {"key": "cut"}, 10)
        await called.wait()
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
    assert [e["type"] for e in seen] == ["status", "output"]
    # "second" and the last status were made but never sent: the next event follows the last one sent.
    assert events("completion", status="cancelled")["seq"] == 3


@pytest.mark.parametrize("setup, status, named", [
    (5, 400, "setup must be a string"),
    (["echo"], 400, "setup must be a string"),
    ("x" * 20_001, 413, "setup is 20001 characters, over the limit of 20000"),
    ("pip install .\x00", 400, "setup holds the control character U+0000 (NUL) at offset 13"),
    ("echo \x1b[31mred", 400, "setup holds the control character U+001B (ESC) at offset 5"),
])
async def test_a_setup_that_is_not_text_within_its_limit_is_refused_naming_it(pool, make_repo, setup, status, named):
    async with stack(pool, []) as s:
        code, answer, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Fix add()",
                                                  "setup": setup})
    assert code == status and named in answer["error"]


async def test_the_run_event_says_a_setup_was_given_but_never_carries_its_text(pool, make_repo):
    script = "echo one\r\n\techo two\n"
    async with stack(pool, [turn(text("Nothing to change.")), turn(text("Nothing to change."))]) as s:
        code, events, raw = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Look",
                                                    "mode": "single", "setup": script})
        _, plain, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Look", "mode": "single"})
    assert code == 200 and events[0]["setup"] is True and plain[0]["setup"] is False
    assert "echo two" not in json.dumps(events[0])


async def test_the_briefs_say_what_the_environment_holds_and_that_nothing_can_be_installed():
    ready = environment_note({"status": "ready", "source": "detected", "installed": [
        "python: /env/python (2 packages: pytest 8.3.2, tinydep 1.0)"], "test_commands": ["python -m pytest"]})
    assert "python: /env/python (2 packages: pytest 8.3.2, tinydep 1.0)" in ready
    assert "`python -m pytest`" in ready and "no network" in ready and "pip or npm install fails" in ready
    failed = environment_note({"status": "failed", "error": "setup failed (exit 2): no matching distribution"})
    assert "failed: setup failed (exit 2): no matching distribution" in failed
    assert "Tests may not be runnable" in failed and "do not try to install" in failed
    assert "nothing was set up" in environment_note({"status": "none", "source": "none"})
    assert environment_note(None) == ""


async def test_the_terminal_shows_the_environment_in_a_line_and_output_as_whole_lines():
    out = io.StringIO()
    view = Terminal(out, live=False)
    view.show({"type": "environment", "status": "failed", "source": "request", "cached": False, "duration_s": 1.5,
               "installed": [], "error": "setup failed (exit 3): the script exited 3\nsee its output"})
    view.show({"type": "environment", "status": "ready", "source": "detected", "cached": True, "duration_s": 0.2,
               "installed": ["python: /env/python (1 package: tinydep 1.0)"], "test_commands": ["python -m pytest"]})
    view.show({"type": "environment", "status": "none", "source": "none", "cached": False, "duration_s": 0.0})
    for piece in ("collecting", " 3 items\ntest_a.py ", "...\n", "3 passed"):
        view.show({"type": "output", "tool": "exec", "id": "toolu_1", "text": piece})
    view.show({"type": "tool_result", "name": "sandbox_exec", "id": "toolu_1", "content": "{}"})
    assert out.getvalue().splitlines() == [
        "- environment failed (request, 1.5 s)", "    setup failed (exit 3): the script exited 3", "    see its output",
        "- environment ready (detected, cached, 0.2 s)", "    python: /env/python (1 package: tinydep 1.0)",
        "    tests: python -m pytest", "- environment: nothing to set up",
        "     | collecting 3 items", "     | test_a.py ...", "     | 3 passed", "  <- ok {}"]


async def test_the_pull_request_gives_each_claimed_test_the_exit_code_the_sandbox_saw(pool, make_repo):
    review = {"verdict": "approve", "findings": [], "tests_run": [
        {"command": f"  {TESTS} ", "result": "OK, 1 test"},
        {"command": "test -e CHANGELOG.md", "result": "changelog present"},
        {"command": "pytest -q", "result": "3 passed"}]}
    checks = [turn(tool_use("sandbox_exec", {"command": TESTS}), tool_use("sandbox_exec",
                                                                           {"command": "test -e CHANGELOG.md"})),
              turn(tool_use("submit_review", review))]
    async with stack(pool, planner() + coder() + checks) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Fix add()"})
    body = record(of_type(events, "pull_request")[0])["body"]
    tests = [line for line in body.split("## Tests run\n", 1)[1].split("\n\n", 1)[0].splitlines()
             if not line.startswith(" ")]  # each entry, less the details of its run
    assert tests == [f"- `{TESTS}`: exit 0 (passed); the reviewer reported: OK, 1 test",
                     "- `test -e CHANGELOG.md`: exit 1 (failed); the reviewer reported: changelog present",
                     "- `pytest -q`: not run in the sandbox; the reviewer reported: 3 passed",
                     "- `python3 -m unittest -q`: not run in the sandbox (the plan's verification)"]


async def read_live(url: str, body: dict) -> list[tuple[float, dict]]:
    """POST /code, and each event with when it arrived."""
    arrived: list[tuple[float, dict]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as http:
        async with http.post(url + "/code", json=body) as resp:
            block = ""
            async for line in resp.content:
                block += line.decode()
                if line == b"\n":
                    arrived += [(time.monotonic(), e) for e in parse_sse(block)]
                    block = ""
    return arrived


@needs_sandbox_setup
async def test_a_long_commands_output_arrives_while_it_runs_before_its_result(pool, make_repo):
    command = "echo started; sleep 2; echo finished"
    script = [turn(tool_use("sandbox_exec", {"command": command})), turn(text("Ran it."))]
    async with stack(pool, script) as s:
        arrived = await read_live(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Run", "mode": "single"})
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{s.url}/runs/{arrived[0][1]['run_id']}/events") as resp:
                stored = parse_sse(await resp.text())
    events = [e for _, e in arrived]
    call = next(e for e in of_type(events, "tool_call") if e["state"] == "complete")
    outputs = [(t, e) for t, e in arrived if e["type"] == "output" and e.get("id") == call["id"]]
    result_at, result = next((t, e) for t, e in arrived if e["type"] == "tool_result")
    assert outputs and all(e["tool"] == "exec" and e["agent"] == "agent" for _, e in outputs)
    assert "".join(e["text"] for _, e in outputs) == "started\nfinished\n"
    assert outputs[0][1]["text"].startswith("started") and result_at - outputs[0][0] >= 1.5
    assert all(e["seq"] < result["seq"] for _, e in outputs)
    assert stored == events and [e["seq"] for e in events] == list(range(1, len(events) + 1))


@needs_sandbox_setup
async def test_setup_output_streams_and_the_environment_it_made_is_announced_and_used(pool, make_repo):
    script = [turn(tool_use("sandbox_exec", {"command": "hello"})), turn(text("It greets."))]
    async with stack(pool, script) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Greet",
                                               "mode": "single", "setup": HELLO})
    kinds = [e["type"] for e in events]
    sandbox = kinds.index("sandbox")
    setup_output = [e for e in events if e["type"] == "output" and e["tool"] == "create_sandbox"]
    assert setup_output and all(events.index(e) < sandbox for e in setup_output)
    assert "SETUP-RAN" in "".join(e["text"] for e in setup_output)
    assert "environment" not in events[sandbox] and kinds[sandbox + 1] == "environment"
    environment = events[sandbox + 1]
    assert environment == {**environment, "status": "ready", "source": "request", "script": HELLO, "error": None}
    assert isinstance(environment["cached"], bool) and environment["duration_s"] >= 0
    assert "hello from the environment" in of_type(events, "tool_result")[0]["content"]
    brief = s.api.requests[0]["messages"][0]["content"]
    assert "Environment: the repository's dependencies are installed" in json.dumps(brief)
    assert events[-1]["status"] == "no_changes"


@needs_sandbox_setup
async def test_an_empty_setup_means_none_and_the_agent_is_told_nothing_was_set_up(pool, make_repo):
    repo = make_repo({**BUGGY, "requirements.txt": "tinydep==1.0\n"})
    async with stack(pool, [turn(text("Nothing to change."))]) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Look", "mode": "single",
                                               "setup": ""})
    environment = of_type(events, "environment")
    assert [(e["status"], e["source"]) for e in environment] == [("none", "none")]
    assert "nothing was set up" in json.dumps(s.api.requests[0]["messages"][0])


@needs_sandbox_setup
async def test_a_failed_setup_is_reported_once_and_the_team_goes_on_saying_so_in_the_pull_request(pool, make_repo):
    async with stack(pool, planner() + coder() + reviewer("approve")) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Fix add()",
                                               "setup": FAILING_SETUP})
    environment = of_type(events, "environment")
    assert len(environment) == 1 and environment[0]["status"] == "failed"
    error = environment[0]["error"]
    assert "exit 3" in error and "preparing the environment" in environment[0]["output_tail"]
    assert of_type(events, "error") == [] and events[-1]["status"] == "success"
    for first in (0, 2, 5):  # each agent's brief: planner, coder, reviewer
        brief = json.dumps(s.api.requests[first]["messages"][0])
        assert "setting up the repository's dependencies failed" in brief and json.dumps(error)[1:-1] in brief
    body = record(of_type(events, "pull_request")[0])["body"]
    assert f"The environment could not be set up ({error}): tests could not run." in body
    assert "passed" not in body and PLAN["summary"] in body
