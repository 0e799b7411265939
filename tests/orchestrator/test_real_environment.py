"""A whole team run on a real Python project whose dependencies come from a package index on loopback: the sandbox
server sets the environment up through its egress proxy, the agents' tests run in it with no network, and the pull
request states what the sandbox saw; with the index off the allowlist, the run goes on and says it could not test.

The real sandbox and github servers run over stdio, configured for each test; only the model is scripted.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from orchestrator.mcp_pool import ToolPool, load_config
from tests.conftest import git, remove_sandbox_root
from tests.fakes.messages_api import text, tool_use, turn
from tests.fakes.package_index import PackageIndex
from tests.fakes.projects import CALC, TEST_CALC, python_project

from .conftest import GITHUB_TOKEN, ROOT, of_type, post_code, stack
from .test_team import record

pytestmark = [pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")]

PROMPT = "add a multiply() to calc and a test for it"
TESTS = "python -m pytest -q"
NEVER_RAN = "python -m pytest tests/test_other.py"
EDITED = ["calc/__init__.py", "tests/test_calc.py"]
CALC_AFTER = CALC + "\n\ndef multiply(a, b):\n    return a * b\n"
TEST_AFTER = (TEST_CALC.replace("from calc import quadruple", "from calc import multiply, quadruple")
              + "\n\ndef test_multiply_multiplies_its_arguments():\n    assert multiply(3, 4) == 12\n")
TEST_COUNT = TEST_AFTER.count("\ndef test_")
PLAN = {"summary": "Add multiply() to calc, with a test of its own.",
        "changes": [{"file": "calc/__init__.py", "what": "def multiply(a, b): return a * b", "why": "requested"},
                    {"file": "tests/test_calc.py", "what": "a test of multiply()", "why": "requested"}],
        "verification": TESTS}
# Names of what an environment leaves behind, none of which may reach a pull request.
ENVIRONMENT_PARTS = ("node_modules", ".venv", "site-packages", ".egg-info", "__pycache__", ".pytest_cache")


@asynccontextmanager
async def team_pool(index: PackageIndex, allow: str) -> AsyncIterator[ToolPool]:
    """Both MCP servers over stdio, the sandbox one on a root of its own, setting environments up from `index`
    through a proxy that lets through only the hosts of `allow`."""
    root = Path(tempfile.mkdtemp(prefix="tb-test-real-environment-"))
    root.chmod(0o711)
    config = json.loads((ROOT / "mcp.json").read_text())
    for entry in config["mcpServers"].values():
        entry["command"] = sys.executable
    config["mcpServers"]["sandbox"]["env"].update({
        "SANDBOX_ROOT": str(root / "sandboxes"), "SANDBOX_BACKEND": "local", "SANDBOX_SETUP_ALLOW": allow,
        "SANDBOX_SETUP_ENV": "PIP_INDEX_URL", "PIP_INDEX_URL": index.simple_url})
    config["mcpServers"]["github"]["env"].update({"GITHUB_TOKEN": GITHUB_TOKEN, "GITHUB_WRITE_INTERVAL_S": "0"})
    (root / "mcp.json").write_text(json.dumps(config))
    pool = ToolPool(load_config(root / "mcp.json", env={"PATH": os.environ["PATH"]}))
    try:
        await pool.start(wait_s=60)
        assert all(c.state == "up" for c in pool.connections.values()), pool.health()
        yield pool
    finally:
        await pool.close()
        # Off the event loop: the cleanup runs a loop of its own.
        await asyncio.to_thread(remove_sandbox_root, root / "sandboxes")
        shutil.rmtree(root, ignore_errors=True)


def planner() -> list:
    return [turn(tool_use("sandbox_read_file", {"path": "calc/__init__.py"})), turn(tool_use("submit_plan", PLAN))]


def coder(*extra_commands: str) -> list:
    edits = turn(tool_use("sandbox_edit_file", {"path": "calc/__init__.py", "old_text": CALC, "new_text": CALC_AFTER}),
                 tool_use("sandbox_write_file", {"path": "tests/test_calc.py", "content": TEST_AFTER}))
    runs = [turn(tool_use("sandbox_exec", {"command": command}, id=f"toolu_coder_{i}"))
            for i, command in enumerate([TESTS, *extra_commands])]
    return [edits, *runs, turn(text("Added multiply() and a test of it."))]


def reviewer(reported: str) -> list:
    review = {"verdict": "approve", "findings": [], "tests_run": [{"command": TESTS, "result": reported},
                                                                   {"command": NEVER_RAN, "result": reported}]}
    return [turn(tool_use("sandbox_exec", {"command": TESTS}, id="toolu_reviewer_0")),
            turn(tool_use("submit_review", review))]


def ran(events: list[dict], call_id: str) -> dict:
    """The exec result the run's stream showed for the call `call_id`."""
    [result] = [e for e in of_type(events, "tool_result") if e["id"] == call_id]
    assert not result["is_error"], result
    return json.loads(result["content"])


