"""A hostile repository's attacks on the host, each played end to end through the MCP tools, and what stops it.

Links swapped in while a tool walks, one model turn of concurrent commands against the sandbox's budget, memory
file systems filled, another local user reading a clone, and two servers sharing a machine.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from common.settings import ConfigError
from servers.sandbox import volume
from servers.sandbox.base import SandboxError
from servers.sandbox.cgroup import Budget, Hierarchy
from servers.sandbox.manager import SandboxManager, Settings
from servers.sandbox.server import build_server
from tests.conftest import held_client, unique_marker

from .conftest import SECRETS
from .helpers import call, call_error, sandbox, sh
from .test_jail import clone_of, host_processes, sandbox_dirs

CGROUPS = isinstance(Hierarchy.detect(), Hierarchy)
needs_cgroups = pytest.mark.skipif(not CGROUPS, reason=f"no control groups here: {Hierarchy.detect()}")
needs_volumes = pytest.mark.skipif(volume.unavailable() is not None, reason=f"no volumes: {volume.unavailable()}")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes get uids of their own only under root")

# Swaps the folder `d` with a link `l` to a host folder, as fast as it can, for `seconds`.
SWAP = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
os.symlink(sys.argv[1], "l")
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    libc.renameat2(-100, b"d", -100, b"l", 2)  # AT_FDCWD, RENAME_EXCHANGE
print("swapped")
"""


def forker(most: int) -> str:
    """Python that forks up to `most` sleeping children, stopping at the first refusal; `n` is how many started."""
    return ("import os, sys, time\n"
            "n = 0\n"
            f"for _ in range({most}):\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "    except OSError:\n"
            "        break\n"
            "    if pid == 0:\n"
            "        time.sleep(60)\n"
            "        os._exit(0)\n"
            "    n += 1\n")


def together(count: int) -> str:
    """Python lines that wait (20 s at most) until `count` commands of the sandbox reached them: proof that they ran
    at the same time."""
    return ("open(f'ready.{sys.argv[1]}', 'w').close()\n"
            "end = time.monotonic() + 20\n"
            f"while len([f for f in os.listdir('.') if f.startswith('ready.')]) < {count} and time.monotonic() < end:\n"
            "    time.sleep(0.01)\n")


@pytest.fixture
def host_secret() -> Iterator[tuple[Path, str]]:
    """A root-only folder on the host holding a canary file; the sandbox must never see its content or name."""
    marker = unique_marker()
    folder = Path(tempfile.mkdtemp(prefix="tb-host-secret-"))
    folder.chmod(0o700)
    (folder / f"canary-{marker}.txt").write_text(f"needle-{marker} CANARY-ROOT-ONLY\n")
    (folder / f"canary-{marker}.txt").chmod(0o600)
    yield folder, marker
    subprocess.run(["rm", "-rf", str(folder)], check=True)


async def jailed_client(root: Path, **settings):
    for key, value in SECRETS.items():
        os.environ.setdefault(key, value)
    return held_client(build_server(Settings(backend="local", root=root, **settings)))


async def test_a_link_swapped_in_while_search_and_list_files_walk_never_reaches_the_host(
        sandbox_root, make_repo, host_secret):
    folder, marker = host_secret
    repo = make_repo({"d/f.txt": f"needle-{marker} harmless\n", "swap.py": SWAP})
    async with await jailed_client(sandbox_root) as c:
        sid = await sandbox(c, repo)
        swapping = asyncio.create_task(sh(c, sid, f"python3 swap.py {folder} 6", timeout_s=30))
        seen: list[str] = []
        with anyio.fail_after(60):
            while not swapping.done():
                found = await asyncio.gather(
                    call(c, "search", sandbox_id=sid, pattern=f"needle-{marker}"),
                    call(c, "list_files", sandbox_id=sid),
                    call(c, "search", sandbox_id=sid, pattern="CANARY", path="d"),
                    return_exceptions=True)
                seen += [str(f) for f in found]
            assert (await swapping)["stdout"] == "swapped\n"
    assert len(seen) >= 30  # enough tries to have lost the race on a host-side walk
    assert not [s for s in seen if "CANARY" in s or f"canary-{marker}" in s]


