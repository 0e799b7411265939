"""The local forge: a git repository on this machine, bare or not, written with plumbing only.

Commits are built in a temporary index and land with `update-ref` against the expected old value, so a checked-out
working tree, its index and its current branch are never touched. Pull requests are JSON records under the
repository's git directory (`tiny-backspace/pulls/<n>.json`).
"""

from __future__ import annotations

import asyncio
import datetime
import fcntl
import json
import os
import tempfile
from pathlib import Path

from common import repos
from common.git import UnsafeRepository, check_self_contained, git_dirs, host_git_env, named_settings

from .forge import (BranchRef, Changeset, CommitResult, ForgeError, Issue, PullRequest, RepositoryInfo,
                    check_branch_name, check_message, check_sha, check_writable_branch, commit_parent,
                    decode_changeset, nothing_to_commit, refuse_workflow_changes)

GIT_TIMEOUT_S = 120
AUTHOR = {"GIT_AUTHOR_NAME": "Tiny Backspace", "GIT_AUTHOR_EMAIL": "tiny-backspace@localhost",
          "GIT_COMMITTER_NAME": "Tiny Backspace", "GIT_COMMITTER_EMAIL": "tiny-backspace@localhost"}


def local_path(repo: str) -> Path | None:
    """The path `repo` names when it is an absolute path or a file:// URL; None for any other form."""
    if not repo.strip().startswith(("/", "file://")):
        return None
    try:
        return repos.parse(repo).path
    except repos.RepoError as exc:
        raise ForgeError(str(exc)) from None


