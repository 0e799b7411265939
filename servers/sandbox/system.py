"""Host commands the sandbox server runs as itself (coreutils, mount, mkfs): bounded, and failing with their stderr."""

from __future__ import annotations

import asyncio

from .base import SandboxError

TIMEOUT_S = 300


async def run_tool(*argv: str, timeout: float = TIMEOUT_S) -> None:
    """Run a host command (coreutils walk any depth of tree without recursion limits); fail with its stderr."""
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise SandboxError(f"{argv[0]} took longer than {timeout:g} s") from None
    if proc.returncode != 0:
        raise SandboxError(f"{argv[0]} failed: {err.decode('utf-8', 'replace').strip()[-500:]}")
