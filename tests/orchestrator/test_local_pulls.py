"""A local repository's pull requests through the service (`/pulls`) and the CLI (`./tb pulls|pull|comment|close`):
the real service, the real github server over MCP, real git."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from orchestrator.mcp_pool import ToolPool
from orchestrator.tools import result_text
from tests.conftest import git
from tests.fakes.messages_api import text, tool_use, turn

from .conftest import API_KEY, ROOT, free_port, serve, stack
from .test_cli import command
from .test_run import BUGGY

pytestmark = pytest.mark.asyncio(loop_scope="session")
FIXED = "def add(a, b):\n    return a + b\n"
URI_COMPONENT_SAFE = "!~*'()"  # what encodeURIComponent leaves as it is, besides what quote() leaves
DOCSTRING = '    """The sum of a and b."""\n'


async def tool(pool: ToolPool, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A github tool's answer, called as the service calls it."""
    result = await pool.call("github", name, arguments, 60)
    assert not result.is_error, result_text(result)
    return result.structured_content or {}


async def open_pull(pool: ToolPool, repo: Path, branch: str = "tb/fix-add", content: str = FIXED) -> int:
    """A pull request from `branch`, which gets `content` as calc.py in a commit on main; its number."""
    changes = {"base_commit": git(repo, "rev-parse", "HEAD"), "deleted": [],
               "files": [{"path": "calc.py", "mode": "100644",
                          "content_base64": base64.b64encode(content.encode()).decode()}]}
    await tool(pool, "commit_changes", {"repo": str(repo), "branch": branch, "message": "Fix add", "changes": changes})
    pr = await tool(pool, "open_pull_request", {"repo": str(repo), "head": branch, "title": "Fix add()",
                                                "body": "add() subtracted; it adds now."})
    return pr["number"]


async def call(method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, **kwargs) as resp:
            return resp.status, await resp.json(content_type=None)


def pulls_url(base: str, repo: Path | str, suffix: str = "") -> tuple[str, dict[str, str]]:
    return f"{base}/pulls{suffix}", {"repo": str(repo)}


def docstring_follow_up(thread: int) -> list:
    """A single agent's follow-up: add()'s docstring, and an answer in `thread`, which asked for it."""
    return [turn(tool_use("sandbox_edit_file", {"path": "calc.py", "old_text": "def add(a, b):\n",
                                                "new_text": "def add(a, b):\n" + DOCSTRING})),
            turn(tool_use("reply_to_thread", {"comment_id": thread, "addressed": True,
                                              "reply": "Added a docstring."})),
            turn(text("Added the docstring."))]


def pull_href(repo: Path | str, number: int) -> str:
    """The page's address of a local pull request (the path as encodeURIComponent writes it)."""
    return f"#pull={number}&repo={quote(str(repo), safe=URI_COMPONENT_SAFE)}"


def record_url(repo: Path, number: int) -> str:
    return (repo / ".git" / "tiny-backspace" / "pulls" / f"{number}.json").as_uri()


def record(repo: Path, number: int) -> dict[str, Any]:
    """What the local forge keeps of a pull request."""
    return json.loads((repo / ".git" / "tiny-backspace" / "pulls" / f"{number}.json").read_text())


