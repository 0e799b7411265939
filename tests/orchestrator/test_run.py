"""`POST /code` end to end: the scripted model fixes a bug through the real MCP servers and opens a pull request."""

from __future__ import annotations

import json
import os

import pytest

from orchestrator.mcp_pool import ToolPool, load_config

from tests.conftest import git
from tests.fakes.messages_api import text, tool_use, turn

from .conftest import API_KEY, GITHUB_TOKEN, of_type, post_code, stack

pytestmark = pytest.mark.asyncio(loop_scope="session")

BUGGY = {
    "calc.py": "def add(a, b):\n    return a - b\n",
    "test_calc.py": "import unittest\nfrom calc import add\n\n\nclass T(unittest.TestCase):\n"
                    "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n",
}
TESTS = "python3 -m unittest -q 2>&1; echo exit=$?"


def fix_script(branch: str = "tb/fix-add") -> list:
    return [
        turn(text("Let me look at the code and run the tests."), tool_use("sandbox_read_file", {"path": "calc.py"}),
             tool_use("sandbox_exec", {"command": TESTS})),
        turn(text("The subtraction is the bug."),
             tool_use("sandbox_edit_file", {"path": "calc.py", "old_text": "a - b", "new_text": "a + b"})),
        turn(tool_use("sandbox_exec", {"command": TESTS})),
        turn(tool_use("github_create_branch", {"branch": branch})),
        turn(tool_use("github_commit_changes", {"branch": branch, "message": "Fix add"})),
        turn(tool_use("github_open_pull_request", {"head": branch, "title": "Fix add()",
                                                   "body": "add() subtracted; it adds now. Tested: unittest."})),
        turn(text("Opened a pull request that fixes add().")),
    ]


async def test_a_run_fixes_the_bug_and_opens_a_pull_request(pool, make_repo):
    repo = make_repo(BUGGY)
    (repo / "notes.txt").write_text("uncommitted work in progress\n")
    head, status = git(repo, "rev-parse", "HEAD"), git(repo, "status", "--porcelain")
    async with stack(pool, fix_script()) as s:
        code, events, raw = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Fix add(); its test fails.",
                                                    "mode": "single"})
    assert code == 200
    kinds = [e["type"] for e in events]
    assert kinds[0] == "run" and kinds[1] == "status" and kinds[2] == "sandbox"
    assert kinds[-3:] == ["pull_request", "usage", "completion"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["run_id"] for e in events}) == 1
    results = of_type(events, "tool_result")
    assert "FAILED" in results[1]["content"] and "exit=1" in results[1]["content"]
    assert "OK" in results[3]["content"] and "exit=0" in results[3]["content"]
    assert not any(r["is_error"] for r in results)
    assert "".join(e["text"] for e in of_type(events, "text")).startswith("Let me look at the code")
    streamed = [e for e in of_type(events, "tool_call") if e["state"] == "streaming"]
    assert streamed and all("partial_input" in e for e in streamed)
    diff = of_type(events, "diff")[0]
    assert "+    return a + b" in diff["diff"] and diff["files"] == ["calc.py"]
    pr = of_type(events, "pull_request")[0]
    assert pr["head"] == "tb/fix-add" and pr["url"].startswith("file://")
    completion = events[-1]
    assert completion["status"] == "success" and completion["pull_request_url"] == pr["url"]
    usage = of_type(events, "usage")[0]
    assert usage["input_tokens"] > 0 and usage["cost_usd"] > 0
    # The branch carries the fix; main, the index and the working tree are as they were.
    assert git(repo, "show", "tb/fix-add:calc.py") == "def add(a, b):\n    return a + b"
    assert git(repo, "rev-parse", "tb/fix-add^") == head
    assert git(repo, "rev-parse", "HEAD") == head and git(repo, "status", "--porcelain") == status
    assert (repo / "calc.py").read_text() == BUGGY["calc.py"]
    # No secret of the orchestrator or of the github server reached the stream.
    assert API_KEY not in raw and GITHUB_TOKEN not in raw


async def test_the_model_never_sees_bound_arguments_or_lifecycle_tools(pool, make_repo):
    repo = make_repo(BUGGY)
    async with stack(pool, fix_script()) as s:
        await post_code(s.url, {"repoUrl": str(repo), "prompt": "Fix add().", "mode": "single"})
    first = s.api.requests[0]
    tools = {t["name"]: t for t in first["tools"]}
    assert "sandbox_create_sandbox" not in tools and "sandbox_destroy_sandbox" not in tools
    assert {"sandbox_exec", "sandbox_read_file", "github_create_branch", "github_open_pull_request"} <= set(tools)
    for tool in tools.values():
        props = tool["input_schema"].get("properties", {})
        assert not {"sandbox_id", "repo", "from_sha"} & set(props), tool["name"]
    assert "changes" not in tools["github_commit_changes"]["input_schema"]["properties"]
    assert str(repo) not in json.dumps(first["tools"])
    # Prompt caching: tools, system, and the latest message.
    last = s.api.requests[-1]
    assert "cache_control" in last["tools"][-1] and "cache_control" in last["system"][-1]
    assert "cache_control" in last["messages"][-1]["content"][-1]
    assert sum("cache_control" in m["content"][-1] for m in last["messages"] if isinstance(m["content"], list)) == 1


async def test_idle_streams_get_ping_comments_and_long_results_are_cut_for_the_model(pool, make_repo):
    script = [turn(tool_use("sandbox_exec", {"command": "sleep 1; seq 1 200000"})), turn(text("Long output."))]
    async with stack(pool, script, ping_seconds=0.1, tool_result_chars=2000) as s:
        _, events, raw = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Count",
                                                 "mode": "single"})
    assert "\n: ping\n" in "\n" + raw
    fed = s.api.requests[1]["messages"][-1]["content"][0]["content"]
    assert len(fed) < 2200 and "characters dropped" in fed
    assert fed.lstrip().startswith("{") and fed.rstrip().endswith("}")


async def test_the_branch_prefix_is_the_github_servers_alone(mcp_config, make_repo, tmp_path):
    config = json.loads(mcp_config.read_text())
    config["mcpServers"]["github"]["env"]["GITHUB_BRANCH_PREFIX"] = "bot/"  # set in mcp.json only
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps(config))
    bot_pool = ToolPool(load_config(path, env={"PATH": os.environ["PATH"]}))
    await bot_pool.start(wait_s=60)
    try:
        repo = make_repo(BUGGY)
        edit = turn(tool_use("sandbox_edit_file", {"path": "calc.py", "old_text": "a - b", "new_text": "a + b"}))
        async with stack(bot_pool, [edit, turn(text("Fixed."))]) as s:
            _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"})
    finally:
        await bot_pool.close()
    assert events[-1]["status"] == "success", of_type(events, "error")
    head = of_type(events, "pull_request")[0]["head"]
    assert head.startswith("bot/") and git(repo, "branch", "--list", "bot/*").strip().endswith(head)


async def test_a_changeset_the_forge_refuses_leaves_no_branch_behind(pool, make_repo):
    repo = make_repo(BUGGY)
    script = [turn(tool_use("sandbox_write_file", {"path": ".github/workflows/ci.yml", "content": "on: push\n"})),
              turn(text("Added CI."))]
    async with stack(pool, script) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Add CI", "mode": "single"})
    error = of_type(events, "error")[0]
    assert ".github/workflows/ci.yml" in error["message"] and "GITHUB_ALLOW_WORKFLOW_CHANGES" in error["message"]
    assert events[-1]["status"] == "error"
    assert git(repo, "branch", "--list", "tb/*") == ""
