"""A new user's first minutes: a service with no model set up says so, a keyless compatible server works, a request
that would fail late is refused at once, and a failed run says why and leaves no branch behind."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import git
from tests.fakes.messages_api import http_error, messages_api, text, tool_use, turn

from .conftest import ROOT, free_port, of_type, post_code, stack
from .test_failures import sandboxes
from .test_run import BUGGY, fix_script

pytestmark = pytest.mark.asyncio(loop_scope="session")


@dataclass
class Service:
    url: str
    log: Path
    sandbox_root: Path


@asynccontextmanager
async def service(mcp_config: Path, tmp_path: Path, env: dict[str, str]) -> AsyncIterator[Service]:
    """`python -m orchestrator` as an operator starts it, with no ANTHROPIC_* variable but those in `env`, its own
    data folder and sandbox root; ready once /health answers."""
    data = tmp_path / "service-data"
    data.mkdir()
    # Sandboxes run as other users, who must traverse the root: pytest's tmp_path is private to this one.
    root = Path(tempfile.mkdtemp(prefix="tb-test-first-minutes-"))
    root.chmod(0o711)
    config = json.loads(mcp_config.read_text())
    config["mcpServers"]["sandbox"]["env"]["SANDBOX_ROOT"] = str(root)
    (data / "mcp.json").write_text(json.dumps(config))
    url, log = f"http://127.0.0.1:{free_port()}", data / "service.log"
    base = {"PATH": os.environ["PATH"], "HOME": str(data), "TB_DATA_DIR": str(data), "TB_MODEL": "claude-sonnet-test",
            "TB_SHUTDOWN_GRACE_S": "1"}
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "orchestrator", "--port", url.rsplit(":", 1)[1], "--mcp-config",
            str(data / "mcp.json"), cwd=ROOT, env=base | env, stdout=out, stderr=out)
    try:
        async with asyncio.timeout(60), aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(url + "/health") as resp:
                        await resp.read()
                        break
                except aiohttp.ClientConnectionError:
                    assert proc.returncode is None, log.read_text()
                    await asyncio.sleep(0.1)
        yield Service(url, log, root)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(30):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        shutil.rmtree(root, ignore_errors=True)


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return await resp.json()


def branches(repo: Path) -> list[str]:
    return git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads").split()


async def test_without_a_key_the_service_says_what_to_set_and_refuses_runs_before_any_sandbox(mcp_config, make_repo,
                                                                                              tmp_path):
    repo = make_repo(BUGGY)
    async with service(mcp_config, tmp_path, {}) as svc:
        health = await get_json(svc.url + "/health")
        code, answer, _ = await post_code(svc.url, {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"})
        runs = await get_json(svc.url + "/runs")
        left = sandboxes(svc.sandbox_root)
    assert health["status"] == "degraded"
    assert "ANTHROPIC_API_KEY" in health["reasons"]["model"] and "ANTHROPIC_BASE_URL" in health["reasons"]["model"]
    assert code == 503 and "ANTHROPIC_API_KEY" in answer["error"] and "ANTHROPIC_BASE_URL" in answer["error"]
    assert runs["runs"] == [] and left == [] and branches(repo) == ["main"]
    said = [line for line in svc.log.read_text().splitlines() if "ANTHROPIC_API_KEY" in line]
    assert len(said) == 1 and "WARNING" in said[0], said


async def test_a_compatible_server_that_needs_no_key_runs_a_job_to_its_pull_request(mcp_config, make_repo, tmp_path):
    async with messages_api(fix_script(), keyless=True) as api:
        async with service(mcp_config, tmp_path, {"ANTHROPIC_BASE_URL": api.url}) as svc:
            health = await get_json(svc.url + "/health")
            _, events, _ = await post_code(svc.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Fix add()",
                                                     "mode": "single"})
    assert health["status"] == "healthy" and "reasons" not in health
    assert of_type(events, "error") == [] and events[-1]["status"] == "success"
    assert of_type(events, "pull_request")[0]["url"].startswith("file://")


async def test_unknown_fields_are_refused_naming_them_and_the_accepted_ones(pool, make_repo):
    repo = make_repo(BUGGY)
    async with stack(pool, []) as s:
        code, answer, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Fix add()", "mdoe": "single",
                                                  "branch": "tb/mine"})
    assert code == 400 and answer["error"].startswith("unknown fields: branch, mdoe")
    assert all(name in answer["error"] for name in ("repoUrl", "prompt", "mode", "on_disconnect"))
    assert branches(repo) == ["main"]


@pytest.mark.parametrize("prompt, named", [
    ("Fix add()\x00 and its test", "U+0000 (NUL) at offset 9"),
    ("Fix \x1b[31madd()", "U+001B (ESC) at offset 4"),
    ("Fix add()\u0085", "U+0085 at offset 9"),
])
async def test_a_control_character_in_the_prompt_is_refused_naming_it_and_where(pool, make_repo, prompt, named):
    repo = make_repo(BUGGY)
    async with stack(pool, [turn(text("Nothing to change."))]) as s:
        code, answer, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": prompt, "mode": "single"})
        # Newlines, tabs and carriage returns are text, not control: accepted.
        accepted, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Fix add()\r\n\tplease",
                                                      "mode": "single"})
    assert code == 400 and named in answer["error"] and "prompt" in answer["error"]
    assert accepted == 200 and events[-1]["status"] == "no_changes"
    assert branches(repo) == ["main"]


async def test_a_run_that_fails_before_it_has_changes_leaves_no_branch(pool, make_repo):
    repo = make_repo(BUGGY)
    script = [turn(text("A branch first."), tool_use("github_create_branch", {"branch": "tb/early"})),
              http_error(400, message="The model gave up.")]
    async with stack(pool, script) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"})
    told = of_type(events, "tool_result")[0]
    assert told["is_error"] and "no changes yet" in told["content"]
    assert events[-1]["status"] == "error" and branches(repo) == ["main"]


async def test_a_failed_run_says_why_in_its_record(pool, make_repo):
    async with stack(pool, [http_error(401, message="invalid x-api-key")]) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Fix add()",
                                               "mode": "single"})
        record = await get_json(f"{s.url}/runs/{events[0]['run_id']}")
        listed = (await get_json(f"{s.url}/runs"))["runs"][0]
    assert record["status"] == "error" and record["error"]["reason"] == "model"
    assert "invalid x-api-key" in record["error"]["message"] and "ANTHROPIC_API_KEY" in record["error"]["message"]
    assert listed["error"] == record["error"]
