"""The sandboxes this server holds: creating them on the configured backend, finding them by id, reaping idle ones,
and removing what a server that died left of its sandboxes."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import importlib
import logging
import os
import pwd
import re
import secrets
import stat
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.settings import ConfigError, at_least, between, one_of, read, setting

from .base import BackendUnavailable, EnvironmentInfo, Sandbox, SandboxError, SandboxInfo
from .cgroup import Budget, Cgroup, Hierarchy
from .clone import clone, refuse_under
from . import allowlist, prepare, volume
from .envcache import EnvCache
from .host import HostSandbox, Limits, Output, drop_groups, remove_tree
from .system import run_tool
from .modal_setup import ModalSettings, ModalUnavailable, has_credentials

log = logging.getLogger(__name__)

# Backends load only when chosen, so a heavy client library costs nothing when it is not used.
BACKENDS = {
    "local": "servers.sandbox.local:BwrapSandbox",
    "process": "servers.sandbox.process:ProcessSandbox",
    "modal": "servers.sandbox.modal_backend:ModalSandbox",
}
# `auto`: Modal when credentials exist, the local backend otherwise or when Modal fails at create.
CHOICES = [*BACKENDS, "auto"]
# The ids create_sandbox hands out; no other string is looked for on this machine or on Modal.
WELL_FORMED = re.compile(r"sbx_[A-Za-z0-9_-]{24}")
MARKER = "sandbox-id"  # in each sandbox's folder: its id, for a server that finds the folder left behind
REMEMBERED = 10_000  # ids of sandboxes ended or found left behind that a server keeps, to answer for them later


def _allowlist_problem(value: str) -> str | None:
    try:
        allowlist.Allowlist.parse(value)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Settings:
    """Read once from SANDBOX_* environment variables."""

    backend: str = setting("SANDBOX_BACKEND", "auto", check=one_of(*CHOICES))
    # As root, not in a world-writable folder where another user could take the name first.
    root: Path = setting("SANDBOX_ROOT", Path("/var/lib/tiny-backspace/sandboxes") if os.geteuid() == 0 else
                         Path(tempfile.gettempdir()) / "tiny-backspace-sandboxes")
    allow_unsafe: bool = setting("SANDBOX_ALLOW_UNSAFE", False)
    # Sandboxes run as uids in [uid_base, uid_base + uid_count) when the server is root: by default above the
    # ranges useradd hands out for rootless containers (/etc/subuid) and systemd's for containers, below 2^31.
    uid_base: int = setting("SANDBOX_UID_BASE", 2_000_000_000, check=between(1000, 2**32 - 2**17))
    uid_count: int = setting("SANDBOX_UID_COUNT", 65536, check=at_least(1))
    idle_ttl_s: float = setting("SANDBOX_IDLE_TTL_S", 1800, check=at_least(1))
    max_sandboxes: int = setting("SANDBOX_MAX", 32, check=at_least(1))
    # Commands (exec, search, list_files, export) one sandbox runs at once; more wait their turn.
    max_calls: int = setting("SANDBOX_MAX_CALLS", 4, check=at_least(1))
    limits: Limits = field(default_factory=Limits)
    budget: Budget = field(default_factory=Budget)
    # Each repository's own file system; 0 leaves it on the sandbox root's.
    disk_mib: int = setting("SANDBOX_DISK_MIB", 2048, check=lambda v: None if v == 0 or v >= 16 else
                            "must be 0 (no volume) or 16 or more")
    # The setup phase: `auto` runs a request's setup, else the repository's .tb/setup.sh, else a detected one.
    setup: str = setting("SANDBOX_SETUP", "auto", check=one_of("auto", "off"))
    setup_allow: str = setting("SANDBOX_SETUP_ALLOW", ",".join(allowlist.DEFAULT_ALLOW), check=_allowlist_problem)
    setup_env: tuple[str, ...] = setting("SANDBOX_SETUP_ENV", ())  # variables of ours given to setup alone
    setup_timeout_s: float = setting("SANDBOX_SETUP_TIMEOUT_S", 900, check=between(1, 3600))
    env_disk_mib: int = setting("SANDBOX_ENV_DISK_MIB", 4096, check=at_least(64))
    env_cache_mib: int = setting("SANDBOX_ENV_CACHE_MIB", 16384, check=at_least(0))
    modal: ModalSettings = field(default_factory=ModalSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings of SANDBOX_* variables; a `ConfigError` names every bad one."""
        return read(cls, os.environ if env is None else env)


