"""Host commands the sandbox server runs as itself (git, coreutils, mount, mkfs): bounded, and failing with their
stderr."""

from __future__ import annotations

import asyncio
from pathlib import Path

from .base import SandboxError

TIMEOUT_S = 300


async def run_tool(*argv: str, timeout: float = TIMEOUT_S, cwd: Path | None = None,
                   env: dict[str, str] | None = None, what: str | None = None) -> str:
    """Run a host command (coreutils walk any depth of tree without recursion limits) and return its stdout; a
    `SandboxError` names it (`what`, by default its program) and carries its stderr."""
    what = what or argv[0]
    proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise SandboxError(f"{what} took longer than {timeout:g} s") from None
    if proc.returncode != 0:
        raise SandboxError(f"{what} failed: {err.decode('utf-8', 'replace').strip()[-800:]}")
    return out.decode("utf-8", "replace").strip()
