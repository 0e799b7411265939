"""A hostile repository's attacks through the setup phase, and another local user's on what it leaves: each played
end to end, and what stops it. A known limit is marked `xfail(strict=True)` with the fix it waits for.

Poisoning the cache from another repository, or keying it on files outside the repository; reaching the host's
loopback through the egress proxy however an address is spelled; processes, forks and files that outlive or outgrow
the setup; a profile that would blind the tools; secrets given to setup alone; two servers and a destroy racing a
build.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import anyio
import pytest

from servers.sandbox import environment, envcache, files
from servers.sandbox.cgroup import Budget
from servers.sandbox.envcache import EnvCache
from servers.sandbox.manager import SandboxManager, Settings
from tests.conftest import git, unique_marker

from . import test_attacks
from .helpers import call, sh
from .test_attacks import forker, needs_cgroups, needs_root, needs_volumes
from .test_jail import gone, host_processes, sandbox_dirs

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
host_secret = test_attacks.host_secret  # the fixture: a root-only folder holding a canary file

HELLO = """mkdir -p /env/bin
printf '#!/bin/sh\\necho hello from the environment\\n' > /env/bin/hello
chmod +x /env/bin/hello
echo 'export PATH=/env/bin:$PATH' >> /env/profile
echo SETUP-RAN
"""


def as_nobody(script: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`script` run by sh as another local user of the host, with no groups."""
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", "sh", "-c", script],
                          input=stdin, capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ["PATH"]})  # none of this process's variables


async def create(server, repo: Path, **arguments) -> tuple[dict, str]:
    """create_sandbox of `repo`: its result and the live output it streamed."""
    return await server.call("create_sandbox", repo_url=str(repo), **arguments)


def commit_link(repo: Path, name: str, target: str) -> None:
    (repo / name).symlink_to(target)
    git(repo, "add", name)
    git(repo, "commit", "-qm", f"link {name}")


# --- the cache key ---------------------------------------------------------------------------------------------


async def test_another_repository_with_the_same_setup_and_manifests_never_gets_or_plants_an_environment(
        sandbox_servers, make_repo) -> None:
    tb = await sandbox_servers()
    files_ = {"requirements.txt": "tinydep==1.0\n", ".tb/setup.sh": HELLO}
    planted, _ = await create(tb, make_repo(files_))  # the attacker's copy, first
    assert planted["environment"]["status"] == "ready"
    victim, live = await create(tb, make_repo(files_))
    assert not victim["environment"]["cached"] and "SETUP-RAN" in live


async def test_cache_key_lines_read_nothing_outside_the_repository(sandbox_servers, make_repo, host_secret) -> None:
    folder, marker = host_secret
    canary = folder / f"canary-{marker}.txt"
    # If the key covered the host file, changing it would change the key: the second sandbox would not be cached.
    script = HELLO + f"# tb-cache-key: link {canary} ../../../../../../..{canary} ../.git/config\n"
    repo = make_repo({".tb/setup.sh": script})
    commit_link(repo, "link", str(canary))
    commit_link(repo, "package.json", str(canary))  # a manifest the key always covers
    tb = await sandbox_servers()
    first, _ = await create(tb, repo)
    assert first["environment"]["status"] == "ready", first["environment"]
    canary.write_text("changed on the host\n")
    second, live = await create(tb, repo)
    assert second["environment"]["cached"] and "SETUP-RAN" not in live


def test_cache_key_lines_cannot_make_the_server_hold_a_file_once_per_spelling_of_its_path() -> None:
    big = b"x" * (1 << 20)
    spellings = ["".join(parts) + "big" for n in range(1, 11) for parts in itertools.product(["./", ".//"], repeat=n)]
    script = "".join(f"# tb-cache-key: {' '.join(spellings[i:i + 50])}\n" for i in range(0, len(spellings), 50))
    held = []

    def read(path: str) -> bytes | None:  # what `prepare.read_plan` reads: any spelling that normalizes in the repo
        if path == environment.DECLARED:
            return script.encode()
        if files.normalize(path) != "big":
            return None
        held.append(path)
        return big

    found = environment.plan(None, read)
    # A 16 MiB file (PLAN_READ_BYTES) named 2046 ways is 32 GiB in the server's memory, read on its event loop.
    assert len(held) <= 50 and sum(len(found.inputs[p]) for p in found.inputs) <= 64 << 20, len(held)


# --- escape from setup -----------------------------------------------------------------------------------------


