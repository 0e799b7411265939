"""A file system of its own for each sandbox's repository, so the kernel caps the disk a sandbox can fill however
many commands write at once.

On a disk: an ext4 image with its whole size reserved (`fallocate`), loop-mounted, so a sandbox can never take
space that another sandbox or the host was counting on; a create that does not fit fails up front. With the sandbox
root on a tmpfs: a tmpfs of that size, whose pages count against the memory budget of whoever writes them, the
sandbox's cgroup for everything the sandbox writes. Needs root (and for images `mkfs.ext4` and loop devices);
`unavailable` says why not where they are missing, and the repository then sits on the sandbox root's own file
system with only the per-file size limit (the README says so).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import re
import shutil
import time
from pathlib import Path

from .base import SandboxError
from .system import run_tool

# No journal (nothing to recover: the volume dies with its sandbox), few block-group copies, lazily zeroed tables,
# an inode per 16 KiB (node_modules-like trees are many small files): a few milliseconds to make.
MKFS = ["-q", "-F", "-O", "^has_journal,^resize_inode", "-G", "64", "-i", "16384", "-m", "0",
        "-E", "lazy_itable_init=1,nodiscard"]
TIMEOUT_S = 60
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_ESCAPE = re.compile(r"\\([0-7]{3})")


class NoRoom(SandboxError):
    """The volume does not fit where sandboxes live; another create may, once a sandbox is gone."""


def unavailable() -> str | None:
    """Why sandboxes cannot get a volume of their own here; None when they can."""
    if os.geteuid() != 0:
        return "the sandbox server does not run as root, so it cannot mount a volume per sandbox"
    missing = [tool for tool in ("mkfs.ext4", "mount", "umount") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (apt-get install e2fsprogs mount)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control is missing)"
    return None


async def make(home: Path, size_mib: int) -> Path:
    """A fresh file system of `size_mib` mounted at `home`/volume; the mount point."""
    point = home / "volume"
    point.mkdir(mode=0o711)
    if fs_type(home) == "tmpfs":
        await run_tool("mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0711,nosuid,nodev", "tmpfs", str(point),
                       timeout=TIMEOUT_S)
        return point
    image = home / "volume.img"
    with open(image, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        _reserve(f.fileno(), size_mib * 1024 * 1024, home)
    await run_tool("mkfs.ext4", *MKFS, str(image), timeout=TIMEOUT_S)
    # nosuid and nodev: nothing the sandbox plants in its volume is a way up or a device.
    await run_tool("mount", "-o", "loop,nosuid,nodev,noatime", str(image), str(point), timeout=TIMEOUT_S)
    point.chmod(0o711)
    return point


def _reserve(fd: int, size: int, where: Path) -> None:
    """Give the image all its blocks now (without writing them), so that its sandbox never finds the disk full
    because others filled it; a file system without fallocate gets a sparse image and a check of its free space."""
    if _libc.fallocate(fd, 0, 0, size) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        if err in (errno.ENOSPC, errno.EFBIG):
            free = os.statvfs(where)
            raise NoRoom(f"no room for a {size >> 20} MiB volume under {where.parent.parent} ("
                         f"{free.f_bavail * free.f_frsize >> 20} MiB free): destroy sandboxes, free disk space, or "
                         "lower SANDBOX_DISK_MIB")
        raise OSError(err, os.strerror(err), str(where))
    free = os.statvfs(where)
    if free.f_bavail * free.f_frsize < size:
        raise NoRoom(f"no room for a {size >> 20} MiB volume under {where.parent.parent}: free disk space, or lower "
                     "SANDBOX_DISK_MIB")
    os.ftruncate(fd, size)


def _mountinfo(with_source: bool = False) -> list[tuple[str, ...]]:
    """(mount point, file system type[, source]) of every mount, in the order the kernel lists them."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = _ESCAPE.sub(lambda m: chr(int(m[1], 8)), left.split()[4])
            found.append((point, *right.split()[:2]) if with_source else (point, right.split()[0]))
    return found


async def unmount_image(point: Path, image: Path, timeout: float = TIMEOUT_S) -> None:
    """Unmount the volume at `point` and wait until its file system has really let go of `image`.

    `umount` returns once this namespace's mount is gone, but a jail that ended a moment ago may still hold a copy
    of it in a mount namespace the kernel has yet to tear down; the file system lives on until then, and writes its
    superblock back over whatever was done to the image meanwhile.
    """
    device = next((source for mounted, _, source in _mountinfo(with_source=True) if mounted == str(point)), None)
    await run_tool("umount", str(point), timeout=timeout)
    if device is None or not device.startswith("/dev/loop"):
        return
    backing = Path("/sys/block") / Path(device).name / "loop" / "backing_file"
    deadline = time.monotonic() + timeout
    while True:
        try:
            held = backing.read_text().strip() == str(image)
        except OSError:  # the loop device was detached
            return
        if not held:
            return
        if time.monotonic() > deadline:
            raise SandboxError(f"{image} stayed in use for {timeout:g} s after it was unmounted")
        await asyncio.sleep(0.01)


def fs_type(path: Path) -> str:
    """The type of the file system `path` is on."""
    best, kind = "", ""
    for point, fstype in _mountinfo():
        if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    prefix = str(path).rstrip("/") + "/"
    found = [point for point, _ in _mountinfo() if point == str(path) or point.startswith(prefix)]
    return sorted(found, key=len, reverse=True)


async def unmount_under(path: Path) -> None:
    """Unmount every volume at or below `path` (their loop devices go with them)."""
    for point in mounts_under(path):
        try:
            await run_tool("umount", point, timeout=TIMEOUT_S)
        except SandboxError:  # still busy: detach it now, the kernel frees it when the last user lets go
            await run_tool("umount", "--lazy", point, timeout=TIMEOUT_S)
