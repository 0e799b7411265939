"""A file system of its own for each sandbox's repository: an ext4 image, sparse, mounted through a loop device, so
the kernel caps the disk a sandbox can fill however many commands write at once.

Needs root, `mkfs.ext4` and loop devices; `unavailable` says why not where they are missing, and the repository
then sits on the sandbox root's own file system with only the per-file size limit (the README says so).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from .base import SandboxError

# No journal (nothing to recover: the volume dies with its sandbox), few block-group copies, lazily zeroed tables,
# an inode per 16 KiB (node_modules-like trees are many small files): a few milliseconds to make.
MKFS = ["-q", "-F", "-O", "^has_journal,^resize_inode", "-G", "64", "-i", "16384", "-m", "0",
        "-E", "lazy_itable_init=1,nodiscard"]
TIMEOUT_S = 60


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


async def _tool(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise SandboxError(f"{argv[0]} took longer than {TIMEOUT_S} s") from None
    if proc.returncode != 0:
        raise SandboxError(f"{argv[0]} failed: {err.decode('utf-8', 'replace').strip()[-500:]}")


async def make(home: Path, size_mib: int) -> Path:
    """A fresh file system of `size_mib` mounted at `home`/volume, its image beside it; the mount point."""
    image, point = home / "volume.img", home / "volume"
    with open(image, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.truncate(size_mib * 1024 * 1024)
    await _tool("mkfs.ext4", *MKFS, str(image))
    point.mkdir(mode=0o711)
    # nosuid and nodev: nothing the sandbox plants in its volume is a way up or a device.
    await _tool("mount", "-o", "loop,nosuid,nodev,noatime", str(image), str(point))
    point.chmod(0o711)
    return point


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(path) or point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


async def unmount_under(path: Path) -> None:
    """Unmount every volume at or below `path` (their loop devices go with them)."""
    for point in mounts_under(path):
        try:
            await _tool("umount", point)
        except SandboxError:  # still busy: detach it now, the kernel frees it when the last user lets go
            await _tool("umount", "--lazy", point)