async def test_setup_sees_nothing_of_the_host_but_usr_and_etc(sandbox_servers, make_repo, host_secret,
                                                              sandbox_root) -> None:
    folder, marker = host_secret
    tb = await sandbox_servers()
    await create(tb, make_repo({".tb/setup.sh": HELLO}))  # an environment to look for
    probe = (f"echo RUN: $(ls -A /run) ENV: $(ls -A /env) ROOT: $(ls -A /); cat {folder}/canary-{marker}.txt; "
             f"ls {folder} {sandbox_root} {sandbox_root}/envs\n")
    info, live = await create(tb, make_repo({".tb/setup.sh": probe}))
    assert "CANARY-ROOT-ONLY" not in live and f"\ncanary-{marker}.txt\n" not in live
    assert live.count("No such file or directory") == 4, live  # the canary, its folder, the root and its envs
    seen = live.split("RUN: ")[1].split("\n")[0]
    assert seen.split(" ENV: ")[0].split() == ["tb-egress.sock", "tb-source"]
    assert set(seen.split(" ENV: ")[1].split(" ROOT: ")[0].split()) <= {"lost+found", "profile"}  # its own, fresh


async def test_the_proxy_never_reaches_the_hosts_loopback_however_the_address_is_spelled(
        sandbox_servers, make_repo) -> None:
    hits = []

    async def canary(reader, writer) -> None:  # every address of this host, IPv4 and IPv6
        hits.append(writer.get_extra_info("peername"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nCANARY")
        writer.close()

    async def index(reader, writer) -> None:  # what the operator allowlisted: one loopback port
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nALLOWED")
        writer.close()

    host = await asyncio.start_server(canary, port=0)
    allowed = await asyncio.start_server(index, "127.0.0.1", 0)
    p, q = host.sockets[0].getsockname()[1], allowed.sockets[0].getsockname()[1]
    own = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    spelled = [f"127.0.0.1:{p}", f"0x7f000001:{p}", f"2130706433:{p}", f"0177.0.0.1:{p}", f"127.1:{p}", f"0:{p}",
               f"0.0.0.0:{p}", f"localhost:{p}", f"localhost.:{p}", f"LocalHost:{p}", f"127.0.0.1.:{p}",
               f"[::1]:{p}", f"[::ffff:127.0.0.1]:{p}", f"[::ffff:7f00:1]:{p}", f"[::127.0.0.1]:{p}", f"[::]:{p}",
               f"[::1%lo]:{p}", f"[::1%251]:{p}", f"[fe80::1%lo]:{p}", f"127.0.0.1:{q}@127.0.0.1:{p}",
               f"127.0.0.1:0{q}", *(f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a in own)]
    probe = f"""python3 - <<'EOF'
import socket
def ask(raw, unix=False):
    try:
        s = socket.socket(socket.AF_UNIX) if unix else socket.socket()
        s.settimeout(5)
        s.connect("/run/tb-egress.sock" if unix else ("127.0.0.1", 3128))
        s.sendall(raw.encode()); answer = s.recv(300); s.close()
        return answer.split(b"\\r\\n")[0].decode("latin-1")
    except OSError as e:
        return f"error {{e}}"
for a in {spelled!r}:
    print("GET", a, "->", ask(f"GET http://{{a}}/ HTTP/1.1\\r\\nHost: {{a}}\\r\\n\\r\\n"))
    print("CONNECT", a, "->", ask(f"CONNECT {{a}} HTTP/1.1\\r\\nHost: {{a}}\\r\\n\\r\\n"))
    print("UNIX", a, "->", ask(f"CONNECT {{a}} HTTP/1.1\\r\\n\\r\\n", unix=True))
for a in ["127.0.0.1", "::1", *{own!r}]:
    try:
        socket.create_connection((a, {p}), timeout=2).close(); print("DIRECT", a, "-> reached")
    except OSError as e:
        print("DIRECT", a, "->", e)
print("INDEX ->", ask("GET http://127.0.0.1:{q}/simple/ HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n"))
EOF
"""
    try:
        tb = await sandbox_servers(setup_allow=f"127.0.0.1:{q},localhost:{p},localhost:{q}")
        with anyio.fail_after(120):
            info, live = await create(tb, make_repo({".tb/setup.sh": probe}))
    finally:
        host.close()
        allowed.close()
    assert "INDEX -> HTTP/1.1 200" in live, live[-3000:]  # the way out works: the refusals are the proxy's
    assert hits == [], [line for line in live.splitlines() if "200" in line]
    assert "reached" not in live


async def test_a_process_a_setup_leaves_behind_dies_with_it_and_takes_no_proxy_along(
        sandbox_servers, make_repo, sandbox_root) -> None:
    marks = [unique_marker() for _ in range(3)]
    setup = f"""setsid sleep {marks[0]} </dev/null >/dev/null 2>&1 &
python3 -c 'import os
if os.fork(): os._exit(0)
os.setsid()
if os.fork(): os._exit(0)
os.execvp("sleep", ["sleep", "{marks[1]}"])' </dev/null >/dev/null 2>&1
(exec -a held-{marks[2]} python3 -c 'import socket, time
s = socket.create_connection(("127.0.0.1", 3128)); s.sendall(b"CONNECT 127.0.0.1:9 HTTP/1.1\\r\\n")
u = socket.socket(socket.AF_UNIX); u.connect("/run/tb-egress.sock"); time.sleep(600)' </dev/null >/dev/null 2>&1 &)
for m in {' '.join(marks)}; do
  for i in $(seq 100); do pgrep -f "[ -]$m" >/dev/null && echo "alive-$m" && break; sleep 0.05; done
done
"""
    tb = await sandbox_servers()
    info, live = await create(tb, make_repo({".tb/setup.sh": setup}))
    assert info["environment"]["status"] == "ready", info["environment"]
    assert all(f"alive-{m}" in live for m in marks), live  # each was running when setup ended
    for m in marks:
        assert await gone(m), host_processes(m)
    (home,) = sandbox_dirs(sandbox_root)
    assert not (home / "egress.sock").exists()
    ran = await sh(tb.client, info["sandbox_id"], "exec 3<>/dev/tcp/127.0.0.1/3128 && echo PROXY-OPEN; "
                                                  "ls /run; pgrep -fa 'sleep|held' || true")
    assert "PROXY-OPEN" not in ran["stdout"] and "tb-egress" not in ran["stdout"] and not any(
        m in ran["stdout"] for m in marks)


@needs_cgroups
async def test_a_fork_bomb_in_setup_is_held_to_the_sandboxes_process_budget(sandbox_servers, make_repo) -> None:
    forks = "python3 - <<'EOF'\n" + forker(200) + "print('forked', n)\nEOF\n"
    tb = await sandbox_servers(budget=Budget(pids=64))
    with anyio.fail_after(60):
        info, live = await create(tb, make_repo({".tb/setup.sh": forks}))
    forked = int(live.split("forked ")[1].split()[0])
    assert forked < 64  # the per-command process limit (256) would have let all 200 start
    assert (await sh(tb.client, info["sandbox_id"], "echo alive"))["stdout"] == "alive\n"


# --- the environment it leaves -----------------------------------------------------------------------------------


# The inventory runs /env/python/bin/python: this one leaves a process holding 2 GiB, which the kernel kills when
# the jail ends, and whose teardown keeps the jail's mount of /env alive while the server checks and shrinks it.
LINGER = """mkdir -p /env/python/bin
cat > /env/python/bin/python <<'PY'
#!/bin/sh
(python3 -c 'import ctypes, time
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: small pages, slow to free
held = b"x" * (2 << 30)
open("/tmp/held", "w").close()
time.sleep(60)' </dev/null >/dev/null 2>&1 &)
while [ ! -e /tmp/held ]; do sleep 0.05; done
echo lingering==1
PY
chmod +x /env/python/bin/python
"""


@needs_volumes
async def test_a_setup_that_fills_its_image_is_held_to_its_size_and_the_server_carries_on(
        sandbox_servers, make_repo, sandbox_root) -> None:
    fill = ("dd if=/dev/zero of=/env/fill bs=1M count=100 2>&1 | tail -1\n"
            "python3 -c 'import os\nn = 0\ntry:\n    while True:\n        open(f\"/env/i{n}\", \"w\").close(); n += 1\n"
            "except OSError as e:\n    print(\"files\", n, e)'\n" + HELLO)
    tb = await sandbox_servers(env_disk_mib=64)
    with anyio.fail_after(60):
        info, live = await create(tb, make_repo({".tb/setup.sh": fill}))
    assert "No space left on device" in live, live
    (image,) = (sandbox_root / "envs").glob("*.img")
    assert image.stat().st_blocks * 512 <= 65 << 20
    other, _ = await create(tb, make_repo({".tb/setup.sh": HELLO}))
    assert (await sh(tb.client, other["sandbox_id"], "hello"))["stdout"] == "hello from the environment\n"


@needs_volumes
async def test_a_jail_that_outlives_its_setup_leaves_no_image_outside_the_caches_bound(sandbox_root, make_repo,
                                                                                        monkeypatch) -> None:
    held_when_checked = []
    tool = envcache.run_tool

    async def watched(*argv: str, **kwargs):  # e2fsck and resize2fs of the image: is it still attached anywhere?
        if argv[0] in ("sh", "resize2fs") and argv[-1].endswith("volume.img"):
            held_when_checked.append(subprocess.run(["losetup", "-j", argv[-1]], capture_output=True,
                                                    text=True).stdout.strip())
        return await tool(*argv, **kwargs)

    monkeypatch.setattr(envcache, "run_tool", watched)
    manager = SandboxManager(Settings(backend="local", root=sandbox_root, env_cache_mib=0))
    try:
        with anyio.fail_after(60):
            info = await manager.create(str(make_repo({".tb/setup.sh": LINGER})), None)
            await manager.destroy(info.sandbox_id)
            await manager._env_cache().evict()  # a cache of 0 MiB keeps nothing nobody holds
        # A file system checked and shrunk while the kernel still writes to it: failed, or kept corrupt.
        assert held_when_checked and not any(held_when_checked), held_when_checked
        # Each such setup under another key would keep up to SANDBOX_ENV_DISK_MIB of the host's disk for ever.
        assert sorted(p.name for p in (sandbox_root / "envs").glob("*.img")) == []
        assert info.environment.status == "ready", info.environment.error
    finally:
        await manager.destroy_all()


@needs_root
@pytest.mark.parametrize("disk_mib", [
    pytest.param(2048, marks=needs_volumes, id="image"),
    pytest.param(0, id="folder"),
])
async def test_a_setuid_program_left_in_an_environment_gives_no_local_user_a_sandbox_uid(
        sandbox_servers, make_repo, sandbox_root, disk_mib) -> None:
    if os.statvfs(sandbox_root).f_flag & os.ST_NOSUID:
        pytest.skip("the sandbox root's file system is mounted nosuid here")
    script = "cp /usr/bin/id /env/id && chmod 6755 /env/id && ls -l /env/id\n"
    repo = make_repo({".tb/setup.sh": script})
    tb = await sandbox_servers(disk_mib=disk_mib)
    info, live = await create(tb, repo)
    assert info["environment"]["status"] == "ready" and "-rwsr-sr-x" in live, live
    # Anyone who knows the repository computes its key: no listing of the root is needed.
    key = environment.plan(None, {environment.DECLARED: script.encode()}.get).key(str(repo), environment.toolchain())
    ran = as_nobody(f"{sandbox_root}/envs/{key}/id")  # the cache is private; were it not, the bits are gone
    assert "euid" not in ran.stdout and "egid" not in ran.stdout, ran.stdout


@needs_root
@needs_volumes
async def test_another_local_user_reads_neither_an_environment_nor_its_record(
        sandbox_servers, make_repo, sandbox_root) -> None:
    marker = unique_marker()
    setup = f"mkdir -p /env/lib && echo private-{marker} > /env/lib/private.txt\necho output-{marker}\n"
    tb = await sandbox_servers()
    info, _ = await create(tb, make_repo({".tb/setup.sh": setup}))
    assert info["environment"]["status"] == "ready"
    # The mount points are in every user's /proc/self/mountinfo; the names under them are the setup's own.
    ran = as_nobody(f"for d in $(awk '{{print $5}}' /proc/self/mountinfo | grep '^{sandbox_root}/envs/'); do "
                    'echo "found $d"; cat "$d/lib/private.txt" "$d.json"; done')
    assert "found" in ran.stdout  # the way an attacker looks
    assert f"private-{marker}" not in ran.stdout and f"output-{marker}" not in ran.stdout, ran.stdout


async def test_a_link_the_environment_plants_tells_nothing_of_the_host(sandbox_servers, make_repo,
                                                                         host_secret) -> None:
    folder, _ = host_secret
    (folder / "present").mkdir()  # in a folder only root may enter
    tb = await sandbox_servers()
    seen = []
    for name in ("present", "absent"):
        info, _ = await create(tb, make_repo(
            {".tb/setup.sh": f"ln -s {folder}/{name} /env/node_modules\n"}))
        assert info["environment"]["status"] == "ready"
        ran = await sh(tb.client, info["sandbox_id"], "test -L /node_modules && echo LINK || echo NONE")
        seen.append(ran["stdout"])
    assert seen[0] == seen[1], seen  # else a root-only path's existence shows in the jail


async def test_a_hostile_profile_blinds_neither_export_nor_list_files_nor_search(sandbox_servers, make_repo) -> None:
    marker = unique_marker()
    setup = """mkdir -p /env/bin
printf '#!/bin/sh\\nexit 0\\n' > /env/bin/git; cp /env/bin/git /env/bin/rg; chmod +x /env/bin/*
printf -- '--glob=!*\\n' > /env/rgrc
cat >> /env/profile <<'EOF'
export PATH=/env/bin:$PATH GIT_DIR=/nonexistent GIT_INDEX_FILE=/tmp/idx RIPGREP_CONFIG_PATH=/env/rgrc
git() { :; }; rg() { :; }
cd /tmp
EOF
"""
    tb = await sandbox_servers()
    info, _ = await create(tb, make_repo({"README.md": "# app\n", ".tb/setup.sh": setup}))
    sid = info["sandbox_id"]
    assert (await sh(tb.client, sid, "pwd; git status; rg -l app"))["stdout"] == "/tmp\n"  # the profile is active
    await call(tb.client, "write_file", sandbox_id=sid, path="new.txt", content=f"needle-{marker}\n")
    await call(tb.client, "edit_file", sandbox_id=sid, path="README.md", old_text="app", new_text="changed")
    changes = await call(tb.client, "export_changes", sandbox_id=sid)
    assert sorted(f["path"] for f in changes["changeset"]["files"]) == ["README.md", "new.txt"]
    assert "new.txt" in (await call(tb.client, "list_files", sandbox_id=sid))["files"]
    assert (await call(tb.client, "search", sandbox_id=sid, pattern=f"needle-{marker}"))["matches"] == [
        f"new.txt:1: needle-{marker}"]


# --- secrets given to setup alone ------------------------------------------------------------------------------


@pytest.fixture
def setup_token(monkeypatch) -> str:
    token = "idx-" + unique_marker() + "k" * 24
    monkeypatch.setenv("PRIVATE_INDEX_TOKEN", token)
    return token


async def test_no_other_local_user_finds_a_setup_secret_in_proc(sandbox_servers, make_repo, setup_token) -> None:
    marker = unique_marker()
    tb = await sandbox_servers(setup_env=("PRIVATE_INDEX_TOKEN",), setup_timeout_s=4)
    creating = asyncio.create_task(tb.call("create_sandbox", repo_url=str(make_repo(
        {".tb/setup.sh": f'pip_index="$PRIVATE_INDEX_TOKEN" sleep {marker}\n'}))))
    try:
        with anyio.fail_after(20):
            while not host_processes(marker):
                await asyncio.sleep(0.01)
        scan = ("import glob, sys\ntoken = sys.stdin.read().encode()\n"
                "for path in glob.glob('/proc/[0-9]*/cmdline') + glob.glob('/proc/[0-9]*/environ'):\n"
                "    try:\n        data = open(path, 'rb').read()\n    except OSError:\n        continue\n"
                "    if token in data:\n        print('SEEN', path)\n")
        ran = await asyncio.to_thread(as_nobody, f"python3 -c \"{scan}\"", setup_token)
        assert ran.returncode == 0 and "SEEN" not in ran.stdout, ran.stdout + ran.stderr
    finally:
        info, _ = await creating
    assert info["environment"]["status"] == "failed"  # past its limit, as it was made to be


async def test_a_secret_a_setup_hides_from_the_scan_by_its_mode_reaches_no_agent(
        sandbox_servers, make_repo, setup_token) -> None:
    setup = ('mkdir /env/d; printf %s "$PRIVATE_INDEX_TOKEN" > /env/d/t; chmod 0005 /env/d\n'
             'printf %s "$PRIVATE_INDEX_TOKEN" > /env/t; chmod 0004 /env/t\n')
    tb = await sandbox_servers(setup_env=("PRIVATE_INDEX_TOKEN",))
    repo = make_repo({".tb/setup.sh": setup})
    first, _ = await create(tb, repo)
    later, _ = await create(tb, repo)  # another uid: "other" to the setup's files
    ran = await sh(tb.client, later["sandbox_id"], "cat /env/t /env/d/t")
    assert setup_token not in ran["stdout"]
    assert first["environment"]["status"] == "failed", first["environment"]


@pytest.mark.xfail(strict=True, reason="a known limit, said in the README: setup secrets reach the repository's own "
                                       "code, which can keep them in a form of its own; the fix is for the proxy to "
                                       "add credentials itself, outside the jail")
async def test_a_secret_given_to_setup_alone_never_leaves_it_in_an_encoding_of_its_own(
        sandbox_servers, make_repo, setup_token) -> None:
    tb = await sandbox_servers(setup_env=("PRIVATE_INDEX_TOKEN",))
    told, live = await create(tb, make_repo(
        {".tb/setup.sh": 'printf "%s\\n" "$PRIVATE_INDEX_TOKEN" | rev >&2; exit 1\n'}))
    kept, _ = await create(tb, make_repo(
        {".tb/setup.sh": 'printf "%s\\n" "$PRIVATE_INDEX_TOKEN" | rev > /env/r\n'}))
    read = await sh(tb.client, kept["sandbox_id"], "rev /env/r")
    # The error is what the pull request's body quotes when setup fails.
    assert setup_token[::-1] not in json.dumps(told) + live
    assert setup_token not in read["stdout"]


# --- races -------------------------------------------------------------------------------------------------------


async def test_two_servers_preparing_the_same_key_at_once_both_finish_and_run_it_once(
        sandbox_servers, make_repo) -> None:
    first, second = await sandbox_servers(), await sandbox_servers()
    repo = make_repo({".tb/setup.sh": "sleep 1\n" + HELLO})
    with anyio.fail_after(15):  # a setup of a second or so, twice over at worst
        (a, live_a), (b, live_b) = await asyncio.gather(first.call("create_sandbox", repo_url=str(repo)),
                                                        second.call("create_sandbox", repo_url=str(repo)))
    assert (live_a + live_b).count("SETUP-RAN") == 1
    assert (await sh(second.client, b["sandbox_id"], "hello"))["exit_code"] == 0


async def test_another_server_on_the_root_never_evicts_an_environment_in_use(sandbox_servers, make_repo) -> None:
    holder, evicter = await sandbox_servers(), await sandbox_servers(env_cache_mib=0)
    held, _ = await create(holder, make_repo({".tb/setup.sh": HELLO}))
    await create(evicter, make_repo({".tb/setup.sh": HELLO + "echo other\n"}))
    ran = await sh(holder.client, held["sandbox_id"], "hello")
    assert ran["stdout"] == "hello from the environment\n", ran


async def test_a_destroy_during_setup_leaves_no_process_build_or_mount(sandbox_root, make_repo) -> None:
    marker = unique_marker()
    manager = SandboxManager(Settings(backend="local", root=sandbox_root))
    try:
        creating = asyncio.create_task(manager.create(str(make_repo({".tb/setup.sh": f"sleep {marker}\n"})), None))
        with anyio.fail_after(20):
            while not host_processes(marker):
                await asyncio.sleep(0.01)
            (sandbox_id,) = manager._sandboxes
            await manager.destroy(sandbox_id)
            info = await creating
        assert info.environment.status == "failed"
        assert await gone(marker)
        assert not list((sandbox_root / "envs").iterdir()) or not [
            p for p in (sandbox_root / "envs").iterdir() if p.name.startswith(".build-") or p.suffix == ".json"]
        assert sandbox_dirs(sandbox_root) == [] and list(sandbox_root.glob("uid-*")) == []
    finally:
        await manager.destroy_all()


async def test_a_destroy_while_the_environment_is_kept_leaves_it_evictable(sandbox_root, make_repo,
                                                                           monkeypatch) -> None:
    keeping, resume = asyncio.Event(), asyncio.Event()
    keep = EnvCache._keep

    async def paused(self, *args):
        keeping.set()
        await resume.wait()
        return await keep(self, *args)

    monkeypatch.setattr(EnvCache, "_keep", paused)
    manager = SandboxManager(Settings(backend="local", root=sandbox_root, env_cache_mib=0))
    try:
        creating = asyncio.create_task(manager.create(str(make_repo({".tb/setup.sh": HELLO})), None))
        with anyio.fail_after(20):
            await keeping.wait()
            (sandbox_id,) = manager._sandboxes
            await manager.destroy(sandbox_id)
            resume.set()
            await creating
        # Nobody holds it any more: a cache of 0 MiB keeps nothing nobody holds.
        assert len(await manager._envs.evict()) == 1
    finally:
        resume.set()
        await manager.destroy_all()
