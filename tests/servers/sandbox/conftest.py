"""Connections to the sandbox server: in process for each backend, and over real stdio and streamable HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client, StdioServerParameters

from servers.sandbox.manager import Settings
from servers.sandbox.modal_setup import has_credentials
from servers.sandbox.server import build_server
from tests.conftest import held_client, remove_sandbox_root

ROOT = Path(__file__).resolve().parents[3]
# Planted in every server's environment; no sandbox may ever see them.
SECRETS = {"GITHUB_TOKEN": "ghp_" + "S3cr3tT0k3nFromTheServerEnv000000000", "ANTHROPIC_API_KEY": "sk-ant-api03-" + "x" * 40}
# Modal runs the same contract wherever a Modal token is configured; elsewhere the skip says why.
MODAL = pytest.param("modal", marks=pytest.mark.skipif(
    not has_credentials(), reason="no Modal credentials (MODAL_TOKEN_ID and MODAL_TOKEN_SECRET, or `modal token "
                                  "new`): the Modal contract run is skipped"))
CONNECTIONS = ["local", "process", "stdio", "http", MODAL]


def server_env(**extra: str) -> dict[str, str]:
    # The local backend unless a test asks for another: `auto` would pick Modal wherever a token is configured.
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "SANDBOX_BACKEND": "local",
            **SECRETS, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sandbox_root() -> Iterator[Path]:
    """A sandbox root the unprivileged sandbox user can reach (pytest's own tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="tb-test-sandboxes-"))
    root.chmod(0o711)
    yield root
    remove_sandbox_root(root)


@pytest.fixture(scope="session")
def http_server_url() -> Iterator[str]:
    """One sandbox server over streamable HTTP for the whole session, as a real subprocess."""
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="tb-test-http-sandboxes-"))
    root.chmod(0o711)
    proc = subprocess.Popen(
        [sys.executable, "-m", "servers.sandbox", "--transport", "http", "--port", str(port)],
        cwd=ROOT, env=server_env(SANDBOX_ROOT=str(root)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        with httpx.Client() as http:
            for _ in range(300):  # bounded: ~30 s at most
                try:
                    http.get(url.removesuffix("/mcp") + "/", timeout=0.1)
                    break
                except httpx.TransportError:
                    if proc.poll() is not None:
                        raise RuntimeError("the HTTP sandbox server exited at start-up")
                    proc_wait(proc, 0.1)
            else:
                raise RuntimeError("the HTTP sandbox server did not start within 30 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        remove_sandbox_root(root)


def proc_wait(proc: subprocess.Popen, seconds: float) -> None:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture(params=CONNECTIONS)
async def sandbox_client(request: pytest.FixtureRequest, sandbox_root: Path, monkeypatch: pytest.MonkeyPatch
                         ) -> AsyncIterator[Client]:
    """An MCP client connected to a sandbox server; `client.connection` names how."""
    kind = request.param
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    if kind in ("local", "process", "modal"):
        server = build_server(Settings(backend=kind, allow_unsafe=True, root=sandbox_root))
        target = server
    elif kind == "stdio":
        target = StdioServerParameters(command=sys.executable, args=["-m", "servers.sandbox"], cwd=str(ROOT),
                                       env=server_env(SANDBOX_ROOT=str(sandbox_root)))
    else:
        target = request.getfixturevalue("http_server_url")
    async with held_client(target) as client:
        client.connection = kind  # type: ignore[attr-defined]
        yield client


class Watched:
    """An MCP client of a sandbox server, and the live output each call streamed."""

    def __init__(self, client: Client):
        self.client = client

    async def call(self, tool: str, **arguments: Any) -> tuple[dict, str]:
        seen: list[str] = []

        async def progress(_: float, __: float | None, message: str | None) -> None:
            seen.append(message or "")

        result = await self.client.call_tool(tool, arguments, progress_callback=progress)
        assert not result.is_error, result.content[0].text
        return result.structured_content, "".join(seen)


@pytest.fixture
async def sandbox_servers(sandbox_root: Path) -> AsyncIterator[Callable[..., Awaitable[Watched]]]:
    """A factory of in-process sandbox servers on one root (so they share its environment cache)."""
    async with AsyncExitStack() as stack:
        async def start(**settings: Any) -> Watched:
            server = build_server(Settings(backend="local", root=sandbox_root, **settings))
            return Watched(await stack.enter_async_context(held_client(server)))

        yield start