async def test_read_and_write_through_a_swapped_link_never_touch_the_host(sandbox_root, make_repo, host_secret):
    folder, marker = host_secret
    repo = make_repo({"d/f.txt": "harmless\n", "swap.py": SWAP})
    async with await jailed_client(sandbox_root) as c:
        sid = await sandbox(c, repo)
        swapping = asyncio.create_task(sh(c, sid, f"python3 swap.py {folder} 4", timeout_s=30))
        answers: list[str] = []
        with anyio.fail_after(60):
            while not swapping.done():
                for name, args in (("read_file", {"path": f"d/canary-{marker}.txt"}),
                                   ("write_file", {"path": "d/planted.txt", "content": "planted"}),
                                   ("edit_file", {"path": f"d/canary-{marker}.txt", "old_text": "CANARY",
                                                  "new_text": "EDITED"})):
                    result = await c.call_tool(name, {"sandbox_id": sid, **args})
                    answers.append(result.content[0].text if result.content else "")
        await swapping
    assert not [a for a in answers if "CANARY-ROOT-ONLY" in a or "replaced" in a]
    assert sorted(p.name for p in folder.iterdir()) == [f"canary-{marker}.txt"]
    assert "CANARY-ROOT-ONLY" in (folder / f"canary-{marker}.txt").read_text()


async def test_an_ignore_file_that_links_to_a_host_file_tells_nothing_about_it(sandbox_root, make_repo, host_secret):
    folder, marker = host_secret
    (folder / "ignore-list").write_text("secret-*.txt\n")
    (folder / "ignore-list").chmod(0o600)
    repo = make_repo({"secret-1.txt": "x\n", "kept.txt": "y\n"})
    async with await jailed_client(sandbox_root) as c:
        sid = await sandbox(c, repo)
        await sh(c, sid, f"ln -s {folder}/ignore-list .gitignore && ln -s {folder}/ignore-list .ignore")
        listed = await call(c, "list_files", sandbox_id=sid)
        found = await call(c, "search", sandbox_id=sid, pattern="x")
    assert "secret-1.txt" in listed["files"]  # a host file would have hidden it
    assert "secret-1.txt:1: x" in found["matches"]


@needs_cgroups
async def test_one_turn_of_concurrent_commands_shares_one_process_budget(sandbox_root, make_repo):
    forks = forker(90) + together(4) + "print('started', n)\n"
    async with await jailed_client(sandbox_root, budget=Budget(pids=120)) as c:
        sid = await sandbox(c, make_repo({"forks.py": forks}))
        with anyio.fail_after(90):
            outs = await asyncio.gather(*(sh(c, sid, f"python3 forks.py {i}", timeout_s=60) for i in range(4)))
        started = [int(o["stdout"].split()[-1]) for o in outs if o["stdout"].startswith("started")]
        assert len(started) == 4  # all four ran at once: each saw the others' ready files
        assert sum(started) <= 120 - 4  # rlimits per command would have let each start its 90
        assert (await sh(c, sid, "echo alive"))["stdout"] == "alive\n"


@needs_cgroups
async def test_one_turn_of_concurrent_commands_shares_one_memory_budget(sandbox_root, make_repo):
    hold = ("import os, sys, time\n"
            "block = bytearray(200 << 20)\n"
            "for i in range(0, len(block), 4096):\n"
            "    block[i] = 1\n"
            + together(3) + "print('held')\n")
    async with await jailed_client(sandbox_root, budget=Budget(memory_mib=384)) as c:
        sid = await sandbox(c, make_repo({"hold.py": hold}))
        with anyio.fail_after(90):
            outs = await asyncio.gather(*(sh(c, sid, f"python3 hold.py {i}", timeout_s=60) for i in range(3)))
        held = sum(o["stdout"] == "held\n" for o in outs)
        assert held < 3  # 600 MB did not fit in a 384 MB budget, though each 200 MB did
        assert any(o["exit_code"] != 0 for o in outs)
        assert (await sh(c, sid, "echo alive"))["stdout"] == "alive\n"


