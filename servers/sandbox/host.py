"""A sandbox whose repository is a directory on this machine: the base of the bubblewrap and process backends.

Commands run through `jail_argv`, which each backend defines, in the sandbox's control group when there is one;
`git` for `export_changes` and ripgrep for `list_files` and `search` run there too, never on the host: the
repository's `.git/config` is the sandbox's to write, and a walk on the host could be led astray by a link swapped
in mid-walk. Reads, writes and edits run here through `files`, as the sandbox's own user (`as_user`).
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from common.changeset import MAX_CHANGESET_BYTES, ChangedFile, Changeset

from . import files, listing, volume
from .base import ExecResult, SandboxError, SandboxInfo
from .cgroup import Cgroup
from .system import run_tool

P = ParamSpec("P")
R = TypeVar("R")

OUTPUT_CAP = 30_000
LISTING_CAP = 16 * 1024 * 1024  # `git diff --raw` of the most entries a changeset may hold, at their longest
DIFF_CAP = 200_000
INLINE_READ_BYTES = 64 * 1024
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
SANDBOX_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TERM": "dumb",
    "PAGER": "cat",
    "GIT_PAGER": "cat",
    "GIT_TERMINAL_PROMPT": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "CI": "1",
}


@dataclass(frozen=True)
class Limits:
    """Resource limits of every process a sandbox runs, set by the shell that runs the command."""

    processes: int = 256
    memory_kib: int = 8 * 1024**2
    file_kib: int = 1024**2
    cpu_seconds: int = 900
    open_files: int = 4096

    def shell_prefix(self, address_space: bool = True) -> str:
        """`ulimit`s for the shell that runs a command; without the address-space limit when a memory cgroup
        bounds the sandbox instead (a per-process address space cap breaks runtimes that reserve much, like Go's
        or the JVM's, and does not add up across processes anyway)."""
        # Hard and soft, so the command cannot raise them again; one that fails was already lower, which holds too.
        limits = {"u": self.processes, "v": self.memory_kib, "f": self.file_kib, "t": self.cpu_seconds,
                  "n": self.open_files, "c": 0}
        if not address_space:
            del limits["v"]
        # On the command's own first line, so that bash's "line N" in an error message is the command's line N.
        return "".join(f"ulimit -HS -{flag} {value} 2>/dev/null; " for flag, value in limits.items())


def agent_prefix(environment: bool, read_only: bool) -> str:
    """What an agent's command runs first, on its own first line: the environment's profile (PATH, VIRTUAL_ENV…);
    installers that fail at once instead of retrying a network that is not there; no pytest cache on a read-only
    repository, where it could only warn."""
    prefix = "if [ -r /env/profile ]; then . /env/profile; fi; " if environment else ""
    prefix += "export PIP_RETRIES=0 npm_config_fetch_retries=0; "
    if read_only:
        prefix += 'export PYTEST_ADDOPTS="-p no:cacheprovider ${PYTEST_ADDOPTS:-}"; '
    return prefix


@dataclass
class Captured:
    text: str
    truncated: bool


Output = Callable[[str], None]  # receives a command's output as it comes, for a client watching it live


@dataclass(frozen=True)
class SetupMounts:
    """What a setup's jail has that a command's has not: the environment to fill, and the way to the network."""

    env_dir: Path  # mounted read-write at /env
    egress_socket: Path | None  # the egress proxy's Unix socket, bound into the jail


async def _capture(stream: asyncio.StreamReader, cap: int, on_output: Output | None = None) -> Captured:
    """Read a stream to its end, keeping its first and last `cap // 2` bytes."""
    half = cap // 2
    head, tail = bytearray(), bytearray()
    dropped = 0
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    while chunk := await stream.read(65536):
        if on_output is not None:
            on_output(decoder.decode(chunk))
        if len(head) < half:
            take = half - len(head)
            head += chunk[:take]
            chunk = chunk[take:]
        tail += chunk
        if len(tail) > half:
            dropped += len(tail) - half
            del tail[: len(tail) - half]
    text = head.decode("utf-8", "replace")
    if dropped:
        text += f"\n… [{dropped} bytes cut from the middle] …\n"
    return Captured(text + tail.decode("utf-8", "replace"), dropped > 0)


def _kill_uid(uid: int) -> int:
    """SIGKILL every process whose real uid is `uid`; the number still found."""
    found = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                fields = dict(line.split(b":", 1) for line in f if line.startswith((b"State:", b"Uid:")))
            if int(fields[b"Uid"].split()[0]) == uid and not fields[b"State"].strip().startswith(b"Z"):
                found += 1
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, KeyError, ValueError):
            continue
    return found


