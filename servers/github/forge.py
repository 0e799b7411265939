"""The `Forge` protocol, the types both forges share, and the checks every write passes first.

Errors:
    ForgeError              the caller can fix it (bad branch, moved branch, unknown repository); becomes `isError`
    └── ForgeUnavailable    the operator must fix it (GITHUB_TOKEN missing or rejected)
"""

from __future__ import annotations

import base64
import binascii
import posixpath
import re
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, Field

from common.changeset import MAX_CHANGESET_BYTES, MAX_ENTRIES, MAX_FILE_BYTES, Changeset
from common.untrusted import OURS

MAX_MESSAGE_CHARS = 65_536
MAX_DIFF_BYTES = 1_000_000  # of a pull request's diff as get_pull_request returns it
MAX_COMMENTS = 1_000  # of each list of comments get_issue and get_pull_request read (10 pages of 100): the newest
# Ends every comment this server writes on GitHub; it counts against GitHub's 65 536 characters of a comment's body.
SIGNATURE = "\n\n" + OURS
MAX_COMMENT_CHARS = 65_536 - len(SIGNATURE)  # of a comment's body as a caller gives it, on either forge
# A GitHub login (letters, digits and hyphens, at most 39 characters; older accounts may have hyphens anywhere but
# first), or an App's bot, `<slug>[bot]`.
LOGIN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9-]{0,38}(?:\[bot\])?$"
LOGIN = re.compile(LOGIN_PATTERN)
_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")


class ForgeError(Exception):
    """A failure the caller can act on; its message says what to do instead."""


class ForgeUnavailable(ForgeError):
    """The forge cannot be used as configured; the operator must fix the environment."""


@dataclass(frozen=True)
class DecodedChanges:
    base_commit: str
    files: list[tuple[str, str, bytes]]
    deleted: list[str]
    parent: str | None = None  # the branch's tip the commit goes on; None: the branch is at base_commit or missing


class RepositoryInfo(BaseModel):
    repo: str = Field(description="The repository as the forge names it: owner/name or an absolute path.")
    forge: Literal["github", "local"]
    default_branch: str
    can_push: bool = Field(description="False when branches and commits go to a fork of the repository instead.")
    clone_url: str
    branch_prefix: str = Field(description="Branches this server writes must start with this prefix.")
    writes_to: str | None = Field(description="Where this server's branches are: the repository itself, or the "
                                              "fork it writes to instead; None while that fork is yet to be made.")


class BranchRef(BaseModel):
    ref: str = Field(description="The full ref name, e.g. refs/heads/tb/fix-typo.")
    sha: str
    repo: str = Field(description="Where the branch lives: the repository itself, or the fork it was pushed to.")
    created: bool = Field(description="False when the branch already pointed at this commit.")


class CommitResult(BaseModel):
    sha: str
    branch: str
    parent: str
    files_written: int
    files_deleted: int


class PullRequest(BaseModel):
    number: int
    url: str
    head: str
    base: str
    title: str
    body: str
    draft: bool
    state: str
    created_at: str
    existing: bool = Field(False, description="True when an open pull request for this head was returned instead "
                                              "of opening a duplicate.")


class Comment(BaseModel):
    """A comment in an issue's or pull request's conversation, or one reply in a review thread."""

    id: int
    author: str | None
    body: str = Field(description="Cleaned: HTML comments and invisible or bidirectional characters removed.")
    created_at: str
    url: str
    ours: bool = Field(False, description="Written by this server (a reply or an answer of Tiny Backspace).")


class ReviewThread(BaseModel):
    """A review comment on a line of a pull request's diff, with the replies under it."""

    id: int = Field(description="The id of the thread's first comment: what reply_to_review_comment takes.")
    path: str
    line: int | None = Field(description="The line in the pull request's head version; None when it is outdated.")
    author: str | None
    body: str
    created_at: str
    url: str
    replies: list[Comment] = Field(default_factory=list)
    addressed: bool = Field(description="True when the thread's last comment is a reply of this server.")