async def test_the_service_lists_shows_and_takes_comments_on_a_local_pull_request(pool, make_repo):
    repo = make_repo(BUGGY)
    number = await open_pull(pool, repo)
    async with stack(pool, []) as s:
        url, params = pulls_url(s.url, repo)
        status, listing = await call("GET", url, params=params)
        assert status == 200, listing
        assert [(p["number"], p["title"], p["head"], p["state"]) for p in listing["pull_requests"]] == [
            (number, "Fix add()", "tb/fix-add", "open")]
        status, detail = await call("GET", f"{url}/{number}", params=params)
        assert status == 200, detail
        assert detail["body"] == "add() subtracted; it adds now." and detail["base"] == "main"
        assert "-    return a - b\n+    return a + b" in detail["diff"]
        assert detail["comments"] == [] and detail["review_threads"] == []

        key = "sk-ant-api03-" + "Q" * 40
        status, said = await call("POST", f"{url}/{number}/comments", params=params,
                                  json={"body": f"Looks right. (pasted by mistake: {key})"})
        assert status == 200, said
        status, on_line = await call("POST", f"{url}/{number}/comments", params=params,
                                     json={"body": "Also test negative numbers.", "path": "calc.py", "line": 2})
        assert status == 200, on_line
        status, detail = await call("GET", f"{url}/{number}", params=params)
    assert [(c["id"], c["body"], c["ours"]) for c in detail["comments"]] == [
        (said["id"], "Looks right. (pasted by mistake: [redacted])", False)]
    [thread] = detail["review_threads"]
    assert (thread["id"], thread["path"], thread["line"], thread["body"], thread["addressed"]) == (
        on_line["id"], "calc.py", 2, "Also test negative numbers.", False)
    # The secret never reached the forge: it was masked before the comment was written, not only when read.
    assert key not in json.dumps(record(repo, number)) and "[redacted]" in json.dumps(record(repo, number))


async def test_closing_a_pull_request_deletes_its_branch_and_the_record_says_closed(pool, make_repo):
    repo = make_repo(BUGGY)
    number = await open_pull(pool, repo)
    async with stack(pool, []) as s:
        url, params = pulls_url(s.url, repo)
        status, closed = await call("POST", f"{url}/{number}/close", params=params)
        assert status == 200, closed
        assert closed == {**closed, "number": number, "head": "tb/fix-add", "deleted": True, "state": "closed"}
        assert git(repo, "branch", "--list", "tb/fix-add") == ""
        assert record(repo, number)["state"] == "closed"
        open_now = (await call("GET", url, params=params))[1]["pull_requests"]
        every = (await call("GET", url, params=params | {"state": "all"}))[1]["pull_requests"]
        again = await call("POST", f"{url}/{number}/close", params=params)
        # What it changed is still there to read: the record kept the branch's last commit.
        detail = (await call("GET", f"{url}/{number}", params=params))[1]
    assert open_now == [] and [(p["number"], p["state"]) for p in every] == [(number, "closed")]
    assert again[0] == 200 and again[1]["deleted"] is False and again[1]["state"] == "closed"
    assert detail["state"] == "closed" and "+    return a + b" in detail["diff"]


