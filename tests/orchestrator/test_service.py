"""`python -m orchestrator` as an operator runs it: start-up, a run through it, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import tempfile
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import unique_marker
from tests.fakes.messages_api import messages_api, tool_use, turn

from .conftest import API_KEY, ROOT, free_port
from .test_failures import _processes
from .test_run import BUGGY

SIGTERM_MARK = unique_marker()
pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_sigterm_lets_runs_finish_within_the_grace_then_cancels_them_and_cleans_up(mcp_config, make_repo):
    data, root = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    root.chmod(0o711)
    config = json.loads(mcp_config.read_text())
    config["mcpServers"]["sandbox"]["env"]["SANDBOX_ROOT"] = str(root)
    (data / "mcp.json").write_text(json.dumps(config))
    port = free_port()
    script = [turn(tool_use("sandbox_exec", {"command": f"sleep {SIGTERM_MARK}"}))]
    async with messages_api(script) as api:
        env = {"PATH": os.environ["PATH"], "HOME": str(data), "ANTHROPIC_API_KEY": API_KEY,
               "ANTHROPIC_BASE_URL": api.url, "TB_DATA_DIR": str(data), "TB_SHUTDOWN_GRACE_S": "1",
               "TB_MODEL": "claude-sonnet-test"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "orchestrator", "--port", str(port), "--mcp-config", str(data / "mcp.json"),
            cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(60), aiohttp.ClientSession() as http:
                while True:
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                            if (await resp.json())["status"] == "healthy":
                                break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.1)
                body = {"repoUrl": str(make_repo(BUGGY)), "prompt": "Go", "mode": "single"}
                async with http.post(f"http://127.0.0.1:{port}/code", json=body) as resp:
                    while b'"state":"complete"' not in await resp.content.readline():
                        pass
                    while not _processes(SIGTERM_MARK):
                        await asyncio.sleep(0.05)
                    proc.send_signal(signal.SIGTERM)
                    tail = await resp.text()
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
                print((await proc.stderr.read()).decode()[-3000:])
    assert code == 0
    assert '"reason":"cancelled"' in tail and '"status":"cancelled"' in tail
    status = sqlite3.connect(data / "runs.sqlite3").execute("SELECT status FROM runs").fetchall()
    assert status == [("cancelled",)]
    assert not _processes(SIGTERM_MARK) and list(root.glob("*/sbx-*")) == []