@needs_cgroups
async def test_a_memory_file_system_cannot_outgrow_its_cap(sandbox_root, make_repo):
    async with await jailed_client(sandbox_root) as c:
        sid = await sandbox(c, make_repo())
        with anyio.fail_after(60):
            out = await sh(c, sid, "dd if=/dev/zero of=/dev/shm/fill bs=1M count=2048 2>&1; "
                                   "du -m /dev/shm/fill | cut -f1; touch /dev/planted 2>&1", timeout_s=50)
    lines = out["stdout"].splitlines()
    assert "No space left on device" in out["stdout"]
    assert int(lines[-2]) <= 256
    assert "Read-only file system" in lines[-1]


@pytest.fixture(params=["disk", "tmpfs"])
def any_root(request, sandbox_root) -> Iterator[Path]:
    """A sandbox root on this machine's disk, or on a tmpfs."""
    if request.param == "disk":
        yield sandbox_root
        return
    root = Path(tempfile.mkdtemp(prefix="tb-test-sandboxes-", dir="/dev/shm"))
    root.chmod(0o711)
    yield root
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


@needs_volumes
async def test_commands_writing_at_once_cannot_fill_the_hosts_disk(any_root, make_repo):
    sandbox_root = any_root
    async with await jailed_client(sandbox_root, disk_mib=64) as c:
        sid = await sandbox(c, make_repo())
        (home,) = sandbox_dirs(sandbox_root)
        with anyio.fail_after(90):
            outs = await asyncio.gather(*(sh(c, sid, f"dd if=/dev/zero of=fill{i} bs=1M count=40 2>&1", timeout_s=60)
                                          for i in range(3)))
        assert any("No space left on device" in o["stdout"] for o in outs)  # 120 MB did not fit in 64
        if (home / "volume.img").exists():  # on disk: reserved whole, never more (but an extent tree block or two)
            assert (home / "volume.img").stat().st_blocks * 512 <= 65 * 1024 * 1024
        await sh(c, sid, "rm fill*")
        assert (await call(c, "write_file", sandbox_id=sid, path="after.txt", content="room again"))
        assert "after.txt" in (await call(c, "export_changes", sandbox_id=sid))["diff"]
    assert volume.mounts_under(sandbox_root) == []


@needs_volumes
async def test_a_volume_that_does_not_fit_on_the_disk_is_refused_up_front(sandbox_root, make_repo):
    manager = SandboxManager(Settings(backend="local", root=sandbox_root, disk_mib=1 << 30))  # a petabyte
    try:
        with pytest.raises(SandboxError, match="no room for a .* MiB volume .* SANDBOX_DISK_MIB"):
            await manager.create(str(make_repo()), None)
        assert sandbox_dirs(sandbox_root) == [] and volume.mounts_under(sandbox_root) == []
        assert list(sandbox_root.glob("uid-*")) == []
    finally:
        await manager.destroy_all()


@needs_root
async def test_another_local_user_cannot_read_a_clone(sandbox_root, make_repo):
    repo = make_repo({"private.txt": "private work\n"})
    async with await jailed_client(sandbox_root) as c:
        await sandbox(c, repo)
        (home,) = sandbox_dirs(sandbox_root)
        for target in (clone_of(home) / "private.txt", clone_of(home)):
            other = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                                    "cat" if target.is_file() else "ls", str(target)],
                                   capture_output=True, text=True, timeout=30)
            assert other.returncode != 0 and "Permission denied" in other.stderr
            assert "private work" not in other.stdout and "private.txt" not in other.stdout