async def _exited(pid: int) -> None:
    """Wait for the process itself to exit; `Process.wait()` would also wait for every holder of its pipes."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # already exited and reaped
        return
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
for _name in ("setfsuid", "setfsgid"):
    getattr(_libc, _name).argtypes = [ctypes.c_uint]


@contextlib.contextmanager
def as_user(owner: tuple[int, int] | None) -> Iterator[None]:
    """Run the block's file system calls as `owner`, in this thread only.

    The file system ids are per thread, and leaving uid 0 drops the thread's file capabilities (DAC override and
    the rest), so what the block opens is exactly what the sandbox's own user could open. The server runs without
    supplementary groups (`drop_groups`), so none of root's groups come along.
    """
    if owner is None:
        yield
        return
    uid, gid = owner
    old_gid, old_uid = _libc.setfsgid(gid), _libc.setfsuid(uid)
    try:
        if _libc.setfsuid(0xFFFFFFFF) != uid or _libc.setfsgid(0xFFFFFFFF) != gid:  # -1 changes nothing, answers
            raise SandboxError("could not take the sandbox's user for a file operation")
        yield
    finally:
        _libc.setfsuid(old_uid)
        _libc.setfsgid(old_gid)


def drop_groups() -> None:
    """Leave root's supplementary groups, which file system ids do not replace; as root, nothing needs them."""
    if os.geteuid() == 0 and os.getgroups():
        os.setgroups([])


