"""What a prompt-injected agent might try inside a sandbox, and the boundary that stops each attempt."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mcp import StdioServerParameters

from servers.sandbox.cgroup import Hierarchy
from servers.sandbox.manager import SandboxManager, Settings
from servers.sandbox.server import build_server
from tests.conftest import git, held_client, unique_marker

from .conftest import ROOT, SECRETS, server_env
from .helpers import call, call_error, sandbox, sh

TIMEOUT_MARK = unique_marker()
BACKGROUND_MARK = unique_marker()
RUNNING_MARK = unique_marker()
REPO = {"README.md": "# demo\n", "app.py": "print('hi')\n"}


@pytest.fixture(params=["local", "process"])
async def client(request, sandbox_root, monkeypatch):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    server = build_server(Settings(backend=request.param, allow_unsafe=True, root=sandbox_root))
    async with held_client(server) as c:
        yield c


@pytest.fixture
async def jailed(sandbox_root, monkeypatch):
    """A client of the bubblewrap backend only: the guarantees that need a jail."""
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    async with held_client(build_server(Settings(backend="local", root=sandbox_root))) as c:
        yield c


def sandbox_dirs(root: Path) -> list[Path]:
    return list(root.glob("*/sbx-*"))


def clone_of(home: Path) -> Path:
    """Where a sandbox's repository sits on the host: in its own volume, where the host allows one."""
    return home / "volume" / "repo" if (home / "volume").is_dir() else home / "repo"


