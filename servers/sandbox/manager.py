"""The sandboxes this server holds: creating them on the configured backend, finding them by id, reaping idle ones."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .base import BackendUnavailable, Sandbox, SandboxError, SandboxInfo
from .clone import clone, refuse_under
from .host import Limits, remove_tree, run_tool

log = logging.getLogger(__name__)

# Backends load only when chosen, so a heavy client library costs nothing when it is not used.
BACKENDS = {
    "local": "servers.sandbox.local:BwrapSandbox",
    "process": "servers.sandbox.process:ProcessSandbox",
}


@dataclass(frozen=True)
class Settings:
    """Read once from SANDBOX_* environment variables."""

    backend: str = "local"
    root: Path = Path(tempfile.gettempdir()) / "tiny-backspace-sandboxes"
    allow_unsafe: bool = False
    uid_base: int = 200_000  # sandboxes run as uids in [uid_base, uid_base + 65536) when the server is root
    idle_ttl_s: float = 1800
    max_sandboxes: int = 32
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        backend = env.get("SANDBOX_BACKEND", "local")
        if backend not in BACKENDS:
            raise BackendUnavailable(f"SANDBOX_BACKEND={backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
        return cls(
            backend=backend,
            allow_unsafe=env.get("SANDBOX_ALLOW_UNSAFE") == "1",
            uid_base=int(env.get("SANDBOX_UID_BASE", cls.uid_base)),
            root=Path(env.get("SANDBOX_ROOT") or cls.root),
            idle_ttl_s=float(env.get("SANDBOX_IDLE_TTL_S", cls.idle_ttl_s)),
            max_sandboxes=int(env.get("SANDBOX_MAX", cls.max_sandboxes)),
        )


UID_SPAN = 1 << 16


def _sandbox_owner(base: int, taken: set[int]) -> tuple[int, int] | None:
    """A uid of its own for each sandbox when we are root: rlimits (processes above all) count per uid, so one
    sandbox cannot use up another's, and host files stay out of reach. As a plain user we run as ourselves."""
    if os.geteuid() != 0:
        return None
    uid = base + secrets.randbelow(UID_SPAN)
    while uid in taken:
        uid = base + secrets.randbelow(UID_SPAN)
    return uid, uid


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


class SandboxManager:
    def __init__(self, settings: Settings):
        self.settings = settings
        module, _, name = BACKENDS[settings.backend].partition(":")
        self.backend_cls = getattr(importlib.import_module(module), name)
        self._sandboxes: dict[str, Sandbox] = {}
        self._last_used: dict[str, float] = {}
        self._pending = 0  # creates under way, counted against max_sandboxes

    async def create(self, repo_url: str, ref: str | None) -> SandboxInfo:
        self.backend_cls.check(self.settings.allow_unsafe)
        if len(self._sandboxes) + self._pending >= self.settings.max_sandboxes:
            raise SandboxError(f"this server already holds {self.settings.max_sandboxes} sandboxes; "
                               "destroy one you no longer need")
        self._pending += 1
        try:
            return await self._create(repo_url, ref)
        finally:
            self._pending -= 1

    async def _create(self, repo_url: str, ref: str | None) -> SandboxInfo:
        root = _own_root(self.settings.root)
        owner = _sandbox_owner(self.settings.uid_base, self._uids())
        _check_reachable(root, owner)
        refuse_under(repo_url, root)
        sandbox_id = "sbx_" + secrets.token_urlsafe(18)
        home = Path(tempfile.mkdtemp(prefix="sbx-", dir=root))
        try:
            os.chmod(home, 0o711)
            repo = home / "repo"
            cloned = await clone(repo_url, ref, repo)
            (home / "tmp").mkdir()
            if owner:
                await run_tool("chown", "-R", "-h", "-P", f"{owner[0]}:{owner[1]}", "--", str(repo), str(home / "tmp"))
        except BaseException:
            await asyncio.shield(remove_tree(home))
            raise
        info = SandboxInfo(sandbox_id=sandbox_id, base_commit=cloned.base_commit,
                           default_branch=cloned.default_branch, backend=self.backend_cls.backend,
                           workdir=self.backend_cls.workdir_for(repo))
        self._sandboxes[sandbox_id] = self.backend_cls(info, home, repo, owner, self.settings.limits)
        self._last_used[sandbox_id] = time.monotonic()
        log.info("created sandbox %s (%s) from %s", sandbox_id, info.backend, repo_url)
        return info

    def _uids(self) -> set[int]:
        return {owner[0] for s in self._sandboxes.values() if (owner := getattr(s, "owner", None))}

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
        await sandbox.destroy()
        log.info("destroyed sandbox %s", sandbox_id)

    async def destroy_all(self) -> None:
        await asyncio.gather(*(self.destroy(i) for i in list(self._sandboxes)), return_exceptions=True)

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
            except Exception:  # noqa: BLE001 - the reaper must outlive any one failure
                log.exception("reaping idle sandboxes failed")
