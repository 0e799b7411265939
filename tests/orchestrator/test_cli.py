"""`python -m orchestrator run`, run as a user runs it: a subprocess against the real service, or in process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from tests.fakes.messages_api import messages_api, text, turn

from .conftest import API_KEY, ROOT, free_port, stack
from .test_run import BUGGY, fix_script

pytestmark = pytest.mark.asyncio(loop_scope="session")
TOKEN = "tb-cli-test-token-" + "y" * 24


async def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 90) -> tuple[int, str, str]:
    """Run the CLI to its end: (exit code, stdout, stderr)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TB_", "ANTHROPIC_"))}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "orchestrator", "run", *args, cwd=ROOT,
                                                env=base | (env or {}), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(), err.decode()


def fix(repo: Path, *extra: str) -> list[str]:
    return ["--mode", "single", "--repo", str(repo), *extra, "Fix add(); its test fails."]


async def test_the_cli_renders_a_run_to_its_pull_request_and_exits_0(pool, make_repo):
    async with stack(pool, fix_script()) as s:
        code, out, err = await cli("--service", s.url, *fix(make_repo(BUGGY)))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("run_") and "(single, claude-sonnet-test)" in lines[0]
    assert "  -> sandbox_exec {\"command\": \"python3 -m unittest -q 2>&1; echo exit=$?\"}" in lines
    assert "  <- ok exit 0: exit=1" in lines and lines.count("  <- ok exit 0: exit=0") == 1
    assert "  Let me look at the code and run the tests." in lines
    assert "-    return a - b" in lines and "+    return a + b" in lines
    assert any(line.startswith("pull request #1: file://") for line in lines)
    assert lines[-1].startswith("success in ") and "\x1b[" not in out  # not a terminal: plain lines


async def test_json_prints_every_event_as_one_json_object_a_line(pool, make_repo):
    async with stack(pool, fix_script()) as s:
        code, out, _ = await cli("--service", s.url, "--json", *fix(make_repo(BUGGY)))
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "run" and events[-1] == {**events[-1], "type": "completion", "status": "success"}
    assert [e["type"] for e in events].count("pull_request") == 1


async def test_the_exit_code_is_not_0_when_no_pull_request_opens(pool, make_repo):
    async with stack(pool, [turn(text("Nothing to change."))]) as s:
        code, out, _ = await cli("--service", s.url, *fix(make_repo(BUGGY)))
    assert code == 1 and out.splitlines()[-1].startswith("no_changes in ")


async def test_a_missing_token_and_an_absent_service_are_errors_that_say_what_to_do(pool, make_repo):
    repo = make_repo(BUGGY)
    async with stack(pool, fix_script(), api_token=TOKEN) as s:
        refused = await cli("--service", s.url, *fix(repo))
        accepted = await cli("--service", s.url, *fix(repo), env={"TB_API_TOKEN": TOKEN})
    absent = await cli("--service", f"http://127.0.0.1:{free_port()}", *fix(repo))
    assert refused[0] == 2 and "401" in refused[2] and "TB_API_TOKEN" in refused[2]
    assert accepted[0] == 0
    assert absent[0] == 2 and "./tb serve" in absent[2] and "--in-process" in absent[2]


async def test_in_process_runs_the_job_without_a_service(make_repo, mcp_config, tmp_path):
    async with messages_api(fix_script()) as api:
        env = {"ANTHROPIC_BASE_URL": api.url, "ANTHROPIC_API_KEY": API_KEY, "TB_MODEL": "claude-sonnet-test",
               "TB_DATA_DIR": str(tmp_path / "data")}
        code, out, err = await cli("--in-process", "--mcp-config", str(mcp_config), *fix(make_repo(BUGGY)),
                                   env=env)
    assert code == 0, err
    assert any(line.startswith("pull request #1: file://") for line in out.splitlines())
    assert (tmp_path / "data" / "runs.sqlite3").exists()  # the run was kept, as the service keeps it