def section_of_tests(body: str) -> list[str]:
    """The entries of "Tests run", less the details of each run (who, how long, the end of its output)."""
    return [line for line in body.split("## Tests run\n", 1)[1].split("\n\n", 1)[0].splitlines()
            if not line.startswith(" ")]


async def test_a_team_run_sets_the_project_up_tests_in_it_offline_and_publishes_only_its_edits(
        package_index, tmp_path: Path):
    repo = python_project(tmp_path / "calc", package_index)
    script = planner() + coder("pip install requests") + reviewer(f"{TEST_COUNT} passed")
    async with team_pool(package_index, package_index.host_port) as pool, stack(pool, script) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": PROMPT}, timeout=300)
    assert events[-1]["status"] == "success", events[-4:]
    [environment] = of_type(events, "environment")
    assert (environment["status"], environment["source"]) == ("ready", "detected"), environment
    installed = " ".join(environment["installed"])
    assert "tinydep" in installed and "pytest" in installed, installed
    sandbox = events.index(of_type(events, "sandbox")[0])
    setup_output = [e for e in events[:sandbox] if e["type"] == "output" and e["tool"] == "create_sandbox"]
    streamed = "".join(e["text"] for e in setup_output)
    assert "tinydep-1.0-py3-none-any.whl" in streamed and "Successfully installed" in streamed, streamed

    coder_tests = ran(events, "toolu_coder_0")
    assert coder_tests["exit_code"] == 0, coder_tests
    assert f"{TEST_COUNT} passed" in coder_tests["stdout"] and "failed" not in coder_tests["stdout"], coder_tests
    installing = ran(events, "toolu_coder_1")
    # pip itself ran, and found no network after the setup.
    assert installing["exit_code"] != 0 and not installing["timed_out"], installing
    assert "No matching distribution found for requests" in installing["stderr"], installing
    assert ran(events, "toolu_reviewer_0")["exit_code"] == 0

    pr = of_type(events, "pull_request")[0]
    assert section_of_tests(record(pr)["body"]) == [
        f"- `{TESTS}`: exit 0 (passed); the reviewer reported: {TEST_COUNT} passed",
        f"- `{NEVER_RAN}`: not run in the sandbox; the reviewer reported: {TEST_COUNT} passed"]
    assert of_type(events, "diff")[0]["files"] == EDITED
    assert git(repo, "diff", "--name-only", f"main..{pr['head']}").splitlines() == EDITED
    published = git(repo, "ls-tree", "-r", "--name-only", pr["head"]).splitlines()
    assert not [p for p in published if any(part in p for part in ENVIRONMENT_PARTS)], published
    assert git(repo, "show", f"{pr['head']}:calc/__init__.py") == CALC_AFTER.rstrip("\n")
    assert git(repo, "show", f"{pr['head']}:tests/test_calc.py") == TEST_AFTER.rstrip("\n")


async def test_an_index_off_the_allowlist_fails_the_setup_and_the_pull_request_says_tests_could_not_run(
        package_index, tmp_path: Path):
    repo = python_project(tmp_path / "calc", package_index)
    script = planner() + coder() + reviewer("could not run: pytest is not installed")
    async with team_pool(package_index, "pypi.org") as pool, stack(pool, script) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": PROMPT}, timeout=300)
    assert events[-1]["status"] == "success", events[-4:]
    [environment] = of_type(events, "environment")
    assert environment["status"] == "failed", environment
    error = environment["error"]
    assert f"refused GET {package_index.host_port}" in error and "not on the setup allowlist" in error, error
    assert package_index.requests == []
    assert of_type(events, "error") == []

    coder_tests = ran(events, "toolu_coder_0")
    assert coder_tests["exit_code"] != 0, coder_tests
    missing = coder_tests["stdout"] + coder_tests["stderr"]
    assert "python: command not found" in missing or "No module named pytest" in missing, coder_tests
    exit_code = ran(events, "toolu_reviewer_0")["exit_code"]
    assert exit_code != 0

    body = record(of_type(events, "pull_request")[0])["body"]
    assert section_of_tests(body) == [
        f"The environment could not be set up ({error}): tests could not run.",
        f"- `{TESTS}`: exit {exit_code} (failed); the reviewer reported: could not run: pytest is not installed",
        f"- `{NEVER_RAN}`: not run in the sandbox; the reviewer reported: could not run: pytest is not installed"]
    assert "passed" not in body
