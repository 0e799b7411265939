"""The service against the fake GitHub: a session `FakeGitHub` (tests/fakes/github_api.py), a session `ToolPool`
whose github server talks to it, and `github_stack`, the service in front of the scripted model with
TB_GITHUB_HOSTS=127.0.0.1, so that a repoUrl `octo/demo` is `https://127.0.0.1/octo/demo` on the fake.

A test module takes the fixtures by naming them at its top level:

    from . import github_stack as fake_github_stack
    from .github_stack import add_repo, github_stack

    fake_github, github_pool = fake_github_stack.fake_github, fake_github_stack.github_pool  # fixtures

    async def test_x(github_pool, fake_github):
        repo = add_repo(fake_github, {"calc.py": "..."})
        async with github_stack(github_pool, script) as s:
            await post_code(s.url, {"repoUrl": repo.full_name, "issue": 1})

The fake is shared by the session: each test makes repositories of its own (`add_repo` names them uniquely) and
leaves the fake's switches (forks' delay, secondary rate limits) as it found them (`realism`).
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from orchestrator.mcp_pool import ToolPool, load_config
from tests.conftest import remove_sandbox_root
from tests.fakes.github_api import FakeGitHub
from tests.fakes.github_json import FakeRepo

from .conftest import Stack, stack

HOST = "127.0.0.1"  # the fake's host: the GitHub host of the service (TB_GITHUB_HOSTS) and of the github server
BOT = "tiny-backspace-bot"  # whom the github server's token belongs to
BOT_TOKEN = "ghp_" + "B" * 36
OWNER = "octo"
# Where the session's fakes serve clones from (their `clone_url`s): local repositories the service accepts
# (TB_LOCAL_ROOTS), as it accepts a clone URL only where a request could name the repository itself.
CLONE_ROOTS: list[Path] = []


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def fake_github() -> AsyncIterator[FakeGitHub]:
    """The fake GitHub REST API, for the whole session; it knows the github server's token as `BOT`'s."""
    fake = FakeGitHub()
    fake.tokens[BOT_TOKEN] = BOT
    await fake.start()
    CLONE_ROOTS.append(fake.clones)
    yield fake
    CLONE_ROOTS.remove(fake.clones)
    await fake.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def github_pool(fake_github: FakeGitHub, mcp_config: Path, request: pytest.FixtureRequest,
                      tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ToolPool]:
    """Both MCP servers over stdio, the github server's GitHub the fake (GITHUB_API_URL, its token, no pause
    between writes). The sandbox server's root is its own, so that a test looking for the session pool's sandbox
    server by its root (conftest.sandbox_root) finds that one alone."""
    root = Path(tempfile.mkdtemp(prefix="tb-test-github-"))
    root.chmod(0o711)
    request.addfinalizer(lambda: remove_sandbox_root(root))  # after the pool closed, outside the event loop
    config = json.loads(mcp_config.read_text())
    config["mcpServers"]["sandbox"]["env"]["SANDBOX_ROOT"] = str(root)
    config["mcpServers"]["github"]["env"].update({"GITHUB_API_URL": fake_github.base_url, "GITHUB_TOKEN": BOT_TOKEN,
                                                  "GITHUB_WRITE_INTERVAL_S": "0",
                                                  "GITHUB_MAX_RATE_LIMIT_WAIT_S": "10"})
    tool_pool = await started_pool(config, tmp_path_factory)
    yield tool_pool
    await tool_pool.close()


async def started_pool(config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> ToolPool:
    """The MCP servers of `config` (an mcp.json's content), started and up."""
    path = tmp_path_factory.mktemp("github-config") / "mcp.json"
    path.write_text(json.dumps(config))
    tool_pool = ToolPool(load_config(path, env={"PATH": os.environ["PATH"]}))
    await tool_pool.start(wait_s=60)
    assert all(c.state == "up" for c in tool_pool.connections.values()), tool_pool.health()
    return tool_pool


def add_repo(fake: FakeGitHub, files: dict[str, str], *, pushers: set[str] | None = None,
             name: str | None = None, **options: Any) -> FakeRepo:
    """A repository of its own on the fake, holding `files` on `main`; the bot may push to it unless `pushers`
    says who may."""
    full_name = f"{OWNER}/{name or 'demo-' + secrets.token_hex(4)}"
    return fake.add_repo(full_name, files, pushers={BOT} if pushers is None else pushers, **options)


@contextmanager
def realism(fake: FakeGitHub, *, fork_delay_s: float = 0.0, rate_limit_every: int = 0) -> Iterator[None]:
    """What real GitHub does, switched on for a block, where the fake does it: forks copied asynchronously (their
    git data answers 409 for `fork_delay_s`), and a secondary rate limit on every `rate_limit_every`-th write."""
    saved = {name: getattr(fake, name) for name in ("fork_delay_s", "secondary") if hasattr(fake, name)}
    if "fork_delay_s" in saved:
        fake.fork_delay_s = fork_delay_s
    if "secondary" in saved and rate_limit_every:
        fake.secondary = type(saved["secondary"])(every=rate_limit_every)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(fake, name, value)


@asynccontextmanager
async def github_stack(pool: ToolPool, script: list, **settings: Any) -> AsyncIterator[Stack]:
    """The scripted model and the service in front of it (`conftest.stack`), with the fake's host as its GitHub
    host."""
    async with stack(pool, script, github_hosts=(HOST,), local_roots=tuple(CLONE_ROOTS), **settings) as s:
        yield s