async def test_a_github_repository_a_path_off_the_roots_and_bad_input_are_refused(pool, make_repo, tmp_path):
    repo = make_repo(BUGGY)
    number = await open_pull(pool, repo)
    git(repo, "checkout", "-q", "-b", "feature")
    (repo / "calc.py").write_text("def add(a, b):\n    return b + a\n")
    git(repo, "commit", "-q", "-am", "Swap the operands")
    git(repo, "checkout", "-q", "main")
    theirs = (await tool(pool, "open_pull_request", {"repo": str(repo), "head": "feature", "title": "Swap"}))["number"]
    async with stack(pool, []) as s:
        url, params = pulls_url(s.url, repo)
        answers = {
            "github": await call("GET", url, params={"repo": "octo/demo"}),
            "github url": await call("GET", f"{url}/1", params={"repo": "https://github.com/octo/demo"}),
            "no repo": await call("GET", url),
            "not git": await call("GET", url, params={"repo": str(tmp_path)}),
            "state": await call("GET", url, params=params | {"state": "merged"}),
            "number": await call("GET", f"{url}/one", params=params),
            "zero": await call("GET", f"{url}/0", params=params),
            "missing": await call("GET", f"{url}/99", params=params),
            "no body": await call("POST", f"{url}/{number}/comments", params=params, json={}),
            "blank": await call("POST", f"{url}/{number}/comments", params=params, json={"body": "  "}),
            "line alone": await call("POST", f"{url}/{number}/comments", params=params,
                                     json={"body": "x", "line": 2}),
            "line text": await call("POST", f"{url}/{number}/comments", params=params,
                                    json={"body": "x", "path": "calc.py", "line": "2"}),
            "unknown": await call("POST", f"{url}/{number}/comments", params=params,
                                  json={"body": "x", "author": "me"}),
            "escape": await call("POST", f"{url}/{number}/comments", params=params, json={"body": "x\x1b[2J"}),
            "not json": await call("POST", f"{url}/{number}/comments", params=params, data="body",
                                   headers={"Content-Type": "application/json"}),
            "no file": await call("POST", f"{url}/{number}/comments", params=params,
                                  json={"body": "x", "path": "nowhere.py", "line": 1}),
            "their branch": await call("POST", f"{url}/{theirs}/close", params=params),
            "too long": await call("POST", f"{url}/{number}/comments", params=params, json={"body": "x" * 70_000}),
        }
        async with serve(s.services, host="192.0.2.10") as far:  # as it listens off loopback
            answers["off the roots"] = await call("GET", f"{far}/pulls", params=params)
    expected = {
        "github": (400, "open its pull requests on GitHub"), "github url": (400, "open its pull requests on GitHub"),
        "no repo": (400, "add ?repo="), "not git": (400, "is not a git repository"), "state": (400, '"all"'),
        "number": (400, "no pull request number"), "zero": (400, "no pull request number"),
        "missing": (404, "#99 does not exist"), "no body": (400, "body must be a non-empty string"),
        "blank": (400, "body must be a non-empty string"), "line alone": (400, "a line needs the path"),
        "line text": (400, "line must be a line number"), "unknown": (400, "unknown fields author"),
        "escape": (400, "control character U+001B"), "not json": (400, "not JSON"),
        "no file": (400, "'nowhere.py' is in neither"),
        "their branch": (400, "only writes branches that start with 'tb/'"),
        "too long": (400, "65511"),
        "off the roots": (403, "TB_LOCAL_ROOTS"),
    }
    for name, (status, words) in expected.items():
        assert answers[name][0] == status and words in answers[name][1]["error"], (name, answers[name])
    assert git(repo, "branch", "--list", "feature") != "" and record(repo, number)["comments"] == []