class Issue(BaseModel):
    number: int
    title: str
    body: str
    state: str
    url: str
    labels: list[str]
    author: str | None
    comments: list[Comment] = Field(default_factory=list)
    note: str | None = Field(None, description="Set when the conversation is too long to return whole: what is left "
                                               "out (its oldest comments) and where to read it.")


class PullRequestDetail(PullRequest):
    """One pull request with what a follow-up needs: where its head is, its conversation and review threads."""

    head_sha: str
    head_repo: str = Field(description="Where the head branch lives: this repository, or the fork it comes from.")
    base_sha: str
    author: str | None
    comments: list[Comment] = Field(default_factory=list)
    review_threads: list[ReviewThread] = Field(default_factory=list)
    diff: str | None = Field(None, description="The changes against the base, when asked for (cut when huge).")
    note: str | None = Field(None, description="Set when the conversation or the review comments are too long to "
                                               "return whole: what is left out (the oldest) and where to read it.")


class Permission(BaseModel):
    user: str
    permission: Literal["admin", "maintain", "write", "triage", "read", "none"]
    can_write: bool = Field(description="admin, maintain or write: may push to the repository.")


class Forge(Protocol):
    """One repository on one forge: read it, write branches within the prefix, open pull requests."""

    async def get_repository(self) -> RepositoryInfo: ...
    async def create_branch(self, branch: str, from_sha: str) -> BranchRef: ...
    async def commit_changes(self, branch: str, message: str, changes: Changeset) -> CommitResult:
        """Commit the base commit's tree with the changes on `changes.parent` (the branch's tip), or on the base
        commit when there is no parent; a branch anywhere else is refused as moved, an unchanged tree as nothing
        to commit."""
        ...
    async def open_pull_request(self, head: str, base: str | None, title: str, body: str,
                                draft: bool) -> PullRequest: ...
    async def get_issue(self, number: int) -> Issue:
        """An issue with its conversation, every text cleaned (common.untrusted)."""
        ...
    async def list_pull_requests(self, head: str | None, state: Literal["open", "closed", "all"] = "open"
                                 ) -> list[PullRequest]: ...
    async def get_pull_request(self, number: int, diff: bool) -> PullRequestDetail:
        """A pull request with its conversation and review threads (cleaned), and its diff when `diff`."""
        ...
    async def reply_to_review_comment(self, number: int, comment_id: int, body: str) -> Comment:
        """Reply in the review thread that comment `comment_id` starts, as this server (`ours`)."""
        ...
    async def comment_on_issue(self, number: int, body: str) -> Comment:
        """Add a comment, as this server, to an issue's or a pull request's conversation."""
        ...
    async def edit_issue_comment(self, comment_id: int, body: str) -> Comment:
        """Change a comment this server wrote; any other is refused."""
        ...
    async def add_review_comment(self, number: int, body: str, path: str | None, line: int | None) -> Comment:
        """A person's comment on a local pull request (on a line of a file when `path` and `line` are given).
        GitHub refuses: there people comment on GitHub."""
        ...
    async def get_permission(self, user: str) -> Permission:
        """What `user` may do in the repository (GitHub only)."""
        ...
    async def delete_branch(self, branch: str) -> bool:
        """Delete a branch inside the prefix (never the default or a checked-out one); False when it was absent."""
        ...


def check_branch_name(name: str) -> None:
    """Refuse a branch name git would refuse (the rules of `git check-ref-format --branch`)."""
    problem = _branch_name_problem(name)
    if problem:
        raise ForgeError(f"branch name {name!r} is not valid: {problem}; use something like 'tb/fix-login-typo'")


