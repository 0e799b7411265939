"""Prepared environments, kept under the sandbox root and mounted, with no copy, into every later sandbox of the
same key; bounded in size, the least recently used evicted first.

Under `<root>/envs`:
    <key>/       the environment: a read-only loop mount of <key>.img, or a plain folder where there are no volumes
    <key>.img    its file system, shrunk to what it holds once setup is done
    <key>.json   what it holds (installed, test commands) and its size; its mtime is its last use
    <key>.lock   flock: shared by each sandbox that uses it, exclusive while it is built or evicted, so two servers
                 on one root build a key once and never evict one in use
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import volume
from .system import run_tool

log = logging.getLogger(__name__)
LOCK_WAIT_S = 3600  # another server building the same key: as long as a setup may take


@dataclass
class Lease:
    """A sandbox's hold on an environment: it is not evicted while the lease is held."""

    key: str
    path: Path
    meta: dict[str, Any]
    cached: bool
    _fd: int

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1


Build = Callable[[Path], Awaitable[dict[str, Any]]]
T = TypeVar("T")


class SingleFlight:
    """One build per key at a time: callers asking for the same key meanwhile wait for that build and share its
    result, or its failure; if it is cancelled, one of them builds instead."""

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[None]] = {}

    async def run(self, key: str, lookup: Callable[[], Awaitable[T | None]], build: Callable[[], Awaitable[T]]) -> T:
        """`lookup()` when it finds something, else `build()`, unless a build of `key` is under way."""
        while (pending := self._inflight.get(key)) is not None:
            await asyncio.wait([pending])
            if not pending.cancelled() and pending.exception() is not None:
                raise pending.exception()
        if (found := await lookup()) is not None:
            return found
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = done
        try:
            result = await build()
        except Exception as exc:
            done.set_exception(exc)
            done.exception()  # retrieved: nobody may be waiting
            raise
        except BaseException:
            done.cancel()
            raise
        else:
            done.set_result(None)
        finally:
            del self._inflight[key]
        return result