@needs_root
async def test_two_servers_on_one_machine_never_share_a_sandbox_uid(sandbox_root, make_repo):
    first = SandboxManager(Settings(backend="local", root=sandbox_root, uid_count=2))
    second = SandboxManager(Settings(backend="local", root=sandbox_root, uid_count=2))
    try:
        a = await first.create(str(make_repo()), None)
        b = await second.create(str(make_repo()), None)
        assert first.get(a.sandbox_id).owner != second.get(b.sandbox_id).owner
        with pytest.raises(Exception, match="sandbox uids .* are in use"):
            await first.create(str(make_repo()), None)
        await first.destroy(a.sandbox_id)
        c = await second.create(str(make_repo()), None)  # the uid the first one freed
        assert second.get(c.sandbox_id).owner != second.get(b.sandbox_id).owner
    finally:
        await first.destroy_all()
        await second.destroy_all()
    assert list(sandbox_root.glob("uid-*")) == []


@needs_cgroups
async def test_destroy_kills_by_control_group_what_left_the_process_tree(sandbox_root, make_repo):
    marker = unique_marker()
    manager = SandboxManager(Settings(backend="local", root=sandbox_root))
    info = await manager.create(str(make_repo()), None)
    box = manager.get(info.sandbox_id)
    # Started outside the jail's process tree but in the sandbox's group: what a uid-based kill of another
    # server's uid range, or a kill of the process group, would both miss.
    stray = subprocess.Popen([*box.cgroup.join_argv(), "sleep", marker])
    try:
        with anyio.fail_after(10):
            while stray.pid not in box.cgroup.pids():
                await asyncio.sleep(0.01)
        await manager.destroy(info.sandbox_id)
        with anyio.fail_after(10):
            while stray.poll() is None:
                await asyncio.sleep(0.01)
        assert not any(d.exists() for d in box.cgroup.dirs.values())
    finally:
        stray.kill()
        stray.wait()
        await manager.destroy_all()


async def test_commands_of_one_sandbox_never_stall_another(sandbox_root, make_repo):
    async with await jailed_client(sandbox_root, max_calls=2) as c:
        busy, calm = await sandbox(c, make_repo()), await sandbox(c, make_repo({"a.py": "x = 1\n"}))
        flood = [asyncio.create_task(sh(c, busy, "sleep 30", timeout_s=60)) for _ in range(8)]
        try:
            with anyio.fail_after(15):  # long before the first of the busy sandbox's commands could end
                await call(c, "write_file", sandbox_id=calm, path="b.py", content="y = 2\n")
                assert (await call(c, "search", sandbox_id=calm, pattern="y"))["matches"] == ["b.py:1: y = 2"]
                assert "replaced" in await call(c, "edit_file", sandbox_id=calm, path="a.py", old_text="1",
                                                new_text="3")
        finally:
            for task in flood:
                task.cancel()
            await asyncio.gather(*flood, return_exceptions=True)


async def test_a_command_waits_for_a_free_slot_and_says_so_when_none_comes(sandbox_root, make_repo):
    marker = unique_marker()
    async with await jailed_client(sandbox_root, max_calls=1) as c:
        sid = await sandbox(c, make_repo())
        long = asyncio.create_task(sh(c, sid, f"sleep {marker}", timeout_s=30))
        try:
            with anyio.fail_after(20):
                while not host_processes(marker):
                    await asyncio.sleep(0.01)
            message = await call_error(c, "exec", sandbox_id=sid, command="true", timeout_s=0.5)
            assert "already running in this sandbox" in message and "run fewer at once" in message
        finally:
            long.cancel()
            await asyncio.gather(long, return_exceptions=True)


async def test_a_link_to_proc_swapped_in_mid_path_tells_nothing_of_the_host(sandbox_root, make_repo):
    repo = make_repo({"d/cwd/x": "x\n", "swap.py": SWAP})
    async with await jailed_client(sandbox_root) as c:
        sid = await sandbox(c, repo)
        swapping = asyncio.create_task(sh(c, sid, "python3 swap.py /proc/self 3", timeout_s=30))
        answers: list[str] = []
        with anyio.fail_after(60):
            while not swapping.done():
                result = await c.call_tool("read_file", {"sandbox_id": sid, "path": "d/cwd/x"})
                answers.append(result.content[0].text if result.content else "")
        await swapping
    host_paths = {os.getcwd(), str(Path(__file__).parents[3]), str(sandbox_root)}
    assert not [a for a in answers if any(p in a for p in host_paths)]