class HostSandbox:
    """Shared behaviour of backends that keep the repository in a host directory."""

    backend = "host"

    def __init__(self, info: SandboxInfo, home: Path, repo: Path, owner: tuple[int, int] | None, limits: Limits,
                 cgroup: Cgroup | None = None, max_calls: int = 4):
        self.info = info
        self.home = home  # removed whole on destroy
        self.repo = repo
        self.owner = owner  # (uid, gid) that sandboxed processes run as, when the server runs as root
        self.limits = limits
        self.cgroup = cgroup  # the budget all its processes share; None where the host gives no control group
        self._groups: set[int] = set()
        self._destroyed = False
        # Its own thread and its own cap on commands in flight: one sandbox's slow calls never wait on another's.
        self._files = ThreadPoolExecutor(1, thread_name_prefix=f"files-{info.sandbox_id[:12]}")
        self._calls = asyncio.Semaphore(max_calls)
        self.max_calls = max_calls
        self.environment: Path | None = None  # the prepared environment every command sees at /env, read-only
        self.on_destroy: list[Callable[[], None]] = []

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    def use_environment(self, path: Path, release: Callable[[], None]) -> None:
        """Give every later command the environment at `path`; `release` runs when the sandbox is destroyed."""
        if self._destroyed:  # destroyed while its environment was made
            release()
            return
        self.environment = path
        self.on_destroy.append(release)

    @property
    def env(self) -> dict[str, str]:
        return SANDBOX_ENV

    def spawn_prefix(self) -> list[str]:
        """setpriv: the sandbox's own uid (Python's own user= would make every spawn a full fork), and death with
        this server, since bubblewrap outlives its parent otherwise and its jail with it."""
        ids = [f"--reuid={self.owner[0]}", f"--regid={self.owner[1]}", "--clear-groups"] if self.owner else []
        join = self.cgroup.join_argv() if self.cgroup else []
        return [*join, SETPRIV, *ids, "--pdeathsig", "SIGKILL", "--"]

    def jail_argv(self, script_fd: int, cwd: str, read_only: bool = False, setup: SetupMounts | None = None
                  ) -> tuple[list[str], str | None]:
        """The argv that runs the shell script in the descriptor `script_fd` in `cwd` (relative to the
        repository), and the host cwd to start it in; with `setup`, in a setup's jail."""
        raise NotImplementedError

    async def run(self, command: str, timeout_s: float, workdir: str = ".", cap: int = OUTPUT_CAP,
                  read_only: bool = False, on_output: Output | None = None, setup: SetupMounts | None = None
                  ) -> ExecResult:
        """Run `command` in the jail; kill everything it started when it ends or times out."""
        self._check_alive()
        cwd = files.normalize(workdir, allow_root=True)
        self._as_owner(files.check_dir, self.repo, cwd)
        try:
            async with asyncio.timeout(timeout_s):
                await self._calls.acquire()
        except TimeoutError:
            raise SandboxError(f"{self.max_calls} commands were already running in this sandbox for all of "
                               f"{timeout_s:g} s; wait for them to finish, or run fewer at once") from None
        try:
            return await self._run(command, timeout_s, cwd, cap, read_only, on_output, setup)
        finally:
            self._calls.release()

    async def _run(self, command: str, timeout_s: float, cwd: str, cap: int, read_only: bool,
                   on_output: Output | None, setup: SetupMounts | None) -> ExecResult:
        # The script travels in a memory file, not in argv, where every local user could read it in /proc. bash
        # reads it through /dev/fd/N on a descriptor of its own, so the command first closes the one it inherits.
        script_fd = os.memfd_create("tb-command", os.MFD_CLOEXEC)
        script = f"exec {script_fd}<&-; " + self.limits.shell_prefix(address_space=self.cgroup is None) + command
        try:
            os.pwrite(script_fd, script.encode("utf-8", "replace"), 0)  # read from offset 0
            argv, host_cwd = self.jail_argv(script_fd, cwd, read_only, setup)
            proc = await asyncio.create_subprocess_exec(
                *self.spawn_prefix(), *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=self.env, cwd=host_cwd, start_new_session=True,
                pass_fds=(script_fd,))
        finally:
            os.close(script_fd)
        self._groups.add(proc.pid)
        if self._destroyed:  # destroyed while we were starting it
            self._kill_group(proc.pid)
        readers = asyncio.gather(_capture(proc.stdout, cap, on_output), _capture(proc.stderr, cap, on_output))
        readers.add_done_callback(lambda f: f.cancelled() or f.exception())
        timed_out = False
        try:
            await asyncio.wait_for(_exited(proc.pid), timeout_s)
        except TimeoutError:
            timed_out = True
        except BaseException:
            readers.cancel()
            raise
        finally:
            # Background jobs die with the command that started them, as they do in the bubblewrap jail.
            self._kill_group(proc.pid)
        try:
            out, err = await asyncio.wait_for(readers, 5)
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:  # a process that escaped the group holds the pipe open
            out, err = Captured("", True), Captured("output lost: a detached process kept it open", True)
        code = -1 if timed_out or proc.returncode is None else proc.returncode
        if timed_out:
            err = Captured(err.text + f"\n[killed: the command ran past its {timeout_s:g} s timeout]", err.truncated)
        return ExecResult(exit_code=code, stdout=out.text, stderr=err.text, timed_out=timed_out,
                          truncated=out.truncated or err.truncated)

    def _kill_group(self, pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._groups.discard(pgid)

    def _check_alive(self) -> None:
        if self._destroyed:
            raise SandboxError(f"sandbox {self.info.sandbox_id} was destroyed; create a new one")

    async def exec(self, command: str, timeout_s: float, workdir: str, read_only: bool = False,
                   on_output: Output | None = None) -> ExecResult:
        return await self.run(agent_prefix(self.environment is not None, read_only) + command, timeout_s, workdir,
                              read_only=read_only, on_output=on_output)

    def _as_owner(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        with as_user(self.owner):
            return fn(*args, **kwargs)

    async def _in_thread(self, fn: Callable[..., R], *args: object) -> R:
        """`fn` as the sandbox's user, on the sandbox's own thread."""
        self._check_alive()
        return await asyncio.get_running_loop().run_in_executor(self._files, self._as_owner, fn, *args)

    async def read_file(self, path: str, offset: int, limit: int) -> str:
        self._check_alive()
        # A typical source file is read inline, where a thread hop would cost more than the read; a larger one on
        # the sandbox's own thread, so that no sandbox holds the event loop that every sandbox shares.
        try:
            return self._as_owner(files.read_text, self.repo, path, offset, limit, INLINE_READ_BYTES)
        except files.Larger:
            return await self._in_thread(files.read_text, self.repo, path, offset, limit)

    async def write_file(self, path: str, content: str) -> int:
        return await self._in_thread(files.write_text, self.repo, path, content)

    async def edit_file(self, path: str, old_text: str, new_text: str, replace_all: bool) -> str:
        return await self._in_thread(files.edit_text, self.repo, path, old_text, new_text, replace_all)

    async def list_files(self, path: str, pattern: str | None) -> tuple[list[str], bool]:
        return await listing.list_files(self.run, path, pattern)

    async def search(self, pattern: str, path: str, glob: str | None) -> tuple[list[str], bool]:
        return await listing.search(self.run, pattern, path, glob)

    async def export_changes(self) -> tuple[Changeset, str]:
        """Everything that differs from the base commit: untracked files included, ignored ones not."""
        return await collect_changes(
            self.info.base_commit, lambda script, cap: self.run(script, 120, ".", cap),
            lambda changed: self._in_thread(files.read_changed, self.repo, changed, MAX_CHANGESET_BYTES))

    async def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        self._files.shutdown(wait=False)
        for pgid in list(self._groups):
            self._kill_group(pgid)
        if self.cgroup is not None:
            # Everything in its group is the sandbox's, detached or not; gone before we remove its files.
            with contextlib.suppress(TimeoutError, OSError):
                await self.cgroup.destroy()
        elif self.owner:
            # Everything running as the sandbox's own uid is the sandbox's, detached or not: wait until it is all
            # gone, so nothing writes into the tree while we remove it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    while _kill_uid(self.owner[0]):
                        await asyncio.sleep(0.01)
        await remove_tree(self.home)
        for release in self.on_destroy:
            release()


async def collect_changes(base: str, run: Callable[[str, int], Awaitable[ExecResult]],
                          read_changed: Callable[[list[tuple[str, str]]], Awaitable[list[bytes]]]
                          ) -> tuple[Changeset, str]:
    """The changeset and diff against `base`, with git run by `run(script, output cap)` where the repository lives
    (never on the host: git executes what the sandbox's `.git/config` names) and contents read by `read_changed`."""
    # A throwaway index of its own per call, so the sandbox's staging area is left as the agent left it and two
    # exports at once do not fight over one lock.
    index = f".git/tb-export-{secrets.token_hex(6)}"
    git = f"GIT_INDEX_FILE={index} git -c core.hooksPath=/dev/null -c core.fsmonitor=false"
    listed = await run(f"set -e; {git} read-tree {base}; {git} add -A .; "
                       f"{git} diff --cached --raw -z --no-renames --abbrev=40 {base}", LISTING_CAP)
    # --text: an attribute such as `-diff` must not hide, as "Binary files differ", what the changeset commits.
    # The diff is cut in the sandbox, so a huge one never reaches the server's memory whole.
    shown = await run(f"{git} diff --cached --no-renames --no-color --no-ext-diff --no-textconv --text {base} "
                      f"| head -c {DIFF_CAP * 4}; code=${{PIPESTATUS[0]}}; rm -f {index}; "
                      "[ $code = 0 ] || [ $code = 141 ]", DIFF_CAP * 4 + 4096)
    for result in (listed, shown):
        if result.exit_code != 0 or result.truncated:
            raise SandboxError(f"could not compute the changes: {result.stderr.strip()[-1000:]}")
    changed, deleted = _parse_raw(listed.stdout)
    contents = await read_changed(changed) if changed else []
    if len(contents) != len(changed):
        raise SandboxError("could not compute the changes: the sandbox returned the wrong number of files")
    out = [ChangedFile(path=path, mode=mode, content_base64=base64.b64encode(data).decode())
           for (path, mode), data in zip(changed, contents)]
    diff = shown.stdout
    if len(diff) > DIFF_CAP:
        diff = diff[:DIFF_CAP] + f"\n… [diff cut at {DIFF_CAP} characters; the changeset holds every file whole]\n"
    return Changeset(base_commit=base, files=out, deleted=deleted), diff


async def remove_tree(path: Path) -> None:
    """Delete a sandbox's directory, however deep, with the volumes mounted in it, never leaving its file system."""
    if path.exists():
        await volume.unmount_under(path)
        await run_tool("rm", "-rf", "--one-file-system", "--", str(path))


_RAW_META = re.compile(r":[0-7]{6} ([0-7]{6}) [0-9a-f]{40,64} [0-9a-f]{40,64} ([AMDT])")


def _parse_raw(raw: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(path, mode) of added or modified files and the deleted paths, from `git diff --raw -z`.

    The output comes from inside the jail, where the repository's config can make git print anything: parse it
    strictly and refuse what does not fit.
    """
    fields = raw.split("\x00")
    if fields and fields[-1] == "":
        fields.pop()
    if len(fields) % 2:
        raise SandboxError("could not compute the changes: git printed an unexpected listing")
    changed, deleted = [], []
    for meta, path in zip(fields[0::2], fields[1::2]):
        match = _RAW_META.fullmatch(meta)
        path = files.normalize(path)
        if match is None or ".git" in path.split("/"):
            raise SandboxError(f"could not compute the changes: unexpected entry for {path[:200]!r}")
        new_mode, status = match.groups()
        if status == "D":
            deleted.append(path)
        elif new_mode in ("100644", "100755", "120000"):
            changed.append((path, new_mode))
    return changed, deleted