def host_processes(marker: str) -> list[str]:
    """Command lines of host processes that contain `marker`."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline and "pgrep" not in cmdline:
                found.append(cmdline)
    return found


async def gone(marker: str, within: float = 10) -> bool:
    """True once no host process carries `marker`, polling for at most `within` seconds."""
    with anyio.move_on_after(within):
        while host_processes(marker):
            await asyncio.sleep(0.05)
        return True
    return False


async def test_secrets_of_the_server_are_invisible_in_the_sandbox(client, make_repo):
    sid = await sandbox(client, make_repo(REPO))
    out = await sh(client, sid, "env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; cat /proc/1/environ; true")
    seen = out["stdout"] + out["stderr"]
    for name, value in SECRETS.items():
        assert value not in seen and name not in seen


async def test_the_network_is_unreachable_even_on_loopback(jailed, make_repo):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        sid = await sandbox(jailed, make_repo(REPO))
        out = await sh(jailed, sid, f"echo hi > /dev/tcp/127.0.0.1/{port} && echo CONNECTED; "
                                    "getent hosts github.com || echo NO-DNS; awk -F: 'NR>2{print $1}' /proc/net/dev", timeout_s=20)
        assert "CONNECTED" not in out["stdout"] and "NO-DNS" in out["stdout"]
        assert out["stdout"].split("NO-DNS")[1].split() == ["lo"]
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


async def test_a_fork_bomb_is_contained_and_the_server_keeps_answering(client, make_repo):
    sid = await sandbox(client, make_repo(REPO))
    with anyio.fail_after(60):
        out = await sh(client, sid, "bomb() { bomb | bomb & }; bomb; sleep 3; echo survived", timeout_s=10)
    assert out["exit_code"] != 0 or out["timed_out"] or "survived" in out["stdout"]
    assert (await sh(client, sid, "echo still here"))["stdout"] == "still here\n"


async def test_a_sleep_past_its_timeout_leaves_no_process(client, make_repo):
    sid = await sandbox(client, make_repo(REPO))
    with anyio.fail_after(20):
        out = await sh(client, sid, f"sleep {TIMEOUT_MARK}", timeout_s=1)
    assert out["timed_out"]
    assert await gone(TIMEOUT_MARK)


async def test_background_processes_die_with_their_command_and_their_sandbox(client, make_repo):
    sid = await sandbox(client, make_repo(REPO))
    await sh(client, sid, f"(sleep {BACKGROUND_MARK} &) ; nohup sleep {BACKGROUND_MARK} >/dev/null 2>&1 & echo started")
    assert await gone(BACKGROUND_MARK)
    running = asyncio.create_task(call(client, "exec", sandbox_id=sid, command=f"sleep {RUNNING_MARK}",
                                       timeout_s=300))
    with anyio.fail_after(10):
        while not host_processes(RUNNING_MARK):
            await asyncio.sleep(0.05)
    await call(client, "destroy_sandbox", sandbox_id=sid)
    with anyio.fail_after(15):
        result = await running
    assert result["exit_code"] != 0
    assert await gone(RUNNING_MARK)


async def test_two_sandboxes_do_not_see_each_other(jailed, make_repo):
    repo = make_repo(REPO)
    a, b = await sandbox(jailed, repo), await sandbox(jailed, repo)
    await call(jailed, "write_file", sandbox_id=a, path="only-in-a.txt", content="marker-7c1f\n")
    out = await sh(jailed, b, "ls /workspace; find / -name 'only-in-a.txt' -not -path '/proc/*' 2>/dev/null; "
                              "grep -rls marker-7c1f / --exclude-dir=proc --exclude-dir=usr --exclude-dir=etc; true")
    assert "only-in-a" not in out["stdout"]


async def test_the_host_outside_usr_and_etc_is_not_in_the_jail(jailed, make_repo, tmp_path):
    (tmp_path / "host-file").write_text("host data")
    sid = await sandbox(jailed, make_repo(REPO))
    out = await sh(jailed, sid, f"cat {tmp_path}/host-file; ls /root; id -u; cat /etc/shadow; touch /usr/x; true")
    assert "host data" not in out["stdout"]
    assert out["stdout"].strip() == "1000"
    assert "Permission denied" in out["stderr"] and "Read-only file system" in out["stderr"]


async def test_the_source_repository_is_untouched_by_anything_done_in_the_sandbox(client, make_repo):
    repo = make_repo(REPO)
    (repo / "dirty.txt").write_text("uncommitted work\n")
    head, status = git(repo, "rev-parse", "HEAD"), git(repo, "status", "--porcelain")
    sid = await sandbox(client, repo)
    await call(client, "write_file", sandbox_id=sid, path="app.py", content="print('changed')\n")
    await sh(client, sid, "git -c user.name=a -c user.email=a@b commit -qam change; "
                          "git push -q origin HEAD:main; git push -q origin HEAD:refs/heads/evil; "
                          f"echo overwritten > {repo}/README.md; rm -rf {repo}/.git; true")
    await call(client, "destroy_sandbox", sandbox_id=sid)
    assert git(repo, "rev-parse", "HEAD") == head
    assert git(repo, "status", "--porcelain") == status
    assert git(repo, "branch", "--list") == "* main"
    assert (repo / "README.md").read_text() == "# demo\n"


async def test_sandboxes_are_destroyed_when_the_stdio_server_exits(sandbox_root, make_repo):
    params = StdioServerParameters(command=sys.executable, args=["-m", "servers.sandbox"],
                                   cwd=str(ROOT), env=server_env(SANDBOX_ROOT=str(sandbox_root)))
    async with held_client(params) as c:
        await sandbox(c, make_repo(REPO))
        assert len(sandbox_dirs(sandbox_root)) == 1
    assert list(sandbox_root.iterdir()) == []


async def test_idle_sandboxes_are_reaped(sandbox_root, make_repo):
    manager = SandboxManager(Settings(backend="local", root=sandbox_root, idle_ttl_s=0))
    info = await manager.create(str(make_repo(REPO)), None)
    assert await manager.reap_idle() == [info.sandbox_id]
    assert sandbox_dirs(sandbox_root) == []
    with pytest.raises(Exception, match="create_sandbox"):
        manager.get(info.sandbox_id)


async def test_missing_bubblewrap_and_the_unsafe_backend_are_refused_clearly(sandbox_root, make_repo, monkeypatch,
                                                                             tmp_path):
    repo = make_repo(REPO)
    async with held_client(build_server(Settings(backend="process", root=sandbox_root))) as c:
        msg = await call_error(c, "create_sandbox", repo_url=str(repo))
        assert "SANDBOX_ALLOW_UNSAFE=1" in msg and "bubblewrap" in msg
    monkeypatch.setenv("PATH", str(tmp_path))
    async with held_client(build_server(Settings(backend="local", root=sandbox_root))) as c:
        assert "apt-get install bubblewrap" in await call_error(c, "create_sandbox", repo_url=str(repo))


def test_every_bad_setting_is_named_in_one_line_at_start_up():
    bad = {"SANDBOX_BACKEND": "docker", "SANDBOX_MAX": "abc", "SANDBOX_MEMORY_MIB": "-1", "SANDBOX_ALLOW_UNSAFE": "maybe"}
    out = subprocess.run([sys.executable, "-m", "servers.sandbox"], cwd=ROOT, env=server_env(**bad),
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = [ln for ln in out.stderr.splitlines() if "cannot start" in ln]
    for name in bad:
        assert name in line
    assert "one of local, process, modal, auto" in line and "expected a whole number" in line


def test_the_server_module_starts_and_lists_its_help():
    out = subprocess.run([sys.executable, "-m", "servers.sandbox", "--help"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0 and "--transport" in out.stdout


SWAP = r'''
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs("d", exist_ok=True)
os.symlink(os.environ["OUTSIDE"], "l")
print("swapping", flush=True)
while True:
    libc.renameat2(-100, b"d", -100, b"l", 2)  # RENAME_EXCHANGE: d and l trade places, over and over
'''


async def test_a_link_swapped_in_during_a_search_never_leads_outside(jailed, make_repo, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP-SECRET-HOST-LINE\n")
    sid = await sandbox(jailed, make_repo(REPO))
    await call(jailed, "write_file", sandbox_id=sid, path="swap.py", content=SWAP)
    swapper = asyncio.create_task(call(jailed, "exec", sandbox_id=sid, timeout_s=60,
                                       command=f"OUTSIDE={outside} exec python3 swap.py"))
    try:
        started = await sh(jailed, sid, "for i in $(seq 200); do { [ -L l ] || [ -L d ]; } && exit 0; sleep 0.05; done")
        assert started["exit_code"] == 0
        for _ in range(150):
            for tool, extra in (("search", {"pattern": "TOP-SECRET"}), ("list_files", {})):
                result = await jailed.call_tool(tool, {"sandbox_id": sid, "path": "d", **extra})
                assert "secret" not in str(result.structured_content), result.structured_content
    finally:
        await call(jailed, "destroy_sandbox", sandbox_id=sid)
        await swapper


async def test_writing_to_a_fifo_fails_at_once_instead_of_blocking(client, make_repo):
    sid = await sandbox(client, make_repo(REPO))
    await sh(client, sid, "mkfifo pipe")
    for _ in range(8):  # more than the server's worker threads: a blocked write would starve them all
        with anyio.fail_after(5):
            assert "not a regular file" in await call_error(client, "write_file", sandbox_id=sid, path="pipe",
                                                            content="x")
    assert (await call(client, "read_file", sandbox_id=sid, path="README.md")) == "     1\t# demo"


async def test_an_edit_that_would_grow_a_file_past_the_limit_is_refused_before_it_is_made(client, make_repo):
    sid = await sandbox(client, make_repo(REPO))
    await sh(client, sid, "head -c 4000000 /dev/zero | tr '\\0' a > big.txt")
    msg = await call_error(client, "edit_file", sandbox_id=sid, path="big.txt", old_text="a", new_text="X" * 200,
                           replace_all=True)
    assert "larger than" in msg


async def test_a_very_deep_tree_is_still_removed_with_its_sandbox(client, make_repo, sandbox_root):
    sid = await sandbox(client, make_repo(REPO))
    await sh(client, sid, "python3 -c \"import os; os.makedirs('/'.join(['d'] * 3000))\"")
    await call(client, "destroy_sandbox", sandbox_id=sid)
    assert sandbox_dirs(sandbox_root) == []


async def test_concurrent_creates_respect_the_sandbox_limit(sandbox_root, make_repo):
    manager = SandboxManager(Settings(backend="local", root=sandbox_root, max_sandboxes=2))
    repo = str(make_repo(REPO))
    results = await asyncio.gather(*(manager.create(repo, None) for _ in range(5)), return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 2
    assert all("already holds 2" in str(r) for r in results if isinstance(r, Exception))
    await manager.destroy_all()


async def test_a_sandbox_root_someone_else_can_write_is_refused(tmp_path, make_repo):
    root = tmp_path / "shared"
    root.mkdir(mode=0o777)
    root.chmod(0o777)
    manager = SandboxManager(Settings(backend="local", root=root))
    with pytest.raises(Exception, match="writable by no one else"):
        await manager.create(str(make_repo(REPO)), None)


async def test_another_sandbox_is_not_a_clone_source(jailed, make_repo, sandbox_root):
    await sandbox(jailed, make_repo(REPO))
    (home,) = sandbox_dirs(sandbox_root)
    assert "inside the sandbox directory" in await call_error(jailed, "create_sandbox", repo_url=str(clone_of(home)))


async def test_resource_limits_bind_and_cannot_be_raised(client, make_repo):
    sid = await sandbox(client, make_repo(REPO))
    out = await sh(client, sid, "ulimit -u; ulimit -Hv; ulimit -Hf; ulimit -Hu 100000 && echo RAISED; true")
    # A memory control group bounds the sandbox as a whole instead of each process's address space.
    address_space = "unlimited" if isinstance(Hierarchy.detect(), Hierarchy) else "8388608"
    assert out["stdout"].split()[:3] == ["256", address_space, "1048576"]
    assert "RAISED" not in out["stdout"]


async def test_a_read_only_command_can_read_but_not_change_the_repository(jailed, make_repo):
    sid = await sandbox(jailed, make_repo(REPO))
    out = await call(jailed, "exec", sandbox_id=sid, read_only=True,
                     command="cat README.md; echo x > README.md; touch new.txt; echo scratch > /tmp/ok && cat /tmp/ok")
    assert "# demo" in out["stdout"] and "scratch" in out["stdout"]
    assert out["stderr"].count("Read-only file system") == 2
    assert (await call(jailed, "export_changes", sandbox_id=sid))["diff"] == ""


async def test_a_server_that_died_leaves_nothing_for_long(sandbox_root, make_repo):
    dead = SandboxManager(Settings(backend="local", root=sandbox_root))
    await dead.create(str(make_repo(REPO)), None)
    os.close(dead._instance[1])  # what the kernel does when a server process dies
    async with held_client(build_server(Settings(backend="local", root=sandbox_root))) as c:
        assert sandbox_dirs(sandbox_root) == []
        await sandbox(c, make_repo(REPO))
        assert len(sandbox_dirs(sandbox_root)) == 1


async def test_mcp_over_http_off_loopback_needs_a_token_and_checks_it(make_repo):
    from orchestrator.mcp_pool import ServerSpec

    from .conftest import free_port

    refused = subprocess.run([sys.executable, "-m", "servers.sandbox", "--transport", "http", "--host", "0.0.0.0"],
                             cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "MCP_AUTH_TOKEN" in refused.stderr
    port = free_port()
    token = "mcp-test-token-" + "z" * 30
    proc = subprocess.Popen([sys.executable, "-m", "servers.sandbox", "--transport", "http", "--port", str(port)],
                            cwd=ROOT, env=server_env(MCP_AUTH_TOKEN=token, SANDBOX_BACKEND="local"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        import httpx

        with anyio.fail_after(30):
            while True:
                try:
                    status = httpx.post(url, json={}, timeout=1).status_code
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
        assert status == 401
        async with ServerSpec("sandbox", url, {"Authorization": f"Bearer {token}"}).connect() as c:
            assert len((await c.list_tools()).tools) == 9
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_a_server_killed_outright_takes_its_jails_with_it(sandbox_root, make_repo):
    marker = unique_marker()
    params = StdioServerParameters(command=sys.executable, args=["-m", "servers.sandbox"], cwd=str(ROOT),
                                   env=server_env(SANDBOX_ROOT=str(sandbox_root), SANDBOX_BACKEND="local"))
    async with held_client(params) as c:
        sid = await sandbox(c, make_repo(REPO))
        running = asyncio.create_task(c.call_tool("exec", {"sandbox_id": sid, "command": f"sleep {marker}"}))
        with anyio.fail_after(10):
            while not host_processes(marker):
                await asyncio.sleep(0.05)
        pids = [pid for pid in os.listdir("/proc") if pid.isdigit() and _is_server(pid, sandbox_root)]
        assert len(pids) == 1
        os.kill(int(pids[0]), signal.SIGKILL)
        assert await gone(marker)
        running.cancel()


def _is_server(pid: str, root: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return b"servers.sandbox" in cmdline and f"SANDBOX_ROOT={root}".encode() in environ
