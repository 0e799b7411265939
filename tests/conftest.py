"""Fixtures shared by every test: real git repositories made on the spot."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

pytest_plugins = ["tests.fakes.package_index"]  # the `package_index` fixture: PyPI and npm on loopback
pytest_plugins += ["tests.postgres"]  # `postgres_url`, `database_url`: a real PostgreSQL

GIT_ENV = {"GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "Test",
           "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "Test",
           "GIT_COMMITTER_EMAIL": "test@example.com"}


def remove_sandbox_root(root: Path) -> None:
    """Remove a test's sandbox root as the next server on it would: what its servers left (a server a test killed
    leaves volumes mounted and control groups behind) is reaped first."""
    from servers.sandbox import volume
    from servers.sandbox.manager import SandboxManager, Settings

    asyncio.run(SandboxManager(Settings(backend="local", root=root)).reap_orphans())
    asyncio.run(volume.unmount_under(root))  # the prepared environments it kept
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(root)], check=False)


def unique_marker() -> str:
    """A number to tag a test's processes with, so that tests running at the same time never see each other's."""
    return str(secrets.randbelow(9 * 10**8) + 10**8)


def git(repo: Path, *args: str) -> str:
    """Run git in `repo` and return its stdout; fail the test on a non-zero exit."""
    out = subprocess.run(["git", *args], cwd=repo, env=os.environ | GIT_ENV, check=True, capture_output=True,
                         text=True)
    return out.stdout.strip()


@pytest.fixture
def make_repo(tmp_path: Path) -> Callable[..., Path]:
    """Create a git repository on branch `main` holding `files` (path -> text) in one commit."""
    counter = iter(range(1000))

    def make(files: dict[str, str] | None = None, *, bare: bool = False, name: str | None = None) -> Path:
        work = tmp_path / (name or f"repo{next(counter)}")
        work.mkdir()
        git(work, "init", "-q", "-b", "main")
        for rel, text in (files or {"README.md": "# demo\n"}).items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_text(text)
        git(work, "add", "-A")
        git(work, "commit", "-q", "-m", "initial commit")
        if not bare:
            return work
        bare_path = tmp_path / f"{work.name}.git"
        git(tmp_path, "clone", "-q", "--bare", str(work), str(bare_path))
        return bare_path

    return make


@asynccontextmanager
async def held_client(target: Any) -> AsyncIterator[Client]:
    """An `mcp.Client` entered and exited in a task of its own.

    pytest-asyncio runs a fixture's setup and teardown in different tasks, and anyio's cancel scopes inside the
    client must be left in the task that entered them.
    """
    ready: asyncio.Future[Client] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def hold() -> None:
        try:
            async with Client(target) as client:
                ready.set_result(client)
                await done.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    task = asyncio.create_task(hold())
    try:
        async with asyncio.timeout(30):
            yield await ready
    finally:
        done.set()
        async with asyncio.timeout(30):
            await task
