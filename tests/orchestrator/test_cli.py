"""`python -m orchestrator run`, run as a user runs it: a subprocess against the real service, or in process."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.fakes.messages_api import messages_api, text, tool_use, turn

from .conftest import API_KEY, ROOT, free_port, stack
from .test_environment import HELLO, needs_sandbox_setup
from .test_nothing_lost import forge_goes_away
from .test_run import BUGGY, fix_script

pytestmark = pytest.mark.asyncio(loop_scope="session")
TOKEN = "tb-cli-test-token-" + "y" * 24


async def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 90) -> tuple[int, str, str]:
    """Run the CLI to its end: (exit code, stdout, stderr)."""
    code, out, err = await command("run", *args, cwd=ROOT, env=env or {}, timeout=timeout)
    return code, out, "\n".join(err)


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


async def test_a_failing_command_never_reads_ok(pool, make_repo):
    script = [turn(tool_use("sandbox_exec", {"command": "echo broken >&2; exit 3"})), turn(text("It fails."))]
    async with stack(pool, script) as s:
        _, out, err = await cli("--service", s.url, *fix(make_repo(BUGGY)))
    lines = out.splitlines()
    assert "  <- failed exit 3: broken" in lines, out
    assert not any(line.startswith("  <- ok") for line in lines)


@needs_sandbox_setup
async def test_setup_comes_from_a_file_and_the_environment_and_live_output_print_as_lines(pool, make_repo, tmp_path):
    setup = tmp_path / "setup.sh"
    setup.write_text(HELLO)
    script = [turn(tool_use("sandbox_exec", {"command": "hello; echo second line"})), turn(text("It greets."))]
    async with stack(pool, script) as s:
        code, out, err = await cli("--service", s.url, "--setup", str(setup), *fix(make_repo(BUGGY)))
        unreadable = await cli("--service", s.url, "--setup", str(tmp_path / "missing.sh"), *fix(make_repo(BUGGY)))
    lines = out.splitlines()
    assert code == 1, err  # nothing changed, so no pull request
    assert any(line.startswith("- environment ready (request, ") for line in lines), out
    assert "     | SETUP-RAN" in lines
    exec_at = lines.index('  -> sandbox_exec {"command": "hello; echo second line"}')
    assert lines[exec_at + 1:exec_at + 3] == ["     | hello from the environment", "     | second line"]
    assert unreadable[0] == 2 and "cannot read the setup script" in unreadable[2] and "missing.sh" in unreadable[2]


async def test_recent_lists_the_runs_with_when_each_started_and_how_long_it_took(pool, make_repo):
    async with stack(pool, fix_script()) as s:
        await cli("--service", s.url, *fix(make_repo(BUGGY)))
        code, out, err = await cli("--service", s.url, "--recent", env={"TZ": "UTC"})
        async with aiohttp.ClientSession() as http, http.get(s.url + "/runs") as resp:
            record = (await resp.json())["runs"][0]
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith(record["id"]))
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record["created"]))
    assert "success" in line and started in line and f"{record['duration_s']:.1f} s" in line, line


async def command(*args: str, cwd: Path, env: dict[str, str], timeout: float = 90) -> tuple[int, str, list[str]]:
    """`python -m orchestrator ARGS` from `cwd`, with no TB_ or ANTHROPIC_ variable but those in `env`, to its end:
    (exit code, stdout, stderr lines)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TB_", "ANTHROPIC_"))}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "orchestrator", *args, cwd=cwd, env=base | env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(), err.decode().strip().splitlines()


async def test_the_cli_runs_in_process_from_the_users_own_repository(make_repo, tmp_path):
    repo = make_repo(BUGGY)
    async with messages_api(fix_script()) as api:
        env = {"ANTHROPIC_BASE_URL": api.url, "ANTHROPIC_API_KEY": API_KEY, "TB_MODEL": "claude-sonnet-test",
               "TB_DATA_DIR": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
        code, out, err = await command("run", "--in-process", *fix(Path(".")), cwd=repo, env=env)
    assert code == 0, err
    assert any(line.startswith(f"pull request #1: file://{repo}/") for line in out.splitlines())


async def test_a_users_own_mcp_json_comes_first_and_a_bad_one_is_one_line(make_repo, tmp_path):
    config = tmp_path / "config" / "tiny-backspace" / "mcp.json"
    config.parent.mkdir(parents=True)
    config.write_text('{"mcpServers": {"sandbox": {"command": "/nowhere/python"}}}')
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "TB_DATA_DIR": str(tmp_path / "data")}
    code, _, err = await command("run", "--in-process", *fix(make_repo(BUGGY)), cwd=tmp_path, env=env)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {config} starts the sandbox server with /nowhere/python, which is not there")


async def test_a_port_in_use_is_one_line_saying_what_to_do(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = await command("--port", str(port), cwd=tmp_path, env={"TB_DATA_DIR": str(tmp_path / "data")},
                                     timeout=30)
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1] == (f"error: port {port} on 127.0.0.1 is in use, perhaps by another ./tb serve: stop that one, "
                       "or pass --port with a free port")
    assert not (tmp_path / "data").exists()  # refused before anything started


async def test_a_bad_variable_is_one_line_naming_it(make_repo, tmp_path):
    env = {"TB_MAX_TURNS": "abc", "TB_OVERLOADED_RETRIES": "-1", "TB_DATA_DIR": str(tmp_path / "data")}
    served = await command("--port", str(free_port()), cwd=tmp_path, env=env, timeout=30)
    ran = await command("run", "--in-process", *fix(make_repo(BUGGY)), cwd=tmp_path, env=env, timeout=30)
    for code, _, err in (served, ran):
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith("error: bad configuration: TB_MAX_TURNS='abc': expected a whole number"), err
        assert "TB_OVERLOADED_RETRIES='-1': must be 0 or more" in err[0] and "unset them" in err[0], err


async def test_the_cli_publishes_and_retries_kept_changes_and_says_what_is_wrong(pool, make_repo, tmp_path):
    repo = make_repo(BUGGY)
    away = tmp_path / "away"
    script = [turn(tool_use("sandbox_write_file", {"path": "calc.py", "content": "fixed\n"})),
              forge_goes_away(repo, away, "Done."),
              turn(text("It is there already."))]
    async with stack(pool, script) as s:
        code, out, err = await cli("--service", s.url, "--json", *fix(repo))
        run_id = json.loads(out.splitlines()[0])["run_id"]
        assert code == 1 and '"type": "kept"' in out
        code, out, err = await cli("--service", s.url, "--publish", run_id)
        assert code == 2 and "the forge refused" in err and "still kept" in err
        away.rename(repo)
        code, out, err = await cli("--service", s.url, "--publish", run_id)
        assert code == 0 and "file://" in out, err
        code, out, err = await cli("--service", s.url, "--retry", run_id)
        assert code == 0 and "pull request #" in out, err
        code, out, err = await cli("--service", s.url, "--say", run_id, "hello")
        assert code == 2 and "is not running" in err
        code, out, err = await cli("--service", s.url, "--cancel", "run_0000000000000000", "--discard")
        assert code == 2 and "no run" in err