async def test_no_other_local_user_can_read_a_running_command(sandbox_root, make_repo):
    marker = unique_marker()
    async with await jailed_client(sandbox_root) as c:
        sid = await sandbox(c, make_repo())
        running = asyncio.create_task(sh(c, sid, f": private-{marker}; sleep 2; echo done", timeout_s=30))
        seen = []
        with anyio.fail_after(20):
            while not running.done():
                seen += [p for p in host_processes(f"private-{marker}")]
                await asyncio.sleep(0.01)
        assert (await running)["stdout"] == "done\n"
    assert seen == []  # a command line in /proc is readable by every local user


async def test_a_file_name_cannot_pass_its_matches_off_as_another_files(sandbox_root, make_repo):
    async with await jailed_client(sandbox_root) as c:
        sid = await sandbox(c, make_repo({"src/app.py": "def main(): pass\n"}))
        await sh(c, sid, "d=\"$(printf 'x\\nsrc')\"; mkdir \"$d\"; printf 'api_key = load()\\n' > \"$d/app.py\"; "
                         "printf 'one\\xe2\\x80\\xa8two api_key\\n' > b.txt")
        found = (await call(c, "search", sandbox_id=sid, pattern="api_key"))["matches"]
    assert sorted(found) == ["b.txt:1: one\u2028two api_key", "x\\nsrc/app.py:1: api_key = load()"]


async def test_exports_at_once_all_succeed_and_show_what_an_attribute_would_hide(sandbox_root, make_repo):
    async with await jailed_client(sandbox_root) as c:
        sid = await sandbox(c, make_repo({"app.py": "print('hi')\n"}))
        await sh(c, sid, "echo 'app.py -diff' >> .git/info/attributes; echo 'import os; os.system(\"evil\")' >> app.py")
        with anyio.fail_after(60):
            exports = await asyncio.gather(*(call(c, "export_changes", sandbox_id=sid) for _ in range(4)))
    for export in exports:
        assert "+import os; os.system(\"evil\")" in export["diff"] and "Binary files" not in export["diff"]


@needs_cgroups
async def test_socket_buffers_count_in_the_memory_budget(sandbox_root, make_repo):
    fill = ("import socket\n"
            "server = socket.socket(); server.bind(('127.0.0.1', 0)); server.listen(100)\n"
            "held, total = [], 0\n"
            "for _ in range(60):\n"
            "    a = socket.create_connection(server.getsockname()); b, _ = server.accept()\n"
            "    a.setblocking(False); held += [a, b]\n"
            "    while True:\n"
            "        try:\n"
            "            total += a.send(b'x' * 65536)\n"
            "        except (BlockingIOError, OSError):\n"
            "            break\n"
            "print(total >> 20)\n")
    async with await jailed_client(sandbox_root) as c:
        sid = await sandbox(c, make_repo({"fill.py": fill}))
        with anyio.fail_after(120):
            out = await sh(c, sid, "python3 fill.py", timeout_s=100)
    queued = int(out["stdout"].split()[-1]) if out["stdout"].strip() else 0
    assert queued <= 80  # MiB; unbounded, 60 loopback connections queue several hundred


@needs_root
def test_a_uid_range_that_other_users_hold_is_refused_at_start_up(sandbox_root):
    nobody = pwd.getpwnam("nobody").pw_uid
    with pytest.raises(ConfigError, match=r"SANDBOX_UID_BASE=.* overlap ids in use \(user nobody"):
        SandboxManager(Settings(backend="local", root=sandbox_root, uid_base=nobody - 10, uid_count=100))