async def tb(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`./tb ARGS` in a process of its own, to its end: (exit code, stdout, stderr). It starts at the CLI's entry,
    skipping the service's imports, which `python -m orchestrator` (what ./tb runs) pays at each start; one test
    goes in by that door."""
    entry = "import sys; from orchestrator.cli import pulls_main; sys.exit(pulls_main(sys.argv[1:]))"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TB_", "ANTHROPIC_"))}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", entry, *args, cwd=ROOT, env=base | (env or {}),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(), err.decode().strip()


async def test_the_cli_lists_shows_comments_on_and_closes_a_local_pull_request(pool, make_repo):
    repo = make_repo(BUGGY)
    number = await open_pull(pool, repo)
    async with stack(pool, []) as s:
        service = ("--service", s.url)
        listed = await tb("pulls", str(repo), *service)
        commented = await tb("comment", str(repo), str(number), "Looks right.", *service)
        on_line = await tb("comment", str(repo), str(number), "Test negative numbers too.", "--path", "calc.py",
                           "--line", "2", *service)
        shown = await tb("pull", str(repo), str(number), *service)
        as_json = await tb("pull", str(repo), str(number), "--json", *service)
        closed = await tb("close", str(repo), str(number), *service)
        none_open = await tb("pulls", str(repo), *service)
        every = await tb("pulls", str(repo), "--state", "all", *service)
    for code, _, err in (listed, commented, on_line, shown, as_json, closed, none_open, every):
        assert code == 0, err
    assert listed[1].splitlines() == [f"#{number:<4} open    tb/fix-add -> main  Fix add()"]
    assert commented[1].splitlines() == [f"commented on #{number} (comment 1)"]
    assert on_line[1].splitlines() == [f"commented on #{number} on calc.py:2 (comment 2)"]
    lines = shown[1].splitlines()
    assert lines[0] == f"#{number} Fix add() (open)" and lines[1].startswith("tb/fix-add -> main at ")
    assert lines[3] == "add() subtracted; it adds now."
    assert "-    return a - b" in lines and "+    return a + b" in lines and "\x1b[" not in shown[1]
    comments = lines.index("Comments (1)")
    assert lines[comments + 1].startswith("  [1] local, ") and lines[comments + 2] == "    Looks right."
    threads = lines.index("Review threads (1)")
    assert lines[threads + 1:threads + 4:2] == ["  calc.py:2", "      Test negative numbers too."], lines
    assert lines[threads + 2].startswith("    [2] local, ")
    assert json.loads(as_json[1])["review_threads"][0]["path"] == "calc.py"
    assert closed[1].splitlines() == [f"#{number} is closed: deleted its branch tb/fix-add"]
    assert none_open[1].splitlines() == [f"no open pull requests in {repo}"]
    assert every[1].splitlines() == [f"#{number:<4} closed  tb/fix-add -> main  Fix add()"]


async def test_the_cli_says_what_is_wrong_and_what_to_do(pool, make_repo):
    repo = make_repo(BUGGY)
    await open_pull(pool, repo)
    token = "tb-pulls-test-token-" + "z" * 24
    async with stack(pool, [], api_token=token) as s:
        no_token = await tb("pulls", str(repo), "--service", s.url)
        missing = await tb("pull", str(repo), "7", "--service", s.url, env={"TB_API_TOKEN": token})
        github = await tb("pulls", "octo/demo", "--service", s.url, env={"TB_API_TOKEN": token})
    code, out, err = await command("pulls", str(repo), "--service", f"http://127.0.0.1:{free_port()}", cwd=ROOT,
                                   env={})
    absent = code, out, "\n".join(err)
    bad_number = await tb("pull", str(repo), "first")
    line_alone = await tb("comment", str(repo), "1", "x", "--line", "3")
    assert no_token[0] == 2 and "401" in no_token[2] and "TB_API_TOKEN" in no_token[2]
    assert missing[0] == 2 and missing[2].startswith("error: 404: pull request #7 does not exist"), missing
    assert github[0] == 2 and "open its pull requests on GitHub" in github[2]
    assert absent[0] == 2 and "no service answers" in absent[2] and "./tb serve" in absent[2]
    assert bad_number[0] == 2 and "'first' is no pull request number" in bad_number[2]
    assert line_alone[0] == 2 and "--line needs --path" in line_alone[2]
    assert API_KEY not in "".join(out + err for _, out, err in (no_token, missing, github, absent))


async def test_the_cli_follows_up_a_pull_request_and_streams_the_run_like_a_run(pool, make_repo):
    repo = make_repo(BUGGY)
    number = await open_pull(pool, repo)
    thread = (await tool(pool, "add_review_comment", {"repo": str(repo), "number": number, "path": "calc.py",
                                                      "line": 1, "body": "add() needs a docstring."}))["id"]
    async with stack(pool, docstring_follow_up(thread)) as s:
        code, out, err = await tb("follow-up", str(repo), str(number), "Keep it small.", "--mode", "single",
                                  "--service", s.url)
        shown = await tb("pull", str(repo), str(number), "--service", s.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("run_") and lines[0].endswith(f"(single, claude-sonnet-test), following up #{number}")
    assert f"- replied in thread {thread} (calc.py:1): Added a docstring." in lines
    assert f"+{DOCSTRING.rstrip()}" in lines
    tip = git(repo, "rev-parse", "tb/fix-add")
    assert f"- follow-up of #{number}: commit {tip[:10]}, 1 thread(s) answered" in lines
    assert f"pull request #{number}: {record_url(repo, number)}" in lines and lines[-1].startswith("success in ")
    # The thread now holds the run's reply, which names the commit.
    shown_lines = shown[1].splitlines()
    at = shown_lines.index("  calc.py:1 (addressed)")
    assert shown_lines[at + 3].startswith("    [") and "tiny-backspace (Tiny Backspace), " in shown_lines[at + 3]
    assert shown_lines[at + 4] == "      Added a docstring." and tip in shown[1]
