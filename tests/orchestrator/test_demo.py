"""`./tb demo` as a user runs it, and its bundled trajectory as the scripted team run records it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import aiohttp
import pytest

from orchestrator.demo.__main__ import PROMPT, SAMPLE, TRAJECTORY
from tests.conftest import git
from tests.fakes.messages_api import text, tool_use, turn

from .conftest import post_code, stack

pytestmark = pytest.mark.asyncio(loop_scope="session")
TESTS = "python3 -m unittest -v 2>&1"
PLAN = {"summary": "add() returns a - b; it must return the sum, a + b.",
        "changes": [{"file": "calc.py", "what": "return a + b in add()",
                     "why": "add() must return the sum: test_calc expects add(2, 3) == 5"}],
        "verification": "python3 -m unittest -v"}
REVIEW = {"verdict": "approve", "findings": [],
          "tests_run": [{"command": TESTS, "result": "OK: test_adds passes"}]}
# What the bundled trajectory records: a planner, a coder and a reviewer fixing the sample's bug.
DEMO_SCRIPT = [
    turn(text("I'll read the module and run its tests to see the failure."),
         tool_use("sandbox_read_file", {"path": "calc.py"}, id="toolu_01DemoPlannerRead"),
         tool_use("sandbox_exec", {"command": TESTS}, id="toolu_01DemoPlannerTests")),
    turn(text("The test expects add(2, 3) == 5, but add() returns a - b: one line to change."),
         tool_use("submit_plan", PLAN, id="toolu_01DemoPlannerSubmit")),
    turn(text("Making the planned change."),
         tool_use("sandbox_edit_file", {"path": "calc.py", "old_text": "return a - b", "new_text": "return a + b"},
                  id="toolu_01DemoCoderEdit")),
    turn(tool_use("sandbox_exec", {"command": TESTS}, id="toolu_01DemoCoderTests")),
    turn(text("add() now returns a + b, and `python3 -m unittest -v` passes.")),
    turn(text("Checking the change against the plan, and running the tests myself."),
         tool_use("sandbox_exec", {"command": TESTS}, id="toolu_01DemoReviewerTests")),
    turn(tool_use("submit_review", REVIEW, id="toolu_01DemoReviewerSubmit")),
]


def without_usage(agents: list[dict]) -> list[dict]:
    """The agents' turns without token counts, which the scripted API estimates from each request's size."""
    return [{**a, "turns": [{k: v for k, v in t.items() if k != "usage"} for t in a["turns"]]} for a in agents]


async def test_the_bundled_trajectory_is_what_the_scripted_team_run_records(pool, make_repo):
    async with stack(pool, DEMO_SCRIPT) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(make_repo(SAMPLE)), "prompt": PROMPT})
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{s.url}/runs/{events[0]['run_id']}/trajectory") as resp:
                recorded = await resp.json()
    assert events[-1]["status"] == "success"
    recorded = {"format": recorded["format"], "request": {**recorded["request"], "repo": "(the demo's sample)"},
                "agents": without_usage(recorded["agents"])}
    if os.environ.get("TB_WRITE_DEMO_TRAJECTORY") == "1":
        TRAJECTORY.write_text(json.dumps(recorded, indent=2, ensure_ascii=False) + "\n")
    assert json.loads(TRAJECTORY.read_text()) == recorded, (
        "orchestrator/demo/trajectory.json is not what DEMO_SCRIPT records; if the change is meant, write the new "
        "one with TB_WRITE_DEMO_TRAJECTORY=1 and this test")


async def test_the_demo_fixes_the_sample_through_the_service_and_says_where_to_look(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TB_", "ANTHROPIC_"))}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")  # the project's mcp.json, not a user's own
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "orchestrator.demo", "--dir",
                                                str(tmp_path / "demo"), cwd=elsewhere, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(120):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out = out.decode()
    assert proc.returncode == 0, out + err.decode()
    said = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}
    repo = tmp_path / "demo" / "calc"
    record, head = Path(said["pull request"]), said["branch"].split()[0]
    assert said["run"].startswith("run_") and record.is_file() and head.startswith("tb/")
    pull_request = json.loads(record.read_text())
    assert pull_request["head"] == head
    assert f"- `{TESTS}`: exit 0 (passed); the reviewer reported: OK: test_adds passes" in pull_request["body"]
    # The branch holds the fix; the checked-out main is as the sample was made.
    assert git(repo, "show", f"{head}:calc.py").endswith("return a + b")
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main" and (repo / "calc.py").read_text() == \
        SAMPLE["calc.py"]
    assert f"git -C {repo} log -p main..{head}" in out and "+    return a + b" in out
    # The client showed the team at work, replayed: no key, and the service has stopped.
    lines = out.splitlines()
    assert [line for line in lines if line.startswith("== ")] == [
        "== planner start", "== planner end (2 turns)", "== coder start", "== coder end (3 turns)",
        "== reviewer start", "== reviewer end (2 turns)"]
    assert any(line.startswith("success in ") for line in lines)
    assert "./tb demo --keep" in out and "TB_DATA_DIR=" in out
    service = re.search(r"through the service at (http://127\.0\.0\.1:\d+)", out)[1]
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as http, http.get(service + "/health"):
            pass
