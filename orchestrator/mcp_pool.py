"""The MCP servers of `mcp.json`, connected once and shared by every run.

Each server has a supervisor task that holds its `mcp.Client` open, pings it, and reconnects (restarting a stdio
server) when the connection is lost. A call on a lost connection raises `ServerUnavailable`, which ends that run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, Tool

from . import telemetry

log = logging.getLogger(__name__)

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
PING_SECONDS = 10.0
START_SECONDS = 60.0


class ConfigError(Exception):
    """mcp.json cannot be used; the message says what to fix."""


class ServerUnavailable(Exception):
    """An MCP server is down or its connection broke during a call."""


def expand(value: str, env: dict[str, str]) -> str:
    """`${VAR}` and `${VAR:-default}` replaced from `env`; an unset VAR without a default becomes ''."""
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


@dataclass(frozen=True)
class ServerSpec:
    name: str
    target: StdioServerParameters | str  # stdio parameters, or the URL of a streamable HTTP server
    headers: dict[str, str] = field(default_factory=dict)  # sent to an HTTP server, e.g. its bearer token

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Client]:
        """A connected client; a new transport each time, since a transport serves one connection."""
        if isinstance(self.target, str) and self.headers:
            async with create_mcp_http_client(headers=self.headers) as http:
                async with Client(streamable_http_client(self.target, http_client=http)) as client:
                    yield client
        else:
            async with Client(self.target) as client:
                yield client


def load_config(path: Path, env: dict[str, str] | None = None) -> list[ServerSpec]:
    """The servers of a Claude Desktop style `mcp.json`; relative commands resolve against its folder."""
    env = dict(os.environ) if env is None else env
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; pass --mcp-config with the path of mcp.json") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    servers = raw.get("mcpServers") if isinstance(raw, dict) else None
    if not isinstance(servers, dict) or not servers:
        raise ConfigError(f"{path} has no \"mcpServers\" object")
    specs = []
    for name, entry in servers.items():
        if not re.fullmatch(r"[A-Za-z0-9-]{1,32}", name):
            raise ConfigError(f"server name {name!r} in {path}: use letters, digits and '-' only")
        if not isinstance(entry, dict):
            raise ConfigError(f"server {name!r} in {path} is not an object")
        if entry.get("type") in ("http", "streamable-http") or "url" in entry:
            if not entry.get("url"):
                raise ConfigError(f"server {name!r} in {path} is of type http but has no \"url\"")
            headers = {k: expand(str(v), env) for k, v in (entry.get("headers") or {}).items()}
            specs.append(ServerSpec(name, expand(str(entry["url"]), env), headers))
            continue
        command = expand(str(entry.get("command", "")), env)
        if not command:
            raise ConfigError(f"server {name!r} in {path} has neither \"command\" nor \"url\"")
        if "/" in command and not os.path.isabs(command):
            command = os.path.normpath(path.parent.absolute() / command)  # not resolve(): a venv python is a link
        args = [expand(str(a), env) for a in entry.get("args", [])]
        # Only what the entry names reaches the server (on top of the SDK's PATH/HOME defaults): no secret of ours.
        # OpenTelemetry's settings do too, so the server's spans join the run's trace; it names its own service.
        server_env = {k: v for k, v in env.items() if k.startswith("OTEL_") and k != "OTEL_SERVICE_NAME"}
        server_env.update({k: expand(str(v), env) for k, v in (entry.get("env") or {}).items()})
        specs.append(ServerSpec(name, StdioServerParameters(command=command, args=args, env=server_env,
                                                            cwd=str(path.parent))))
    return specs


@dataclass
class Connection:
    spec: ServerSpec
    state: str = "starting"
    error: str | None = None
    restarts: int = 0
    tools: list[Tool] = field(default_factory=list)
    client: Client | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    async def supervise(self) -> None:
        with telemetry.untraced():  # connecting and liveness listings belong to no run's trace
            await self._supervise()

    async def _supervise(self) -> None:
        delay = 0.5
        while True:
            try:
                async with self.spec.connect() as client:
                    self.tools = (await client.list_tools()).tools
                    self.client, self.state, self.error = client, "up", None
                    self.ready.set()
                    delay = 0.5
                    await self._watch(client)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - any failure of a server means: reconnect
                self.error = _describe(exc)
                log.warning("MCP server %s: %s", self.spec.name, self.error)
            self.client, self.state = None, "down"
            self.ready.clear()
            self.lost.clear()
            self.restarts += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30)

    async def _watch(self, client: Client) -> None:
        while True:
            try:
                await asyncio.wait_for(self.lost.wait(), PING_SECONDS)
                return
            except TimeoutError:
                # A fresh listing doubles as a liveness check (ping is gone from the current protocol).
                listing = await asyncio.wait_for(client.list_tools(cache_mode="refresh"), PING_SECONDS)
                self.tools = listing.tools


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:500]


class ToolPool:
    """Every configured server's connection and tools."""

    def __init__(self, specs: list[ServerSpec]):
        self.connections = {s.name: Connection(s) for s in specs}

    async def start(self, wait_s: float = START_SECONDS) -> None:
        """Connect to every server; wait (bounded) until each is up, logging those that are not."""
        for conn in self.connections.values():
            conn.task = asyncio.create_task(conn.supervise(), name=f"mcp:{conn.spec.name}")
        try:
            await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in self.connections.values())), wait_s)
        except TimeoutError:
            for conn in self.connections.values():
                if conn.state != "up":
                    log.error("MCP server %s is not up: %s", conn.spec.name, conn.error)

    async def close(self) -> None:
        tasks = [c.task for c in self.connections.values() if c.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def tools(self) -> dict[str, list[Tool]]:
        return {name: c.tools for name, c in self.connections.items()}

    def health(self) -> dict[str, Any]:
        return {name: {"state": c.state, "tools": len(c.tools), "restarts": c.restarts, "error": c.error}
                for name, c in self.connections.items()}

    async def call(self, server: str, tool: str, arguments: dict[str, Any], timeout_s: float,
                   on_progress: Callable[[str], None] | None = None) -> CallToolResult:
        """Call a tool; `TimeoutError` past `timeout_s`, `ServerUnavailable` when the server is down or lost. The
        text of each progress message the tool sends while it runs (a command's output) goes to `on_progress`."""
        conn = self.connections.get(server)
        if conn is None:
            raise ServerUnavailable(f"no MCP server named {server!r} in the configuration")
        if conn.client is None:
            raise ServerUnavailable(f"MCP server {server!r} is down ({conn.error or 'starting'})")
        try:
            with telemetry.tool_span(server, tool, arguments) as traced:
                async with asyncio.timeout(timeout_s):
                    result = await conn.client.call_tool(tool, arguments,
                                                         progress_callback=_progress(on_progress))
                traced.done(result.is_error, result.content)
                return result
        except MCPError as exc:
            if exc.code == -32000:  # connection closed: the server process is gone
                conn.lost.set()
                raise ServerUnavailable(f"MCP server {server!r} went away during {tool}; it is being restarted") \
                    from None
            raise ServerUnavailable(f"MCP server {server!r} refused {tool}: {exc}") from None
        except TimeoutError:
            raise
        except (OSError, EOFError) as exc:
            conn.lost.set()
            raise ServerUnavailable(f"MCP server {server!r} connection failed during {tool}: {exc}") from None


def _progress(on_progress: Callable[[str], None] | None) -> Callable[..., Any] | None:
    """The SDK's progress callback, passing on each message's text; None asks the server for no progress."""
    if on_progress is None:
        return None

    async def progress(_progress: float, _total: float | None, message: str | None) -> None:
        if message:
            on_progress(message)

    return progress
