"""Both servers as any MCP client sees them (Claude Code, the Inspector, the orchestrator): the official `mcp`
client talking to real server subprocesses over stdio and streamable HTTP."""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp_types import CallToolResult

from tests.conftest import git, held_client
from tests.servers.sandbox.conftest import free_port, sandbox_root  # noqa: F401 - sandbox_root is a fixture

ROOT = Path(__file__).resolve().parents[2]
VERSION = importlib.metadata.version("tiny-backspace")
# Each one ends a line for str.splitlines() but not for ripgrep, sed or git.
NOT_NEWLINES = {"line separator": "\u2028", "next line": "\u0085", "form feed": "\x0c", "carriage return": "\r"}


def server_env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "SANDBOX_BACKEND": "local", **extra}


def stdio(server: str, **env: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", f"servers.{server}"], cwd=str(ROOT),
                                 env=server_env(**env))


@pytest.fixture
def connect(sandbox_root: Path) -> Callable[[str], Any]:
    """`connect("sandbox")` or `connect("github")`: an `mcp.Client` of that server run over stdio."""

    def open_client(server: str) -> Any:
        return held_client(stdio(server, SANDBOX_ROOT=str(sandbox_root)))

    return open_client


@asynccontextmanager
async def http_server(server: str, **env: str) -> AsyncIterator[str]:
    """`python -m servers.<server> --transport http` as a subprocess; its /mcp URL once it accepts connections."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", f"servers.{server}", "--transport", "http", "--port", str(port), cwd=ROOT,
        env=server_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    exited = asyncio.ensure_future(proc.wait())
    try:
        async with asyncio.timeout(30):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                except OSError:
                    # Until the port opens, or the server gives up.
                    if (await asyncio.wait([exited], timeout=0.05))[0]:
                        raise RuntimeError(f"the {server} server exited at start-up") from None
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        if proc.returncode is None:
            proc.terminate()
        async with asyncio.timeout(10):
            await exited


async def call(client: Client, tool: str, **arguments: Any) -> CallToolResult:
    async with asyncio.timeout(60):
        return await client.call_tool(tool, arguments)


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


async def new_sandbox(client: Client, repo: Path) -> str:
    result = await call(client, "create_sandbox", repo_url=str(repo))
    assert not result.is_error, text_of(result)
    return result.structured_content["sandbox_id"]


async def test_read_file_and_edit_file_answer_plain_text_that_clients_show_as_it_is(connect, make_repo):
    async with connect("sandbox") as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert tools["read_file"].output_schema is None and tools["edit_file"].output_schema is None
        sid = await new_sandbox(client, make_repo({"app.py": "x = 1\ny = 2\n"}))
        read = await call(client, "read_file", sandbox_id=sid, path="app.py")
        edit = await call(client, "edit_file", sandbox_id=sid, path="app.py", old_text="y = 2", new_text="y = 3")
    for result in (read, edit):
        assert not result.is_error and result.structured_content is None
        assert [block.type for block in result.content] == ["text"]
    assert read.content[0].text == "     1\tx = 1\n     2\ty = 2"
    assert edit.content[0].text.startswith("replaced 1 occurrence(s) in app.py\n--- a/app.py")


async def test_no_tool_of_either_server_wraps_its_answer_in_a_result_object(connect):
    for server in ("sandbox", "github"):
        async with connect(server) as client:
            for tool in (await client.list_tools()).tools:
                properties = (tool.output_schema or {}).get("properties", {})
                assert set(properties) != {"result"}, f"{server}.{tool.name} answers text as JSON"


async def test_read_file_search_sed_and_git_number_lines_alike(connect, make_repo):
    # Lines end at "\n" alone; each other line break of str.splitlines() sits inside a line.
    lines = [f"{name} here:{char}still the same line" for name, char in NOT_NEWLINES.items()]
    lines += ["TARGET line", "last line"]
    repo = make_repo({"notes.txt": ""})
    (repo / "notes.txt").write_bytes("\n".join(lines).encode() + b"\n")
    git(repo, "commit", "-qam", "odd line breaks")
    async with connect("sandbox") as client:
        sid = await new_sandbox(client, repo)
        read = text_of(await call(client, "read_file", sandbox_id=sid, path="notes.txt"))
        odd = (await call(client, "search", sandbox_id=sid, pattern="here:")).structured_content["matches"]
        target = (await call(client, "search", sandbox_id=sid, pattern="TARGET")).structured_content["matches"]
        sed = (await call(client, "exec", sandbox_id=sid, command="sed -n 5p notes.txt")).structured_content
        edit = text_of(await call(client, "edit_file", sandbox_id=sid, path="notes.txt", old_text="TARGET line",
                                  new_text="TARGET changed"))
        git_diff = (await call(client, "exec", sandbox_id=sid,
                               command="git diff -U2 -- notes.txt")).structured_content["stdout"]
    assert read.split("\n") == [f"{n:6}\t{line}" for n, line in enumerate(lines, 1)]
    assert [match.split(":")[1] for match in odd] == ["1", "2", "3", "4"]
    assert target == ["notes.txt:5: TARGET line"] and sed["stdout"] == "TARGET line\n"
    hunk = re.search(r"^@@ [^@]* @@", edit, re.M)
    assert hunk and hunk.group(0) == re.search(r"^@@ [^@]* @@", git_diff, re.M).group(0) == "@@ -3,4 +3,4 @@"


async def test_a_3_mb_file_is_committed_over_streamable_http(make_repo):
    repo = make_repo({"README.md": "# big\n"})
    base = git(repo, "rev-parse", "HEAD")
    content = os.urandom(3 * 1024 * 1024)
    changes = {"base_commit": base, "deleted": [],
               "files": [{"path": "data/blob.bin", "mode": "100644",
                          "content_base64": base64.b64encode(content).decode()}]}
    async with http_server("github") as url, held_client(url) as client:
        branch = await call(client, "create_branch", repo=str(repo), branch="tb/big", from_sha=base)
        assert not branch.is_error, text_of(branch)
        commit = await call(client, "commit_changes", repo=str(repo), branch="tb/big", message="Add a 3 MB file",
                            changes=changes)
        assert not commit.is_error, text_of(commit)
    shown = subprocess.run(["git", "show", "tb/big:data/blob.bin"], cwd=repo, capture_output=True, check=True)
    assert shown.stdout == content


@pytest.mark.parametrize("server", ["sandbox", "github"])
async def test_both_servers_report_the_installed_version_at_initialize(connect, server):
    async with connect(server) as client:
        info = client.server_info
    assert (info.name, info.version) == (server, VERSION)


def assert_clean(text: str, *arguments: str) -> None:
    """An error a caller can act on: it names each argument, and shows nothing of how the server is built."""
    for argument in arguments:
        assert argument in text, f"{argument!r} is not named in {text!r}"
    for internal in ("pydantic", "http", "://", "type=", "input_value", "validation error"):
        assert internal not in text.lower(), f"{internal!r} shows through in {text!r}"
    for class_name in ("Arguments", "Changeset", "ChangedFile", "run_command", "str", "int", "float"):
        assert not re.search(rf"\b\w*{class_name}\b", text), f"{class_name!r} shows through in {text!r}"


async def test_bad_arguments_to_a_sandbox_tool_are_named_in_its_own_terms(connect):
    async with connect("sandbox") as client:
        wrong = await call(client, "exec", sandbox_id=7, command=["ls"], timeout_s="soon")
        missing = await call(client, "read_file", path="README.md")
        too_long = await call(client, "read_file", sandbox_id="s" * 201, path="README.md")
    assert wrong.is_error and missing.is_error and too_long.is_error
    assert_clean(text_of(wrong), "sandbox_id", "command", "timeout_s", "string", "number")
    assert_clean(text_of(missing), "sandbox_id", "required")
    assert_clean(text_of(too_long), "sandbox_id", "200 characters")


async def test_bad_arguments_to_a_github_tool_are_named_in_its_own_terms(connect, make_repo):
    repo = str(make_repo())
    async with connect("github") as client:
        wrong = await call(client, "commit_changes", repo=repo, branch=5, message="m",
                           changes={"base_commit": "a" * 40, "files": [{"path": "a", "mode": "777"}]})
        missing = await call(client, "commit_changes", repo=repo, branch="tb/x", message="m")
        too_long = await call(client, "open_pull_request", repo=repo, head="tb/x", title="t" * 300)
    assert wrong.is_error and missing.is_error and too_long.is_error
    assert_clean(text_of(wrong), "branch", "changes.files[0].mode", "changes.files[0].content_base64", "100644")
    assert_clean(text_of(missing), "changes", "required")
    assert_clean(text_of(too_long), "title", "256 characters")