def _branch_name_problem(name: str) -> str | None:
    if not name or len(name) > 250:
        return "it must be 1 to 250 characters long"
    if name.startswith("-") or name == "@" or name == "HEAD":
        return "it cannot be '@', 'HEAD' or start with '-'"
    if name.startswith("refs/"):
        return "give the short name, without 'refs/'"
    if "@{" in name or ".." in name or "//" in name:
        return "it cannot contain '@{', '..' or '//'"
    if name.startswith("/") or name.endswith("/") or name.endswith("."):
        return "it cannot start or end with '/' or end with '.'"
    if bad := sorted({c for c in name if ord(c) < 0x21 or ord(c) == 0x7F or c in "~^:?*[\\"}):
        return f"it cannot contain {''.join(bad)!r} (spaces, control characters and ~^:?*[\\ are refused)"
    for part in name.split("/"):
        if part.startswith("."):
            return "no part between slashes may start with '.'"
        if part.endswith(".lock"):
            return "no part between slashes may end with '.lock'"
    return None


def check_writable_branch(branch: str, prefix: str, *protected: str) -> None:
    """Refuse to write `branch` unless it is a valid name inside `prefix` and none of the `protected` branches."""
    check_branch_name(branch)
    if branch in protected:
        raise ForgeError(f"refusing to write to {branch!r}, the default or checked-out branch; "
                         f"create a branch such as '{prefix}my-change' instead")
    if not branch.startswith(prefix) or branch == prefix:
        raise ForgeError(f"refusing to write to {branch!r}: this server only writes branches that start with "
                         f"{prefix!r}, e.g. '{prefix}my-change'")


def check_sha(sha: str, what: str = "from_sha") -> str:
    """A full lowercase commit id, or a `ForgeError` asking for one."""
    clean = sha.strip().lower()
    if not _SHA.match(clean):
        raise ForgeError(f"{what} {sha[:80]!r} is not a full commit sha (40 hexadecimal characters)")
    return clean


def check_message(message: str) -> str:
    """A commit message that is not blank and not huge."""
    if not message.strip():
        raise ForgeError("the commit message is empty; say what the change does")
    if len(message) > MAX_MESSAGE_CHARS or "\x00" in message:
        raise ForgeError(f"the commit message must be under {MAX_MESSAGE_CHARS} characters with no NUL byte")
    return message


def check_comment_body(body: str) -> str:
    """A comment that says something, within what GitHub stores once this server's mark is added."""
    if not body.strip():
        raise ForgeError("the comment is empty; write what it should say")
    if len(body) > MAX_COMMENT_CHARS or "\x00" in body:
        raise ForgeError(f"a comment must be at most {MAX_COMMENT_CHARS} characters long, with no NUL byte")
    return body


def check_login(user: str) -> str:
    """A GitHub login, or a `ForgeError` saying what one looks like."""
    if not LOGIN.match(user):
        raise ForgeError(f"{user[:100]!r} is not a GitHub login (letters, digits and hyphens, at most 39 characters, "
                         "'[bot]' after an App's name)")
    return user


def check_path(path: str) -> str:
    """A repository-relative file path git can store, outside `.git`."""
    if not path or "\x00" in path or len(path) > 4096:
        raise ForgeError(f"path {path[:200]!r} is empty, too long or holds a NUL byte")
    if path.startswith("/"):
        raise ForgeError(f"path {path!r} is absolute; paths are relative to the repository root")
    parts = path.split("/")
    if path != posixpath.normpath(path) or any(p in ("", ".", "..") for p in parts):
        raise ForgeError(f"path {path!r} is not a clean relative path inside the repository")
    # Git refuses `.git` in any case and at any depth; so do we.
    if any(p.lower() == ".git" for p in parts):
        raise ForgeError(f"path {path!r} is inside .git; the repository's own metadata cannot be changed")
    return path


