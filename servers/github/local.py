"""The local forge: a git repository on this machine, bare or not, written with plumbing only.

Commits are built in a temporary index and land with `update-ref` against the expected old value, so a checked-out
working tree, its index and its current branch are never touched. Pull requests are JSON records under the
repository's git directory (`tiny-backspace/pulls/<n>.json`), with their comments: the conversation's
(`comments`) and those on lines of files (`review_comments`, a reply naming its thread's first comment in
`in_reply_to`). A comment this server wrote is `ours`; comment ids are unique in the repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from common import repos
from common.git import UnsafeRepository, check_self_contained, git_dirs, host_git_env, named_settings
from common.untrusted import clean

from .forge import (MAX_DIFF_BYTES, BranchRef, Changeset, Comment, CommitResult, ForgeError, Issue, Permission,
                    PullRequest, PullRequestDetail, RepositoryInfo, ReviewThread, check_branch_name,
                    check_comment_body, check_message, check_path, check_sha, check_writable_branch, commit_parent,
                    decode_changeset, nothing_to_commit, refuse_workflow_changes)

GIT_TIMEOUT_S = 120
AUTHOR = {"GIT_AUTHOR_NAME": "Tiny Backspace", "GIT_AUTHOR_EMAIL": "tiny-backspace@localhost",
          "GIT_COMMITTER_NAME": "Tiny Backspace", "GIT_COMMITTER_EMAIL": "tiny-backspace@localhost"}
OURS_AUTHOR = "tiny-backspace"  # the author of the comments this server writes
PERSON = "local"  # the author of a person's comment (add_review_comment)


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
                              branch_prefix=self.prefix, writes_to=str(self.path))

    async def create_branch(self, branch: str, from_sha: str) -> BranchRef:
        """Create `branch` at `from_sha`; succeed without change when it is already there."""
        check_writable_branch(branch, self.prefix, *await self._protected())
        sha = check_sha(from_sha)
        if not await self._git("rev-parse", "--verify", "-q", f"{sha}^{{commit}}", check=False):
            raise ForgeError(f"commit {sha} is not in {self.path}; branch from a commit the repository has")
        ref = f"refs/heads/{branch}"
        # An empty old value makes update-ref fail if the ref exists: create, never move.
        created = await self._ok("update-ref", "--no-deref", "-m", "tiny-backspace: create_branch", ref, sha, "")
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
        # --no-deref: a branch that is a symbolic ref to another (main, say) becomes a branch of its own, main stays.
        if not await self._ok("update-ref", "--no-deref", "-m", "tiny-backspace: commit_changes",
                              f"refs/heads/{branch}", commit, parent if tip is not None else zero):
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
                  "state": "open", "created_at": now(), "head_sha": head_sha, "comments": [], "review_comments": []}
        return await asyncio.to_thread(self._record_pull, record)

    @property
    def _pulls_dir(self) -> Path:
        assert self._common_dir is not None
        return self._common_dir / "tiny-backspace" / "pulls"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the records' lock: two servers writing records at once must not lose each other's writes."""
        self._pulls_dir.mkdir(parents=True, exist_ok=True)
        with open(self._pulls_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _record_pull(self, record: dict) -> PullRequest:
        with self._locked():
            # Two servers opening the same head at once must still yield one record.
            records = self._records()
            for old in records:
                if old["head"] == record["head"] and old["state"] == "open":
                    return self._as_pull(old).model_copy(update={"existing": True})
            record["number"] = max((old["number"] for old in records), default=0) + 1
            self._write(record)
        return self._as_pull(record)

    def _records(self) -> list[dict]:
        """Every pull request record, by number; records written before comments existed load as without any."""
        paths = self._pulls_dir.glob("*.json") if self._pulls_dir.is_dir() else []
        return sorted((json.loads(path.read_text()) for path in paths), key=lambda record: record["number"])

    def _record(self, number: int) -> dict:
        try:
            return json.loads((self._pulls_dir / f"{int(number)}.json").read_text())
        except FileNotFoundError:
            raise ForgeError(f"pull request #{number} does not exist in {self.path}; list_pull_requests shows "
                             "the ones it has (a local repository has no issues)") from None

    def _write(self, record: dict) -> None:
        """Replace the record at once: a reader sees the old one or the new one, never half of either."""
        path = self._pulls_dir / f"{record['number']}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)

    def _url(self, record: dict) -> str:
        return (self._pulls_dir / f"{record['number']}.json").as_uri()

    def _as_pull(self, record: dict) -> PullRequest:
        return PullRequest(url=self._url(record), title=clean(record["title"]), body=clean(record["body"]),
                           **{k: record[k] for k in ("number", "head", "base", "draft", "state", "created_at")})

    def _as_comment(self, record: dict, comment: dict) -> Comment:
        return Comment(id=comment["id"], author=comment.get("author"), body=clean(comment["body"]),
                       created_at=comment["created_at"], url=f"{self._url(record)}#comment-{comment['id']}",
                       ours=bool(comment.get("ours")))

    def _threads(self, record: dict) -> list[ReviewThread]:
        """The review comments as threads: each first comment with the replies under it, in the order written."""
        comments = record.get("review_comments", [])
        threads = []
        for root in (c for c in comments if c.get("in_reply_to") is None):
            first = self._as_comment(record, root)
            replies = [self._as_comment(record, c) for c in comments if c.get("in_reply_to") == root["id"]]
            threads.append(ReviewThread(id=first.id, path=root["path"], line=root.get("line"), author=first.author,
                                        body=first.body, created_at=first.created_at, url=first.url,
                                        replies=replies, addressed=(replies or [first])[-1].ours))
        return threads

    async def list_pull_requests(self, head: str | None, state: Literal["open", "closed", "all"] = "open"
                                 ) -> list[PullRequest]:
        """The recorded pull requests in `state`, those from `head` only when it is given."""
        if state not in ("open", "closed", "all"):
            raise ForgeError(f"state must be 'open', 'closed' or 'all', not {state!r}")
        await self._dirs()
        records = await asyncio.to_thread(self._records)
        return [self._as_pull(record) for record in records
                if (head is None or record["head"] == head) and state in ("all", record["state"])]

    async def get_pull_request(self, number: int, diff: bool = False) -> PullRequestDetail:
        """A recorded pull request with its comments and review threads, and its diff against the base when
        `diff`."""
        await self._dirs()
        record = await asyncio.to_thread(self._record, number)
        head, base = record["head"], record["base"]
        # A deleted head branch leaves the record the tip it had.
        head_sha = await self._branch_sha(head) or record.get("head_sha")
        if head_sha is None:
            raise ForgeError(f"the head branch {head!r} of pull request #{number} no longer exists in {self.path}")
        base_tip = await self._branch_sha(base)
        if base_tip is None:
            raise ForgeError(f"the base branch {base!r} of pull request #{number} no longer exists in {self.path}; "
                             "the pull request cannot be compared with it")
        base_sha = await self._git("merge-base", base_tip, head_sha, check=False)
        if not base_sha:
            raise ForgeError(f"{head!r} and {base!r} have no commit in common; pull request #{number} cannot be "
                             "compared with its base")
        pull = self._as_pull(record)
        return PullRequestDetail(
            **pull.model_dump(), head_sha=head_sha, head_repo=str(self.path), base_sha=base_sha,
            author=record.get("author"), comments=[self._as_comment(record, c) for c in record.get("comments", [])],
            review_threads=self._threads(record), diff=await self._diff(base_tip, head_sha) if diff else None)

    async def _diff(self, base: str, head: str) -> str:
        """The changes `head` made since it left `base`; no program the repository names runs to show them."""
        text = await self._git("diff", "--no-ext-diff", "--no-textconv", "--no-color", f"{base}...{head}", "--")
        size = len(text.encode())
        if size <= MAX_DIFF_BYTES:
            return text
        cut = text.encode()[:MAX_DIFF_BYTES].decode("utf-8", "ignore")
        return (cut[:cut.rfind("\n") + 1] + f"[the diff is cut at {MAX_DIFF_BYTES} of its {size} bytes; see all of it "
                f"with: git diff {base}...{head}]")

    async def reply_to_review_comment(self, number: int, comment_id: int, body: str) -> Comment:
        """Reply, as this server, in the review thread comment `comment_id` starts."""
        check_comment_body(body)
        await self._dirs()
        return await asyncio.to_thread(self._add, number, "review_comments", comment(body, ours=True), comment_id)

    async def comment_on_issue(self, number: int, body: str) -> Comment:
        """Add a comment, as this server, to a pull request's conversation (a local repository has no issues)."""
        check_comment_body(body)
        await self._dirs()
        return await asyncio.to_thread(self._add, number, "comments", comment(body, ours=True))

    async def add_review_comment(self, number: int, body: str, path: str | None = None,
                                 line: int | None = None) -> Comment:
        """A person's comment on a pull request: on a line of a file when `path` and `line` are given, on a file
        with `path` alone, else in its conversation."""
        check_comment_body(body)
        if line is not None and line < 1:
            raise ForgeError(f"line {line} is not a line number; lines are counted from 1 in the pull request's "
                             "version of the file")
        await self._dirs()
        if path is None:
            if line is not None:
                raise ForgeError("a line needs the path of its file: give path too, or neither to comment on the "
                                 "whole pull request")
            return await asyncio.to_thread(self._add, number, "comments", comment(body, ours=False))
        check_path(path)
        record = await asyncio.to_thread(self._record, number)
        head_sha = await self._branch_sha(record["head"]) or record.get("head_sha")
        tips = [tip for tip in (head_sha, await self._branch_sha(record["base"])) if tip]
        if not [tip for tip in tips if await self._ok("cat-file", "-e", f"{tip}:{path}")]:
            raise ForgeError(f"{path!r} is in neither {record['head']!r} nor {record['base']!r}; comment on a file "
                             f"that pull request #{number} has")
        return await asyncio.to_thread(self._add, number, "review_comments",
                                       comment(body, ours=False) | {"path": path, "line": line, "in_reply_to": None})

    def _add(self, number: int, kind: str, new: dict, reply_to: int | None = None) -> Comment:
        """Add `new` to the `kind` list of pull request `number`, with the repository's next comment id."""
        with self._locked():
            record = self._record(number)
            if reply_to is not None:
                root = next((c for c in record.get("review_comments", []) if c["id"] == reply_to), None)
                if root is None:
                    raise ForgeError(f"pull request #{number} has no review comment {reply_to}; get_pull_request "
                                     "lists its review threads and their ids")
                if root.get("in_reply_to") is not None:
                    raise ForgeError(f"comment {reply_to} is a reply in the thread of comment {root['in_reply_to']}; "
                                     "reply to the thread's first comment")
                new |= {"path": root["path"], "line": root.get("line"), "in_reply_to": reply_to}
            # One counter for both lists and every pull request: an id names one comment in the repository.
            new["id"] = 1 + max((c["id"] for old in self._records()
                                 for c in old.get("comments", []) + old.get("review_comments", [])), default=0)
            record.setdefault(kind, []).append(new)
            self._write(record)
        return self._as_comment(record, new)

    async def edit_issue_comment(self, comment_id: int, body: str) -> Comment:
        """Change the text of a conversation comment this server wrote; any other is refused."""
        check_comment_body(body)
        await self._dirs()
        return await asyncio.to_thread(self._edit, comment_id, body)

    def _edit(self, comment_id: int, body: str) -> Comment:
        with self._locked():
            for record in self._records():
                for old in record.get("comments", []):
                    if old["id"] == comment_id:
                        if not old.get("ours"):
                            raise ForgeError(f"comment {comment_id} on pull request #{record['number']} was written "
                                             f"by {old.get('author') or 'someone else'}, not by Tiny Backspace; "
                                             "only its own comments can be edited")
                        old["body"] = body
                        self._write(record)
                        return self._as_comment(record, old)
                if any(c["id"] == comment_id for c in record.get("review_comments", [])):
                    raise ForgeError(f"comment {comment_id} is a review comment on pull request #{record['number']};"
                                     " only conversation comments can be edited")
        raise ForgeError(f"there is no comment {comment_id} in {self.path}")

    async def get_issue(self, number: int) -> Issue:
        """Local repositories have no issue tracker."""
        raise ForgeError(f"{self.path} is a local repository and has no issues; put the task in the prompt instead")

    async def get_permission(self, user: str) -> Permission:
        """Local repositories have no collaborators."""
        raise ForgeError(f"{self.path} is a local repository and has no collaborators, so {user!r} has no "
                         "permission to read: whoever can write its directory can change it. Permissions exist for "
                         "GitHub repositories only")

    async def delete_branch(self, branch: str) -> bool:
        """Delete a branch inside the prefix, never the default or a checked-out one, and close the open pull
        request recorded for it; False when the branch was already gone."""
        check_writable_branch(branch, self.prefix, *await self._protected())
        ref = f"refs/heads/{branch}"
        sha = await self._git("rev-parse", "--verify", "-q", ref, check=False) or None
        # --no-deref: a branch that is a symbolic ref to another goes alone, never the branch it points to.
        if sha is not None and not await self._ok("update-ref", "--no-deref", "-m", "tiny-backspace: delete_branch",
                                                  "-d", ref, sha):
            raise ForgeError(f"branch {branch!r} moved while it was being deleted; look at it again and retry")
        await asyncio.to_thread(self._close, branch, sha)
        return sha is not None

    def _close(self, head: str, sha: str | None) -> None:
        """Close the open pull requests from `head`, keeping the tip it had when it was deleted."""
        with self._locked():
            for record in self._records():
                if record["head"] == head and record["state"] == "open":
                    self._write(record | {"state": "closed", "head_sha": sha or record.get("head_sha")})


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def comment(body: str, ours: bool) -> dict:
    """A new comment's record: this server's, or a person's."""
    return {"id": 0, "author": OURS_AUTHOR if ours else PERSON, "body": body, "created_at": now(), "ours": ours}