class LocalForge:
    """A git repository on this machine."""

    def __init__(self, path: Path, branch_prefix: str, allow_workflow_changes: bool = False) -> None:
        self.path = Path(os.path.normpath(path))
        self.prefix = branch_prefix
        self.allow_workflow_changes = allow_workflow_changes
        self._git_dir: Path | None = None
        self._common_dir: Path | None = None
        self._env: dict[str, str] = {}

    async def _git(self, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None,
                   check: bool = True) -> str:
        """Run git on this repository's git directory; a `ForgeError` carries its stderr."""
        code, out, err = await self._run(*args, stdin=stdin, env=env)
        if check and code != 0:
            raise ForgeError(f"git {args[0]} failed: {err.strip()[-800:]}")
        return out.strip() if code == 0 else ""

    async def _ok(self, *args: str) -> bool:
        """Whether git succeeds with these arguments."""
        return (await self._run(*args))[0] == 0

    async def _run(self, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
                   ) -> tuple[int, str, str]:
        git_dir = await self._dirs()
        proc = await asyncio.create_subprocess_exec(
            "git", *args, cwd=git_dir, env=self._env | (env or {}),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(GIT_TIMEOUT_S):
                out, err = await proc.communicate(stdin)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ForgeError(f"git {args[0]} took longer than {GIT_TIMEOUT_S} s") from None
        assert proc.returncode is not None
        return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    async def _dirs(self) -> Path:
        """The git directory, once the repository proved safe to run host git on."""
        if self._git_dir is None:
            try:
                dirs = git_dirs(self.path)
                if dirs is None:
                    raise ForgeError(f"{str(self.path)!r} is not a git repository (no .git and not a bare "
                                     "repository)")
                check_self_contained(dirs[1], str(self.path))
                settings = await named_settings(*dirs)
            except UnsafeRepository as exc:
                raise ForgeError(str(exc)) from None
            self._env = host_git_env(settings) | AUTHOR | {"GIT_DIR": str(dirs[0])}
            self._git_dir, self._common_dir = dirs
        return self._git_dir

    async def _branch_sha(self, branch: str) -> str | None:
        out = await self._git("rev-parse", "--verify", "-q", f"refs/heads/{branch}^{{commit}}", check=False)
        return out or None

    async def _default_branch(self) -> str:
        head = await self._git("symbolic-ref", "-q", "HEAD", check=False)
        return head.removeprefix("refs/heads/") if head else "main"

    async def _protected(self) -> list[str]:
        """The default branch and every branch a worktree has checked out."""
        listing = await self._git("worktree", "list", "--porcelain")
        checked_out = [line.removeprefix("branch refs/heads/") for line in listing.splitlines()
                       if line.startswith("branch refs/heads/")]
        return [await self._default_branch(), *checked_out]

    async def get_repository(self) -> RepositoryInfo:
        """Describe the repository: its default branch and where to clone it from."""
        git_dir = await self._dirs()
        return RepositoryInfo(repo=str(self.path), forge="local", default_branch=await self._default_branch(),
                              can_push=os.access(git_dir, os.W_OK), clone_url=self.path.as_uri(),
                              branch_prefix=self.prefix)

    async def create_branch(self, branch: str, from_sha: str) -> BranchRef:
        """Create `branch` at `from_sha`; succeed without change when it is already there."""
        check_writable_branch(branch, self.prefix, *await self._protected())
        sha = check_sha(from_sha)
        if not await self._git("rev-parse", "--verify", "-q", f"{sha}^{{commit}}", check=False):
            raise ForgeError(f"commit {sha} is not in {self.path}; branch from a commit the repository has")
        ref = f"refs/heads/{branch}"
        # An empty old value makes update-ref fail if the ref exists: create, never move.
        created = await self._ok("update-ref", "-m", "tiny-backspace: create_branch", ref, sha, "")
        current = await self._branch_sha(branch)
        if current != sha:
            if current is None:
                raise ForgeError(f"could not create branch {branch!r}: a branch named like a parent or child of it "
                                 "may exist; choose another name")
            raise ForgeError(f"branch {branch!r} already exists at {current}, not at {sha}; "
                             "choose a new branch name")
        return BranchRef(ref=ref, sha=sha, repo=str(self.path), created=created)

    async def commit_changes(self, branch: str, message: str, changes: Changeset) -> CommitResult:
        """Commit the base commit's tree with the changes on `branch`: on top of the changeset's parent, which must
        be the branch's tip; without one, the branch must still be at the base commit, or is made at the new
        commit when it does not exist yet."""
        check_writable_branch(branch, self.prefix, *await self._protected())
        check_message(message)
        decoded = decode_changeset(changes)
        if not self.allow_workflow_changes:
            refuse_workflow_changes(decoded)
        base = decoded.base_commit
        tip = await self._branch_sha(branch)
        parent = commit_parent(branch, tip, decoded)
        with tempfile.TemporaryDirectory(prefix="tb-commit-") as tmp:
            index = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            # On the base commit's tree, not the parent's: what the branch held before does not carry over.
            await self._git("read-tree", base, env=index)
            blobs = []
            for i, (_, _, content) in enumerate(decoded.files):
                blob = Path(tmp) / f"blob{i}"
                blob.write_bytes(content)
                blobs.append(str(blob))
            shas = (await self._git("hash-object", "-w", "--no-filters", "--stdin-paths",
                                    stdin="".join(f"{b}\n" for b in blobs).encode())).split() if blobs else []
            zero = "0" * len(base)
            info = b"".join(f"{mode} {sha}\t{path}".encode() + b"\0"
                            for (path, mode, _), sha in zip(decoded.files, shas))
            info += b"".join(f"0 {zero}\t{path}".encode() + b"\0" for path in decoded.deleted)
            if info:
                await self._git("update-index", "-z", "--index-info", stdin=info, env=index)
            tree = await self._git("write-tree", env=index)
        if tree == await self._git("rev-parse", f"{parent}^{{tree}}"):
            raise nothing_to_commit(branch, parent, base)
        commit = await self._git("commit-tree", "--no-gpg-sign", tree, "-p", parent, "-F", "-",
                                 stdin=message.encode())
        # A missing branch is made only now, at the new commit: a changeset refused above leaves nothing behind.
        if not await self._ok("update-ref", "-m", "tiny-backspace: commit_changes", f"refs/heads/{branch}",
                              commit, parent if tip is not None else zero):
            raise ForgeError(f"branch {branch!r} moved while committing; export the changes again and retry")
        return CommitResult(sha=commit, branch=branch, parent=parent, files_written=len(decoded.files),
                            files_deleted=len(decoded.deleted))

    async def open_pull_request(self, head: str, base: str | None, title: str, body: str,
                                draft: bool) -> PullRequest:
        """Record a pull request from `head` into `base`, or return the open one `head` already has."""
        check_branch_name(head)
        base = base or await self._default_branch()
        check_branch_name(base)
        if not title.strip():
            raise ForgeError("the pull request title is empty; say what the change does")
        if await self._branch_sha(base) is None:
            raise ForgeError(f"base branch {base!r} does not exist in {self.path}")
        head_sha = await self._branch_sha(head)
        if head_sha is None:
            raise ForgeError(f"head branch {head!r} does not exist; create_branch and commit_changes first")
        if head == base or await self._ok("merge-base", "--is-ancestor", head_sha, f"refs/heads/{base}"):
            raise ForgeError(f"there are no commits on {head!r} that {base!r} lacks; commit changes first")
        await self._dirs()
        record = {"number": 0, "head": head, "base": base, "title": title, "body": body, "draft": draft,
                  "state": "open", "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        return await asyncio.to_thread(self._record_pull, record)

    @property
    def _pulls_dir(self) -> Path:
        assert self._common_dir is not None
        return self._common_dir / "tiny-backspace" / "pulls"

    def _record_pull(self, record: dict) -> PullRequest:
        self._pulls_dir.mkdir(parents=True, exist_ok=True)
        with open(self._pulls_dir / ".lock", "w") as lock:
            # Two servers opening the same head at once must still yield one record.
            fcntl.flock(lock, fcntl.LOCK_EX)
            pulls = self._read_pulls()
            for pr in pulls:
                if pr.head == record["head"] and pr.state == "open":
                    return pr.model_copy(update={"existing": True})
            record["number"] = max((pr.number for pr in pulls), default=0) + 1
            path = self._pulls_dir / f"{record['number']}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            os.replace(tmp, path)
        return self._as_pull(record)

    def _as_pull(self, record: dict) -> PullRequest:
        url = (self._pulls_dir / f"{record['number']}.json").as_uri()
        return PullRequest(url=url, **{k: record[k] for k in ("number", "head", "base", "title", "body", "draft",
                                                              "state", "created_at")})

    def _read_pulls(self) -> list[PullRequest]:
        found = []
        for path in self._pulls_dir.glob("*.json") if self._pulls_dir.is_dir() else []:
            found.append(self._as_pull(json.loads(path.read_text())))
        return sorted(found, key=lambda pr: pr.number)

    async def list_pull_requests(self, head: str | None) -> list[PullRequest]:
        """The recorded pull requests, those from `head` only when it is given."""
        await self._dirs()
        pulls = await asyncio.to_thread(self._read_pulls)
        return [pr for pr in pulls if head is None or pr.head == head]

    async def get_issue(self, number: int) -> Issue:
        """Local repositories have no issue tracker."""
        raise ForgeError(f"{self.path} is a local repository and has no issues; put the task in the prompt instead")