def taken_ids(base: int, count: int) -> str | None:
    """Who else uses ids in [base, base + count): a user, a group, or a sub-id range of /etc/subuid or /etc/subgid
    (rootless containers run as those); None when nobody does."""
    end = base + count
    for entry in pwd.getpwall():
        if base <= entry.pw_uid < end:
            return f"user {entry.pw_name} has uid {entry.pw_uid}"
    for group in grp.getgrall():
        if base <= group.gr_gid < end:
            return f"group {group.gr_name} has gid {group.gr_gid}"
    for table in ("/etc/subuid", "/etc/subgid"):
        try:
            lines = Path(table).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            name, _, rest = line.partition(":")
            first, _, size = rest.partition(":")
            if first.isdigit() and size.isdigit() and int(first) < end and base < int(first) + int(size):
                return f"{table} gives {name} ids {first}-{int(first) + int(size) - 1}"
    return None


def _claim_uid(root: Path, base: int, count: int, holder: str) -> tuple[int, int] | None:
    """A uid of its own for each sandbox when we are root: process limits count per uid, and host files stay out of
    reach. Claimed by an exclusive create under the shared root, so two servers on one machine never share one; the
    claim names its server's folder, so the uids of a server that died are freed with its folder. As a plain user we
    run as ourselves."""
    if os.geteuid() != 0:
        return None
    start = secrets.randbelow(count)
    for uid in (base + (start + i) % count for i in range(count)):
        try:
            fd = os.open(root / f"uid-{uid}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        os.write(fd, holder.encode())
        os.close(fd)
        return uid, uid
    raise SandboxError(f"all {count} sandbox uids from {base} are in use (SANDBOX_UID_BASE, SANDBOX_UID_COUNT); "
                       "destroy sandboxes you no longer need")


def _release_uid(root: Path, owner: tuple[int, int] | None) -> None:
    if owner is not None:
        (root / f"uid-{owner[0]}").unlink(missing_ok=True)


def _release_uids_of(root: Path, holder: str) -> None:
    for claim in root.glob("uid-*"):
        with contextlib.suppress(OSError):
            if claim.read_text() == holder:
                claim.unlink()


def _check_reachable(root: Path, owner: tuple[int, int] | None) -> None:
    """Refuse a sandbox root whose ancestors the sandbox user cannot traverse: bubblewrap could not bind it."""
    if owner is None:
        return
    for parent in [root, *root.parents]:
        st = parent.stat()
        if not st.st_mode & 0o001 and st.st_uid != owner[0]:
            raise BackendUnavailable(
                f"sandboxes run as uid {owner[0]}, which cannot enter {parent}: set SANDBOX_ROOT to a directory "
                f"every user can traverse (like /tmp/tiny-backspace-sandboxes), or chmod o+x {parent}"
            )


def _own_root(root: Path) -> Path:
    """The sandbox root, created if missing; refused unless it is a real directory of ours that no one else can
    write, since we chown and delete inside it as root."""
    root.mkdir(mode=0o711, parents=True, exist_ok=True)
    st = root.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise BackendUnavailable(
            f"SANDBOX_ROOT {root} must be a directory owned by this server's user and writable by no one else; "
            "remove it, or set SANDBOX_ROOT to another path"
        )
    return root


def _load(backend: str) -> type:
    module, _, name = BACKENDS[backend].partition(":")
    return getattr(importlib.import_module(module), name)


def _reason(exc: Exception) -> str:
    return "no credentials" if isinstance(exc, BackendUnavailable) else str(exc)


def _remember(ids: OrderedDict[str, str], sandbox_id: str, value: str) -> None:
    ids[sandbox_id] = value
    while len(ids) > REMEMBERED:
        ids.popitem(last=False)


def _ids_in(folder: Path) -> dict[str, Path]:
    """The sandboxes whose folders a server's folder holds, by id."""
    found = {}
    for marker in folder.glob(f"sbx-*/{MARKER}"):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if WELL_FORMED.fullmatch(sandbox_id := marker.read_text()[:64]):
                found[sandbox_id] = marker.parent
    return found


@dataclass(frozen=True)
class LeftBehind:
    """What a server found of a sandbox it does not hold, and removed."""

    removed: list[str]  # Modal sandboxes and folders of this machine
    note: str


class SandboxManager:
    def __init__(self, settings: Settings):
        self.settings = settings
        # The host backend runs what Modal does not: everything, or what `auto` falls back from.
        self.backend_cls = _load("local" if settings.backend in ("auto", "modal") else settings.backend)
        self.modal_cls = _load("modal") if settings.backend in ("auto", "modal") else None
        self._sandboxes: dict[str, Sandbox] = {}
        self._last_used: dict[str, float] = {}
        self._pending = 0  # creates under way, counted against max_sandboxes
        self._instance: tuple[Path, int] | None = None  # this server's folder under the root, and its lock
        self._hierarchy = Hierarchy.detect()  # where sandboxes' control groups go, or why nowhere
        if isinstance(self._hierarchy, str):
            log.warning("no control group per sandbox (%s): limits hold per command, not per sandbox",
                        self._hierarchy)
        self._owners: dict[str, tuple[int, int]] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()  # ids this server destroyed (the values unused)
        self._left: OrderedDict[str, str] = OrderedDict()  # id -> its folder, left here by a dead server, removed
        self._reaping = asyncio.Lock()
        if os.geteuid() == 0 and (clash := taken_ids(settings.uid_base, settings.uid_count)):
            # Another user's processes under a sandbox's uid could read its files and signal its commands.
            raise ConfigError(f"SANDBOX_UID_BASE={settings.uid_base} and SANDBOX_UID_COUNT={settings.uid_count} "
                              f"overlap ids in use ({clash}): choose a range nobody uses")
        # Why repositories get no volume of their own; None while volumes work (or are not yet tried).
        self._no_volume: str | None = "SANDBOX_DISK_MIB=0" if settings.disk_mib <= 0 else volume.unavailable()
        self._volumes_worked = False
        self._envs: EnvCache | None = None  # prepared environments, made on first use
        if self._no_volume and settings.disk_mib > 0:
            log.warning("no disk cap per sandbox (%s): a sandbox can fill the file system of SANDBOX_ROOT",
                        self._no_volume)
        drop_groups()

    async def create(self, repo_url: str, ref: str | None, setup: str | None = None,
                     on_output: Output | None = None) -> SandboxInfo:
        (self.modal_cls if self.settings.backend == "modal" else self.backend_cls).check(self.settings.allow_unsafe)
        if len(self._sandboxes) + self._pending >= self.settings.max_sandboxes:
            raise SandboxError(f"this server already holds {self.settings.max_sandboxes} sandboxes; "
                               "destroy one you no longer need")
        self._pending += 1
        try:
            return await self._create(repo_url, ref, setup, on_output)
        finally:
            self._pending -= 1

    async def _create(self, repo_url: str, ref: str | None, setup: str | None, on_output: Output | None
                      ) -> SandboxInfo:
        root = _own_root(self.settings.root)
        refuse_under(repo_url, root)
        sandbox_id = "sbx_" + secrets.token_urlsafe(18)
        instance = self._instance_dir(root)
        owner = _claim_uid(root, self.settings.uid_base, self.settings.uid_count, instance.name)
        home = Path(tempfile.mkdtemp(prefix="sbx-", dir=instance))
        try:
            _check_reachable(root, owner)
            os.chmod(home, 0o711)
            (home / MARKER).write_text(sandbox_id)
            repo = await self._volume(home) / "repo"
            # Only the server and the sandbox's own uid may read a clone: it may be a private repository.
            repo.mkdir(mode=0o700)
            cloned = await clone(repo_url, ref, repo)
            info = SandboxInfo(sandbox_id=sandbox_id, base_commit=cloned.base_commit,
                               default_branch=cloned.default_branch, backend=self.backend_cls.backend,
                               workdir=self.backend_cls.workdir_for(repo))
            if self.modal_cls is not None:
                try:
                    modal_info = await self._create_on_modal(info, home, repo, repo_url, setup, on_output)
                    _release_uid(root, owner)  # its commands run on Modal, not as a uid of this machine
                    return modal_info
                except (ModalUnavailable, BackendUnavailable) as exc:
                    if self.settings.backend == "modal":
                        raise BackendUnavailable(f"Modal is unavailable ({exc}); check `modal token info` and "
                                                 "Modal's status page, or set SANDBOX_BACKEND=local") from None
                    info.note = f"Modal unavailable ({_reason(exc)}): using the local backend"
                    log.log(logging.INFO if isinstance(exc, BackendUnavailable) else logging.WARNING,
                            "sandbox %s: %s", sandbox_id, info.note)
                    self.backend_cls.check(self.settings.allow_unsafe)
            (home / "tmp").mkdir(mode=0o700)
            if owner:
                await run_tool("chown", "-R", "-h", "-P", f"{owner[0]}:{owner[1]}", "--", str(repo), str(home / "tmp"))
            cgroup = self._cgroup(f"{instance.name}.{home.name}")
        except BaseException:
            await asyncio.shield(remove_tree(home))
            _release_uid(root, owner)
            raise
        sandbox = self.backend_cls(info, home, repo, owner, self.settings.limits, cgroup, self.settings.max_calls)
        if owner:
            self._owners[sandbox_id] = owner
        self._register(sandbox, repo_url)
        try:
            info.environment = await self._environment(sandbox, repo_url, setup, on_output)
            if sandbox_id in self._last_used:  # a long setup is not idleness
                self._last_used[sandbox_id] = time.monotonic()
        except BaseException:
            if sandbox_id in self._sandboxes:
                await asyncio.shield(self.destroy(sandbox_id))
            raise
        return info

    async def _environment(self, sandbox: HostSandbox, repo_url: str, setup: str | None,
                           on_output: Output | None) -> EnvironmentInfo | None:
        """Prepare the sandbox's environment (see prepare.py); None when setup is off or there is nothing to do."""
        if self.settings.setup == "off" and setup is None:
            return None
        plan = await sandbox._in_thread(prepare.read_plan, sandbox.repo, setup)
        if plan is None:
            return EnvironmentInfo(status="none", source="none")
        return await prepare.prepare(sandbox, plan, repo_url, self._env_cache(), self._setup_policy(), on_output)

    def _setup_policy(self) -> prepare.SetupPolicy:
        secrets = {name: os.environ[name] for name in self.settings.setup_env if name in os.environ}
        return prepare.SetupPolicy(allowlist.Allowlist.parse(self.settings.setup_allow), self.settings.setup_timeout_s,
                                   secrets)

    def _env_cache(self) -> EnvCache:
        if self._envs is None:
            root = self.settings.root
            disk = self._no_volume is None and volume.fs_type(root) != "tmpfs"
            self._envs = EnvCache(root, self.settings.env_disk_mib, self.settings.env_cache_mib, disk)
        return self._envs

    async def _volume(self, home: Path) -> Path:
        """Where the repository goes: a volume of its own when the host allows one, else `home` itself."""
        if self._no_volume:
            return home
        try:
            point = await volume.make(home, self.settings.disk_mib)
        except volume.NoRoom:
            raise
        except SandboxError as exc:
            if self._volumes_worked:
                raise SandboxError(f"could not make the sandbox's volume ({exc}); try again, or set "
                                   "SANDBOX_DISK_MIB=0 to run without a disk cap") from None
            self._no_volume = str(exc)
            log.warning("no disk cap per sandbox (%s): a sandbox can fill the file system of SANDBOX_ROOT", exc)
            await volume.unmount_under(home)
            return home
        self._volumes_worked = True
        return point

    def _cgroup(self, name: str) -> Cgroup | None:
        """A control group with the sandbox budget, or None where the host gives none."""
        if isinstance(self._hierarchy, str):
            return None
        try:
            return self._hierarchy.create(name, self.settings.budget)
        except OSError as exc:
            raise BackendUnavailable(f"could not create the sandbox's control group ({exc.strerror}: "
                                     f"{exc.filename}); check that the server may write its cgroup") from None

    async def _create_on_modal(self, info: SandboxInfo, home: Path, repo: Path, repo_url: str, setup: str | None,
                               on_output: Output | None) -> SandboxInfo:
        """`info`'s sandbox on Modal, its environment prepared there (see modal_env.py), made from the clone at
        `repo` in `home`, which is then removed."""
        self.modal_cls.check(self.settings.allow_unsafe)
        info = info.model_copy(update={"backend": "modal", "workdir": self.modal_cls.workdir_for(repo)})
        from .modal_env import SetupRequest  # with the Modal backend, which loads only when chosen

        request = None
        if self.settings.setup != "off" or setup is not None:
            request = SetupRequest(setup, repo_url, self._setup_policy(), self.settings.root)
        sandbox = await self.modal_cls.open(info, repo, self.settings.modal, self.settings.limits, request, on_output)
        await asyncio.shield(remove_tree(home))
        self._register(sandbox, repo_url)
        return sandbox.info

    def _register(self, sandbox: Sandbox, repo_url: str) -> None:
        self._sandboxes[sandbox.info.sandbox_id] = sandbox
        self._last_used[sandbox.info.sandbox_id] = time.monotonic()
        log.info("created sandbox %s (%s) from %s", sandbox.info.sandbox_id, sandbox.info.backend, repo_url)

    def holds(self, sandbox_id: str) -> bool:
        return sandbox_id in self._sandboxes

    def get(self, sandbox_id: str) -> Sandbox:
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is None:
            raise SandboxError(f"no sandbox {sandbox_id[:64]!r}: it was destroyed or never existed; "
                               "call create_sandbox for a new one")
        self._last_used[sandbox_id] = time.monotonic()
        return sandbox

    async def destroy(self, sandbox_id: str) -> None:
        sandbox = self.get(sandbox_id)
        self._sandboxes.pop(sandbox_id, None)
        self._last_used.pop(sandbox_id, None)
        _remember(self._ended, sandbox_id, "")
        try:
            await sandbox.destroy()
        finally:
            _release_uid(self.settings.root, self._owners.pop(sandbox_id, None))
        log.info("destroyed sandbox %s", sandbox_id)

    async def destroy_all(self) -> None:
        await asyncio.gather(*(self.destroy(i) for i in list(self._sandboxes)), return_exceptions=True)
        if self._instance is not None:
            await remove_tree(self._instance[0])
            os.close(self._instance[1])
            self._instance = None

    async def remove_left(self, sandbox_id: str) -> LeftBehind:
        """Remove what is left of a sandbox this server does not hold, wherever this server can reach: the folders
        servers that died on this machine left (see `reap_orphans`), and with Modal the sandboxes tagged with its id.

        For a replica that adopts the runs of one that died: it knows their sandbox ids, not the servers that made
        them. A malformed id, or one this server destroyed itself, is refused as `get` refuses it.
        """
        if sandbox_id in self._sandboxes:
            raise ValueError(f"sandbox {sandbox_id} is held by this server: destroy it")
        if not WELL_FORMED.fullmatch(sandbox_id) or sandbox_id in self._ended:
            self.get(sandbox_id)
        await self.reap_orphans()
        removed = [folder] if (folder := self._left.get(sandbox_id)) else []
        places = "this machine"
        if self.modal_cls is not None and has_credentials():
            from .modal_backend import end_tagged  # loaded already: modal_cls is its class

            removed += [f"Modal sandbox {i}" for i in await end_tagged(self.settings.modal, sandbox_id)]
            places += " or on Modal"
        if removed:
            return LeftBehind(removed, "not held by this server; removed what was left of it")
        return LeftBehind([], f"not held by this server; none of it found on {places}")

    def _instance_dir(self, root: Path) -> Path:
        """This server's folder under the root, locked for as long as the server lives."""
        if self._instance is None:
            # Locked before it takes the name `reap_orphans` looks for, so no reaper ever finds it unlocked.
            claim = Path(tempfile.mkdtemp(prefix=".claim-", dir=root))
            os.chmod(claim, 0o711)
            lock = os.open(claim / ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            folder = root / ("server-" + claim.name.removeprefix(".claim-"))
            claim.rename(folder)
            self._instance = (folder, lock)
        return self._instance[0]

    async def reap_orphans(self) -> list[Path]:
        """Remove the folders of servers that died without cleaning up: nobody holds their lock any more."""
        async with self._reaping:
            return await self._reap_orphans()

    async def _reap_orphans(self) -> list[Path]:
        root = self.settings.root
        reaped = []
        for folder in root.glob("server-*") if root.is_dir() else []:
            if self._instance and folder == self._instance[0]:
                continue
            try:
                lock = os.open(folder / ".lock", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its server is alive, or another server is removing it
                log.info("removing %s, left by a server that is gone", folder)
                left = _ids_in(folder)
                if isinstance(self._hierarchy, Hierarchy):
                    for group in self._hierarchy.stale(folder.name + "."):
                        with contextlib.suppress(TimeoutError, OSError):
                            await group.destroy()
                await remove_tree(folder)
                _release_uids_of(root, folder.name)
                for sandbox_id, home in left.items():
                    _remember(self._left, sandbox_id, str(home))
            finally:
                os.close(lock)
            reaped.append(folder)
        return reaped

    async def reap_idle(self) -> list[str]:
        """Destroy the sandboxes unused for longer than the idle TTL; return their ids."""
        now = time.monotonic()
        idle = [i for i, t in list(self._last_used.items()) if now - t > self.settings.idle_ttl_s]
        for sandbox_id in idle:
            log.info("reaping idle sandbox %s", sandbox_id)
            try:
                await self.destroy(sandbox_id)
            except SandboxError:  # destroyed by its client meanwhile
                pass
        return idle

    async def run_reaper(self) -> None:
        interval = max(1.0, min(60.0, self.settings.idle_ttl_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reap_idle()
                if self.modal_cls is not None and has_credentials():
                    from .modal_backend import reap_expired  # loaded already: modal_cls is its class

                    async with asyncio.timeout(60):
                        await reap_expired(self.settings.modal)
            except Exception:  # noqa: BLE001 - the reaper must outlive any one failure
                log.exception("reaping sandboxes failed")
