"""A sandbox server removes what another server left of a sandbox when it died: another replica that adopts a dead
replica's runs knows their sandbox ids, not the server that made them."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from pathlib import Path

import anyio
import modal
import pytest
from mcp import StdioServerParameters

from servers.sandbox.manager import SandboxManager, Settings
from servers.sandbox.server import build_server
from tests.conftest import held_client, unique_marker

from .conftest import ROOT, SECRETS, server_env
from .fake_modal import LocalModal
from .helpers import call, call_error, sandbox
from .test_jail import gone, host_processes, sandbox_dirs

REPO = {"README.md": "# demo\n"}
FOUND = "not held by this server; removed what was left of it"


def new_id() -> str:
    return "sbx_" + secrets.token_urlsafe(18)


def server_pids(root: Path) -> list[int]:
    """The sandbox server processes on `root` (a stdio server's, whose pid its client does not give)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"servers.sandbox" in cmdline and f"SANDBOX_ROOT={root}\0".encode() in environ:
            found.append(int(pid))
    return found


@pytest.fixture
def fake(monkeypatch, sandbox_root) -> LocalModal:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    fake = LocalModal(monkeypatch, sandbox_root / "modal")

    async def listed(app_id: str, tags: dict[str, str], **_):
        """Modal's listing: the running sandboxes of the app that carry every tag asked for."""
        assert app_id == fake.app.app_id
        for made, box in zip(fake.Sandbox.create.aio.call_args_list, fake.sandboxes):
            if tags.items() <= made.kwargs["tags"].items() and not fake.containers[box.object_id].terminated:
                yield box

    fake.Sandbox.list.aio.side_effect = listed
    return fake


async def test_a_sandbox_whose_server_was_killed_is_removed_by_another_server(sandbox_root, make_repo):
    marker = unique_marker()
    dead = StdioServerParameters(command=sys.executable, args=["-m", "servers.sandbox"], cwd=str(ROOT),
                                 env=server_env(SANDBOX_ROOT=str(sandbox_root)))
    # The other server runs already when the first dies, as another replica's does.
    async with held_client(build_server(Settings(backend="local", root=sandbox_root))) as other:
        async with held_client(dead) as doomed:
            sid = await sandbox(doomed, make_repo(REPO))
            running = asyncio.create_task(doomed.call_tool("exec", {"sandbox_id": sid, "command": f"sleep {marker}"}))
            with anyio.fail_after(10):
                while not host_processes(marker):
                    await asyncio.sleep(0.05)
            [pid] = server_pids(sandbox_root)
            os.kill(pid, signal.SIGKILL)
            with anyio.fail_after(10):
                while server_pids(sandbox_root):
                    await asyncio.sleep(0.05)
            running.cancel()
        [folder] = sandbox_dirs(sandbox_root)  # its folder stays: nobody removed it
        answer = await call(other, "destroy_sandbox", sandbox_id=sid)
        assert answer == {"sandbox_id": sid, "destroyed": False, "note": FOUND, "removed": [str(folder)]}
        assert not folder.exists() and list(sandbox_root.glob("server-*")) == []
        assert await gone(marker)
        # Asked again, it says the same; the sandbox was never this server's to refuse.
        assert await call(other, "destroy_sandbox", sandbox_id=sid) == answer
        assert "never existed" in await call_error(other, "exec", sandbox_id=sid, command="true")


async def test_what_a_dead_server_left_is_accounted_for_after_a_restart_removed_it(sandbox_root, make_repo):
    dead = SandboxManager(Settings(backend="local", root=sandbox_root))
    info = await dead.create(str(make_repo(REPO)), None)
    [folder] = sandbox_dirs(sandbox_root)
    os.close(dead._instance[1])  # what the kernel does when a server process dies
    async with held_client(build_server(Settings(backend="local", root=sandbox_root))) as restarted:
        assert sandbox_dirs(sandbox_root) == []  # removed at start-up
        answer = await call(restarted, "destroy_sandbox", sandbox_id=info.sandbox_id)
    assert answer == {"sandbox_id": info.sandbox_id, "destroyed": False, "note": FOUND, "removed": [str(folder)]}


async def test_a_server_alive_on_this_machine_keeps_its_sandbox(sandbox_root, make_repo):
    async with (held_client(build_server(Settings(backend="local", root=sandbox_root))) as owner,
                held_client(build_server(Settings(backend="local", root=sandbox_root))) as other):
        sid = await sandbox(owner, make_repo(REPO))
        answer = await call(other, "destroy_sandbox", sandbox_id=sid)
        assert answer["destroyed"] is False and answer["removed"] == []
        assert (await call(owner, "exec", sandbox_id=sid, command="cat README.md"))["stdout"] == "# demo\n"


async def test_an_unknown_id_is_answered_and_a_malformed_or_destroyed_one_refused(sandbox_root, make_repo):
    async with held_client(build_server(Settings(backend="local", root=sandbox_root))) as c:
        unknown = new_id()
        assert await call(c, "destroy_sandbox", sandbox_id=unknown) == {
            "sandbox_id": unknown, "destroyed": False, "removed": [],
            "note": "not held by this server; none of it found on this machine"}
        for malformed in ["sbx_guess", new_id() + "x", "sbx_../../../etc/passwd", "", "sbx_" + "?" * 24]:
            assert "never existed" in await call_error(c, "destroy_sandbox", sandbox_id=malformed)
        sid = await sandbox(c, make_repo(REPO))
        assert await call(c, "destroy_sandbox", sandbox_id=sid) == {"sandbox_id": sid, "destroyed": True}
        assert "create_sandbox" in await call_error(c, "destroy_sandbox", sandbox_id=sid)


async def test_a_modal_sandbox_is_terminated_by_a_server_that_never_held_it(fake, sandbox_root, make_repo):
    async with (held_client(build_server(Settings(backend="modal", root=sandbox_root))) as maker,
                held_client(build_server(Settings(backend="modal", root=sandbox_root))) as other):
        sid = await sandbox(maker, make_repo(REPO))
        [box] = fake.sandboxes
        answer = await call(other, "destroy_sandbox", sandbox_id=sid)
        assert answer == {"sandbox_id": sid, "destroyed": False, "note": FOUND,
                          "removed": [f"Modal sandbox {box.object_id}"]}
        assert fake.terminated == [box.object_id]
        asked = [c.kwargs["tags"] for c in fake.Sandbox.list.aio.call_args_list]
        assert asked == [{"app": "tiny-backspace", "sandbox_id": sid},
                         {"app": "tiny-backspace", "sandbox_id": f"{sid}.setup"}]
        assert "failed on Modal" in await call_error(maker, "exec", sandbox_id=sid, command="true")


async def test_with_modal_an_unknown_id_finds_nothing_and_an_outage_says_so(fake, sandbox_root):
    async with held_client(build_server(Settings(backend="modal", root=sandbox_root))) as c:
        unknown = new_id()
        assert await call(c, "destroy_sandbox", sandbox_id=unknown) == {
            "sandbox_id": unknown, "destroyed": False, "removed": [],
            "note": "not held by this server; none of it found on this machine or on Modal"}
        fake.Sandbox.list.aio.side_effect = modal.exception.AuthError("Token ID is malformed")
        msg = await call_error(c, "destroy_sandbox", sandbox_id=unknown)
        assert "could not ask Modal" in msg and "Token ID is malformed" in msg and "try again" in msg
    assert fake.terminated == []
