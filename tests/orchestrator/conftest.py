"""The orchestrator under test: real MCP servers over stdio, the real SDK against the scripted Messages API, and
the real HTTP service on loopback, read as a client reads it."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
import pytest_asyncio
from aiohttp import web

from orchestrator.app import build_app
from orchestrator.config import RunLimits, Settings
from orchestrator.mcp_pool import ToolPool, load_config
from orchestrator.model import AnthropicModel
from orchestrator.run import Services
from orchestrator.runs import RunManager
from orchestrator.store import RunStore, SQLiteRunStore
from tests.conftest import remove_sandbox_root
from tests.fakes.messages_api import MessagesAPI, messages_api

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-ant-api03-" + "K" * 48
GITHUB_TOKEN = "ghp_" + "T" * 36
FAST = RunLimits(max_turns=20, max_tokens=1_000_000, run_seconds=120, tool_seconds=60, overloaded_retries=2,
                 overloaded_backoff_s=0)


@dataclass
class Stack:
    """A running service and its scripted model."""

    url: str
    api: MessagesAPI
    services: Services


@pytest.fixture(scope="session")
def sandbox_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="tb-test-orchestrator-"))
    root.chmod(0o711)
    yield root
    remove_sandbox_root(root)


@pytest.fixture(scope="session")
def mcp_config(sandbox_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's mcp.json, with a python that exists here and a sandbox root the tests can inspect."""
    config = json.loads((ROOT / "mcp.json").read_text())
    for entry in config["mcpServers"].values():
        entry["command"] = sys.executable
        entry.setdefault("env", {})
    config["mcpServers"]["sandbox"]["env"].update({"SANDBOX_ROOT": str(sandbox_root),
                                                  "SANDBOX_BACKEND": "local"})
    config["mcpServers"]["github"]["env"].update({"GITHUB_TOKEN": GITHUB_TOKEN, "GITHUB_WRITE_INTERVAL_S": "0"})
    path = tmp_path_factory.mktemp("config") / "mcp.json"
    path.write_text(json.dumps(config))
    return path


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def pool(mcp_config: Path) -> AsyncIterator[ToolPool]:
    """Both MCP servers, started once over stdio for the whole session."""
    tool_pool = ToolPool(load_config(mcp_config, env={"PATH": os.environ["PATH"]}))
    await tool_pool.start(wait_s=60)
    assert all(c.state == "up" for c in tool_pool.connections.values()), tool_pool.health()
    yield tool_pool
    await tool_pool.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def serve(services: Services, store: RunStore | None = None, host: str = "127.0.0.1"
                ) -> AsyncIterator[str]:
    """The service on a loopback port, as `python -m orchestrator --host HOST` runs it (reached through loopback
    whatever `host` says), on `store` (open), else on an SQLite store of its own."""
    if store is None:
        store = SQLiteRunStore(Path(tempfile.mkdtemp(prefix="tb-test-store-")) / "runs.sqlite3")
        await store.open()
    runs = RunManager(services, store)
    await runs.begin()
    runner = web.AppRunner(build_app(runs, host=host), handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runs.shutdown(0)
        await runner.cleanup()
        await store.close()


@asynccontextmanager
async def stack(pool: ToolPool, script: list, limits: RunLimits = FAST, max_retries: int = 2,
                **settings: Any) -> AsyncIterator[Stack]:
    """The scripted model, the service in front of it, and the shared MCP servers."""
    async with messages_api(script) as api:
        cfg = replace(Settings(model="claude-sonnet-test", limits=limits), **settings)
        client = anthropic.AsyncAnthropic(base_url=api.url, api_key=API_KEY, max_retries=max_retries)
        model = AnthropicModel(client, cfg.model, cfg.limits.max_output_tokens, cfg.limits.overloaded_retries,
                               cfg.limits.overloaded_backoff_s)
        services = Services(cfg, pool, model)
        async with serve(services) as url:
            yield Stack(url, api, services)


def parse_sse(raw: str) -> list[dict[str, Any]]:
    """Events of an SSE stream, checking each `id:` against the event's `seq`."""
    events = []
    for block in raw.split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if not lines:
            continue
        fields = dict(ln.split(": ", 1) for ln in lines)
        event = json.loads(fields["data"])
        assert int(fields["id"]) == event["seq"]
        events.append(event)
    return events


async def post_code(url: str, body: Any, timeout: float = 90) -> tuple[int, Any, str]:
    """POST /code and read the whole answer: (status, events or JSON error, raw text)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        async with http.post(url + "/code", data=data, headers={"Content-Type": "application/json"}) as resp:
            raw = await resp.text()
            if resp.content_type == "text/event-stream":
                assert resp.headers["Cache-Control"] == "no-cache"
                assert resp.headers["X-Accel-Buffering"] == "no"
                return resp.status, parse_sse(raw), raw
            return resp.status, json.loads(raw), raw


def of_type(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]