class EnvCache:
    def __init__(self, root: Path, disk_mib: int, cache_mib: int, volumes: bool):
        self.dir = root / "envs"
        self.disk_mib = disk_mib
        self.cache_bytes = cache_mib * 1024 * 1024
        self.volumes = volumes  # an image of its own per environment; else a folder on the root's file system
        self._flights = SingleFlight()

    async def get(self, key: str, build: Build) -> Lease:
        """A lease on the environment of `key`, made by `build(folder)` when none is ready; one build per key at a
        time (`SingleFlight`)."""
        return await self._flights.run(key, lambda: self._lease(key, cached=True), lambda: self._build(key, build))

    def _open_lock(self, key: str) -> int:
        # Private: a sandbox sees its environment through a view of its own (prepare.py), never through here, so
        # no other local user reads a private repository's dependencies or its setup's records.
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.dir.stat().st_mode & 0o077:
            self.dir.chmod(0o700)
        return os.open(self.dir / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    async def _lease(self, key: str, cached: bool, fd: int | None = None) -> Lease | None:
        """A lease on a ready environment (its lock taken shared), or None when there is none."""
        meta_path, path = self.dir / f"{key}.json", self.dir / key
        if not meta_path.exists():
            if fd is not None:
                os.close(fd)
            return None
        fd = self._open_lock(key) if fd is None else fd
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while another server evicts it
        try:
            meta = json.loads(meta_path.read_text())
            image = self.dir / f"{key}.img"
            if image.exists() and not os.path.ismount(path):  # after a reboot: mounted again, read-only
                path.mkdir(mode=0o755, exist_ok=True)
                await _mount_read_only(image, path)
            os.utime(meta_path)
        except (OSError, ValueError) as exc:
            os.close(fd)
            log.warning("environment %s is unusable (%s); it will be prepared again", key, exc)
            return None
        return Lease(key, path, meta, cached, fd)

    async def _build(self, key: str, build: Build) -> Lease:
        fd = self._open_lock(key)
        try:
            if not await self._exclusive_or_ready(key, fd):  # another server built it meanwhile
                os.close(fd)
                if (ready := await self._lease(key, cached=True)) is not None:
                    return ready
                raise OSError(f"the environment {key} another server made is unusable")
            if (ready := await self._lease(key, cached=True, fd=os.dup(fd))) is not None:  # built just before
                os.close(fd)
                return ready
            work = self.dir / f".build-{key}-{secrets.token_hex(4)}"
            work.mkdir(mode=0o711)
            try:
                point = await volume.make(work, self.disk_mib) if self.volumes else work / "volume"
                point.mkdir(mode=0o755, exist_ok=True)
                meta = await build(point)
                meta["size_bytes"] = await self._keep(key, work, point)
            finally:
                with contextlib.suppress(OSError, Exception):
                    await volume.unmount_under(work)
                    await run_tool("rm", "-rf", "--one-file-system", "--", str(work))
            meta_path = self.dir / f"{key}.json"
            staged = meta_path.with_suffix(f".{secrets.token_hex(4)}")
            with os.fdopen(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "w") as f:
                f.write(json.dumps(meta))
            staged.rename(meta_path)
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        lease = Lease(key, self.dir / key, meta, False, fd)
        await self.evict(keep=key)
        return lease

    async def _keep(self, key: str, work: Path, point: Path) -> int:
        """Move a finished environment to its place, read-only; its size in bytes."""
        final = self.dir / key
        if not self.volumes:
            if os.geteuid() == 0:
                # Owned by root, which clears every setuid and setgid bit: a plain folder is not mounted nosuid.
                await run_tool("chown", "-R", "-h", "-P", "0:0", "--", str(point))
            await run_tool("rm", "-rf", "--one-file-system", "--", str(final))
            point.rename(final)
            return int((await run_tool("du", "-sb", "--", str(final))).split()[0])
        image = work / "volume.img"
        await volume.unmount_image(point, image)
        # Shrunk to what it holds: the reserved size bounded the setup, the cache keeps only what it wrote.
        # resize2fs wants a fresh check first; e2fsck exits 1 when it tidied something, which is fine here.
        await run_tool("sh", "-c", 'e2fsck -f -y "$1" >/dev/null; [ $? -le 1 ]', "e2fsck", str(image),
                       timeout=300, what="e2fsck")
        await run_tool("resize2fs", "-M", str(image), timeout=300)
        final.mkdir(mode=0o755, exist_ok=True)
        await _mount_read_only(image, final)
        image.rename(self.dir / f"{key}.img")  # only once it mounted: a failure leaves nothing outside the bound
        return (self.dir / f"{key}.img").stat().st_size

    async def _exclusive_or_ready(self, key: str, fd: int) -> bool:
        """Take `fd`'s lock exclusively (True), waiting without holding the event loop for another server's build;
        False as soon as that build is ready: its own sandbox holds the lock shared for as long as it lives."""
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if (self.dir / f"{key}.json").exists():
                    return False
                if time.monotonic() > deadline:
                    raise TimeoutError("another server has been preparing this environment for too long") from None
                await asyncio.sleep(0.2)

    async def evict(self, keep: str | None = None) -> list[str]:
        """Remove the least recently used environments nobody holds until the cache fits its bound."""
        entries = []
        for meta_path in self.dir.glob("*.json") if self.dir.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                entries.append((meta_path.stat().st_mtime, meta_path.stem,
                                int(json.loads(meta_path.read_text()).get("size_bytes", 0))))
        total = sum(size for _, _, size in entries)
        evicted = []
        for _, key, size in sorted(entries):
            if total <= self.cache_bytes:
                break
            if key == keep:
                continue
            fd = self._open_lock(key)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use
            else:
                await self._remove(key)
                total -= size
                evicted.append(key)
            finally:
                os.close(fd)
        return evicted

    async def _remove(self, key: str) -> None:
        log.info("evicting environment %s", key)
        (self.dir / f"{key}.json").unlink(missing_ok=True)
        path = self.dir / key
        if path.exists():
            await volume.unmount_under(path)
            await run_tool("rm", "-rf", "--one-file-system", "--", str(path))
        (self.dir / f"{key}.img").unlink(missing_ok=True)


async def _mount_read_only(image: Path, path: Path) -> None:
    # noload: a read-only mount replays nothing; nosuid, nodev: nothing in it is a way up.
    await run_tool("mount", "-o", "loop,ro,noload,nosuid,nodev,noatime", str(image), str(path))



