"""Cloning a repository on the host, outside any jail, before a sandbox first runs anything in it."""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .base import SandboxError

CLONE_TIMEOUT_S = 300
_REF = re.compile(r"^(?!-)(?!.*\.\.)[A-Za-z0-9._/@+-]{1,250}$")
_OWNER_NAME = re.compile(r"^[A-Za-z0-9-]{1,39}/[A-Za-z0-9._-]{1,100}$")
# Host git reads no user or system config, and never prompts.
GIT_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": "/nonexistent",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "/bin/false",
    "LC_ALL": "C",
}


@dataclass
class Cloned:
    base_commit: str
    default_branch: str


def source_of(repo_url: str) -> tuple[str, bool]:
    """The clone source for `repo_url` and whether it is local; refuses forms we cannot clone safely."""
    repo_url = repo_url.strip()
    if not repo_url:
        raise SandboxError("repo_url is empty: give an https URL, owner/name, a file:// URL or an absolute path")
    if len(repo_url) > 2048:
        raise SandboxError("repo_url is longer than 2048 characters")
    if _OWNER_NAME.match(repo_url):
        return f"https://github.com/{repo_url}.git", False
    if repo_url.startswith("/") or repo_url.startswith("file://"):
        path = Path(urlsplit(repo_url).path if repo_url.startswith("file://") else repo_url)
        if not path.is_absolute():
            raise SandboxError(f"{repo_url!r} is not an absolute path")
        if not (path / ".git").exists() and not (path / "HEAD").is_file():
            raise SandboxError(f"{str(path)!r} is not a git repository (no .git and not a bare repository)")
        return str(path), True
    parts = urlsplit(repo_url)
    if parts.scheme != "https" or not parts.hostname:
        raise SandboxError(
            f"cannot clone {repo_url!r}: use an https:// URL, owner/name, a file:// URL or an absolute local path"
        )
    if parts.username or parts.password:
        raise SandboxError("repo_url must not carry credentials; sandboxes clone public or locally reachable "
                           "repositories")
    return repo_url, False


def refuse_under(repo_url: str, root: Path) -> None:
    """Refuse to clone from inside the sandbox root: another sandbox's repository is not a source."""
    source, local = source_of(repo_url)
    if local:
        real, top = Path(source).resolve(), root.resolve()
        if real == top or top in real.parents:
            raise SandboxError("repo_url points inside the sandbox directory; clone the original repository instead")


async def git(*args: str, cwd: Path | None = None, timeout: float = CLONE_TIMEOUT_S) -> str:
    """Run host git with a clean environment; a `SandboxError` carries its stderr."""
    proc = await asyncio.create_subprocess_exec(
        "git", *args, cwd=cwd, env=GIT_ENV, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise SandboxError(f"git {args[0]} took longer than {timeout:g} s") from None
    if proc.returncode != 0:
        raise SandboxError(f"git {args[0]} failed: {err.decode('utf-8', 'replace').strip()[-800:]}")
    return out.decode("utf-8", "replace").strip()


async def clone(repo_url: str, ref: str | None, dest: Path) -> Cloned:
    """Clone `repo_url` into `dest` and check out `ref` (a branch, tag or commit; the default branch if None)."""
    if ref is not None and not _REF.match(ref):
        raise SandboxError(f"ref {ref!r} is not a branch, tag or commit name")
    source, local = source_of(repo_url)
    # Local clones copy objects rather than hard-linking them: the sandbox must not share inodes with the source.
    args = (["clone", "--quiet", "--no-hardlinks"] if local
            else ["clone", "--quiet", "--depth", "1", "--no-single-branch"])
    if ref and not local and not re.fullmatch(r"[0-9a-f]{7,40}", ref):
        args += ["--branch", ref]
        ref = None
    # Only the transports we mean to use, whatever a redirect or a submodule asks for.
    protocols = ["-c", "protocol.allow=never", "-c", "protocol.file.allow=always", "-c", "protocol.https.allow=always"]
    await git(*protocols, *args, "--", source, str(dest))
    if ref:
        if not local:
            await git(*protocols, "fetch", "--quiet", "--depth", "1", "origin", ref, cwd=dest)
            ref = "FETCH_HEAD"
        await git("checkout", "--quiet", ref, "--", cwd=dest)
    base = await git("rev-parse", "--verify", "HEAD^{commit}", cwd=dest)
    try:
        default = (await git("symbolic-ref", "--short", "refs/remotes/origin/HEAD", cwd=dest)).removeprefix("origin/")
    except SandboxError:
        default = await git("rev-parse", "--abbrev-ref", "HEAD", cwd=dest)
    return Cloned(base_commit=base, default_branch=default)