def decode_changeset(changes: Changeset) -> DecodedChanges:
    """The changeset with contents decoded, or a `ForgeError` naming the first thing wrong with it."""
    base = check_sha(changes.base_commit, "base_commit")
    parent = check_sha(changes.parent, "parent") if changes.parent is not None else None
    # On a parent, an empty changeset is meaningful: it takes the branch back to the base commit's tree.
    if not changes.files and not changes.deleted and parent is None:
        raise ForgeError("the changeset is empty: there is nothing to commit")
    if len(changes.files) + len(changes.deleted) > MAX_ENTRIES:
        raise ForgeError(f"the changeset has more than {MAX_ENTRIES} entries; split the change")
    seen: set[str] = set()
    files: list[tuple[str, str, bytes]] = []
    total = 0
    for item in changes.files:
        path = check_path(item.path)
        if path in seen:
            raise ForgeError(f"path {path!r} appears twice in the changeset")
        seen.add(path)
        if len(item.content_base64) > MAX_FILE_BYTES * 4 // 3 + 4:
            raise ForgeError(f"{path!r} is larger than {MAX_FILE_BYTES} bytes")
        try:
            content = base64.b64decode(item.content_base64, validate=True)
        except (binascii.Error, ValueError):
            raise ForgeError(f"content_base64 of {path!r} is not valid base64") from None
        if item.mode == "120000" and (not content or b"\x00" in content):
            raise ForgeError(f"symbolic link {path!r} needs a target: non-empty, with no NUL byte")
        total += len(content)
        if total > MAX_CHANGESET_BYTES:
            raise ForgeError(f"the changeset holds more than {MAX_CHANGESET_BYTES} bytes; split the change")
        files.append((path, item.mode, content))
    deleted = []
    for raw in changes.deleted:
        path = check_path(raw)
        if path in seen:
            raise ForgeError(f"path {path!r} is both written and deleted in the changeset")
        seen.add(path)
        deleted.append(path)
    return DecodedChanges(base_commit=base, files=files, deleted=deleted, parent=parent)


def commit_parent(branch: str, tip: str | None, decoded: DecodedChanges) -> str:
    """The commit the new commit goes on: the changeset's parent, which must be the branch's tip `tip`; without a
    parent, the base commit, where the branch must still be when it exists. Anything else moved the branch."""
    base, parent = decoded.base_commit, decoded.parent
    if parent is None:
        if tip is not None and tip != base:
            raise ForgeError(f"branch {branch!r} moved: it is at {tip} but the changes are based on {base}; "
                             "export the changes again from that commit or use a new branch")
        return base
    if tip != parent:
        where = f"it is at {tip}" if tip else "it does not exist"
        raise ForgeError(f"branch {branch!r} moved: {where}, not at the parent {parent} the commit was to go on; "
                         "commit on the branch's current tip or use a new branch")
    return parent


def nothing_to_commit(branch: str, parent: str, base: str) -> ForgeError:
    """The refusal of a commit whose tree would be its parent's."""
    if parent == base:
        return ForgeError("the changeset changes nothing in the base commit; there is nothing to commit")
    return ForgeError(f"branch {branch!r} already holds exactly these changes at {parent}; there is nothing to "
                      "commit")


# GitHub runs these from any pushed branch, with the repository's secrets, before anyone reviews the pull request.
CI_PATHS = (".github/workflows", ".github/actions")


def refuse_workflow_changes(decoded: DecodedChanges) -> None:
    """Refuse a changeset that adds, changes or deletes a GitHub Actions workflow or action (or `.github` itself)."""
    for path in [path for path, _, _ in decoded.files] + decoded.deleted:
        lower = path.lower()
        if lower == ".github" or any(lower == top or lower.startswith(top + "/") for top in CI_PATHS):
            raise ForgeError(
                f"refusing to change {path!r}: GitHub runs workflows and actions from a pushed branch with the "
                "repository's secrets before anyone reviews the pull request; leave it out of the changeset "
                "(restore the file where the change was made and export again), or ask the operator to set "
                "GITHUB_ALLOW_WORKFLOW_CHANGES=1 on the github server to allow such changes")
