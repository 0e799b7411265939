"""Cloning a repository on the host, outside any jail, before a sandbox first runs anything in it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from common import repos
from common.git import UnsafeRepository, check_self_contained, git_dirs, host_git_env

from .base import SandboxError
from .system import run_tool

CLONE_TIMEOUT_S = 300
_REF = re.compile(r"^(?!-)(?!.*\.\.)[A-Za-z0-9._/@+-]{1,250}$")
# Only the transports we mean to use, whatever a redirect, a submodule or the source's config asks for.
GIT_ENV = host_git_env(protocols=("file", "https"))


@dataclass
class Cloned:
    base_commit: str
    default_branch: str


def source_of(repo_url: str) -> tuple[str, bool]:
    """The clone source for `repo_url` and whether it is local; refuses forms we cannot clone safely."""
    try:
        ref = repos.parse(repo_url)
    except repos.RepoError as exc:
        raise SandboxError(str(exc)) from None
    if ref.kind == "local":
        path = ref.path
        if not (path / ".git").exists() and not (path / "HEAD").is_file():
            raise SandboxError(f"{str(path)!r} is not a git repository (no .git and not a bare repository)")
    return ref.clone_url, ref.kind == "local"


def refuse_under(repo_url: str, root: Path) -> None:
    """Refuse to clone from inside the sandbox root: another sandbox's repository is not a source."""
    source, local = source_of(repo_url)
    if local:
        real, top = Path(source).resolve(), root.resolve()
        if real == top or top in real.parents:
            raise SandboxError("repo_url points inside the sandbox directory; clone the original repository instead")


async def git(*args: str, cwd: Path | None = None, timeout: float = CLONE_TIMEOUT_S) -> str:
    """Run host git with a clean environment; a `SandboxError` carries its stderr."""
    return await run_tool("git", *args, cwd=cwd, env=GIT_ENV, timeout=timeout, what=f"git {args[0]}")


def refuse_borrowed_objects(path: Path, name: str) -> None:
    """Refuse a local repository whose objects git would read from another repository (alternates)."""
    # That other repository may be one the caller cannot read; its files would land in the sandbox.
    try:
        dirs = git_dirs(path)
        if dirs is not None:
            check_self_contained(dirs[1], name)
    except UnsafeRepository as exc:
        raise SandboxError(str(exc)) from None


async def clone(repo_url: str, ref: str | None, dest: Path) -> Cloned:
    """Clone `repo_url` into `dest` and check out `ref` (a branch, tag or commit; the default branch if None)."""
    if ref is not None and not _REF.match(ref):
        raise SandboxError(f"ref {ref!r} is not a branch, tag or commit name")
    source, local = source_of(repo_url)
    if local:
        refuse_borrowed_objects(Path(source), source)
    # Local clones copy objects rather than hard-linking them: the sandbox must not share inodes with the source.
    # Nothing is checked out before the copy is known to hold every object it uses.
    args = (["clone", "--quiet", "--no-hardlinks", "--no-checkout"] if local
            else ["clone", "--quiet", "--depth", "1", "--no-single-branch"])
    if ref and not local and not re.fullmatch(r"[0-9a-f]{7,40}", ref):
        args += ["--branch", ref]
        ref = None
    await git(*args, "--", source, str(dest))
    if local:
        # The copy is what git reads from now on, and the source may have changed since it was checked.
        refuse_borrowed_objects(dest, source)
        await git("checkout", "--quiet", "--force", ref or "HEAD", "--", cwd=dest)
    elif ref:
        await git("fetch", "--quiet", "--depth", "1", "origin", ref, cwd=dest)
        await git("checkout", "--quiet", "FETCH_HEAD", "--", cwd=dest)
    base = await git("rev-parse", "--verify", "HEAD^{commit}", cwd=dest)
    try:
        default = (await git("symbolic-ref", "--short", "refs/remotes/origin/HEAD", cwd=dest)).removeprefix("origin/")
    except SandboxError:
        default = await git("rev-parse", "--abbrev-ref", "HEAD", cwd=dest)
    return Cloned(base_commit=base, default_branch=default)
