"""The GitHub forge: PyGithub over the REST API, commits through the Git Data API (no clone, no push).

PyGithub blocks, so every call runs in a worker thread. When the token cannot push to a repository, branches and
commits go to the token owner's fork and the pull request is opened from there.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import time
from collections.abc import Callable
from typing import Any, TypeVar

import requests
from github.GithubException import (BadCredentialsException, GithubException, RateLimitExceededException,
                                    UnknownObjectException)
from github.GithubObject import NotSet
from github.InputGitTreeElement import InputGitTreeElement
from github.PullRequest import PullRequest as GhPull
from github.Repository import Repository

from .clients import NO_TOKEN, Clients
from .forge import (BranchRef, Changeset, CommitResult, DecodedChanges, ForgeError, ForgeUnavailable, Issue,
                    PullRequest, RepositoryInfo, check_branch_name, check_message, check_sha, check_writable_branch,
                    commit_parent, decode_changeset, nothing_to_commit, refuse_workflow_changes)

T = TypeVar("T")
FORK_READY_TIMEOUT_S = 60
class GitHubForge:
    """One repository on GitHub (or GitHub Enterprise through GITHUB_API_URL)."""

    def __init__(self, full_name: str, clients: Clients) -> None:
        s = clients.settings
        if s.token is None and not (s.app_id and s.app_private_key):
            raise ForgeUnavailable(NO_TOKEN)
        self.full_name = full_name
        self.clients = clients
        self.prefix = s.branch_prefix
        self.allow_workflow_changes = s.allow_workflow_changes

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except GithubException as exc:
            raise explain(exc) from None
        except requests.RequestException as exc:
            raise ForgeError(f"cannot reach the GitHub API at {self.clients.settings.api_url}: "
                             f"{type(exc).__name__}") from None

    def _upstream(self) -> Repository:
        try:
            return self.clients.for_repo(self.full_name).get_repo(self.full_name)
        except UnknownObjectException:
            raise ForgeError(f"repository {self.full_name} was not found on GitHub, or the token cannot see it") \
                from None

    def _target(self, upstream: Repository) -> Repository:
        """Where branches go: the repository itself when the token can push, else the token owner's fork."""
        # An installation token's access is the App's, and GitHub then leaves `permissions` out.
        if upstream.permissions is None or upstream.permissions.push:
            return upstream
        known = self.clients.forks.get(self.full_name)
        fork = self.clients.for_repo(self.full_name).get_repo(known) if known else upstream.create_fork()
        self.clients.forks[self.full_name] = fork.full_name
        return fork

    @staticmethod
    def _ref_sha(repo: Repository, branch: str) -> str | None:
        try:
            return repo.get_git_ref(f"heads/{branch}").object.sha
        except UnknownObjectException:
            return None

    @staticmethod
    def _await_commit(repo: Repository, sha: str, patient: bool) -> None:
        """Wait, within a bound, for `sha` to appear in a fork GitHub is still copying."""
        deadline = time.monotonic() + (FORK_READY_TIMEOUT_S if patient else 0)
        while True:
            try:
                repo.get_git_commit(sha)
                return
            except GithubException as exc:
                if exc.status not in (404, 409, 422) or time.monotonic() >= deadline:
                    if exc.status in (404, 409, 422):
                        raise ForgeError(f"commit {sha} is not in {repo.full_name}; branch from a commit the "
                                         "repository has") from None
                    raise
            time.sleep(2)

    async def get_repository(self) -> RepositoryInfo:
        """Describe the repository and whether the token can push to it."""
        repo = await self._call(self._upstream)
        can_push = bool(repo.permissions and repo.permissions.push)
        return RepositoryInfo(repo=repo.full_name, forge="github", default_branch=repo.default_branch,
                              can_push=can_push, clone_url=repo.clone_url, branch_prefix=self.prefix)

    async def create_branch(self, branch: str, from_sha: str) -> BranchRef:
        """Create `branch` at `from_sha` (in the fork when the token cannot push); idempotent at the same sha."""
        check_writable_branch(branch, self.prefix)
        return await self._call(self._create_branch, branch, check_sha(from_sha))

    def _create_branch(self, branch: str, sha: str) -> BranchRef:
        upstream = self._upstream()
        target = self._target(upstream)
        check_writable_branch(branch, self.prefix, upstream.default_branch, target.default_branch)
        ref = f"refs/heads/{branch}"
        existing = self._ref_sha(target, branch)
        if existing is None:
            self._await_commit(target, sha, patient=target is not upstream)
            try:
                target.create_git_ref(ref, sha)
                return BranchRef(ref=ref, sha=sha, repo=target.full_name, created=True)
            except GithubException as exc:
                # A retried POST may find the ref its first attempt made.
                if exc.status != 422:
                    raise
                existing = self._ref_sha(target, branch)
        if existing != sha:
            raise ForgeError(f"branch {branch!r} already exists at {existing}, not at {sha}; choose a new branch name")
        return BranchRef(ref=ref, sha=sha, repo=target.full_name, created=False)

    async def commit_changes(self, branch: str, message: str, changes: Changeset) -> CommitResult:
        """Commit the changeset on `branch` with blobs, a tree on the base commit's tree, a commit on the changeset's
        parent (the branch's tip; the base commit without one) and a ref update that never forces."""
        check_writable_branch(branch, self.prefix)
        check_message(message)
        decoded = decode_changeset(changes)
        if not self.allow_workflow_changes:
            refuse_workflow_changes(decoded)
        return await self._call(self._commit, branch, message, decoded)

    def _commit(self, branch: str, message: str, decoded: DecodedChanges) -> CommitResult:
        upstream = self._upstream()
        target = self._target(upstream)
        check_writable_branch(branch, self.prefix, upstream.default_branch, target.default_branch)
        base = decoded.base_commit
        try:
            ref = target.get_git_ref(f"heads/{branch}")
        except UnknownObjectException:
            ref = None  # made below, at the new commit, so that a refused changeset leaves no branch behind
        parent_sha = commit_parent(branch, ref.object.sha if ref is not None else None, decoded)
        if ref is None:
            self._await_commit(target, base, patient=target is not upstream)
        parent = target.get_git_commit(parent_sha)
        # On the base commit's tree, not the parent's: what the branch held before does not carry over.
        base_tree = parent.tree if parent_sha == base else target.get_git_commit(base).tree
        entries = [InputGitTreeElement(path, mode, "blob",
                                       sha=target.create_git_blob(base64.b64encode(content).decode(), "base64").sha)
                   for path, mode, content in decoded.files]
        entries += [InputGitTreeElement(path, "100644", "blob", sha=None) for path in decoded.deleted]
        # No changes (a parent's branch taken back to the base): the base commit's own tree.
        tree = target.create_git_tree(entries, base_tree=base_tree) if entries else base_tree
        if tree.sha == parent.tree.sha:
            raise nothing_to_commit(branch, parent_sha, base)
        commit = target.create_git_commit(message, tree, [parent])
        try:
            if ref is None:
                target.create_git_ref(f"refs/heads/{branch}", commit.sha)
            else:
                ref.edit(commit.sha, force=False)
        except GithubException as exc:
            if exc.status != 422:
                raise
            raise ForgeError(f"branch {branch!r} moved while committing; export the changes again and retry") \
                from None
        return CommitResult(sha=commit.sha, branch=branch, parent=parent_sha, files_written=len(decoded.files),
                            files_deleted=len(decoded.deleted))

    async def open_pull_request(self, head: str, base: str | None, title: str, body: str,
                                draft: bool) -> PullRequest:
        """Open a pull request from `head`, or return the open one it already has."""
        check_branch_name(head)
        if base is not None:
            check_branch_name(base)
        if not title.strip():
            raise ForgeError("the pull request title is empty; say what the change does")
        return await self._call(self._open_pull, head, base, title, body, draft)

    def _open_pull(self, head: str, base: str | None, title: str, body: str, draft: bool) -> PullRequest:
        upstream = self._upstream()
        target = self._target(upstream)
        base = base or upstream.default_branch
        forked = target.full_name != upstream.full_name
        if head == base and not forked:
            raise ForgeError(f"head and base are both {head!r}; open the pull request from your branch")
        if self._ref_sha(upstream, base) is None:
            raise ForgeError(f"base branch {base!r} does not exist in {upstream.full_name}")
        label = f"{target.owner.login}:{head}"
        for pull in upstream.get_pulls(state="open", head=label):
            return as_pull(pull, existing=True)
        if self._ref_sha(target, head) is None:
            raise ForgeError(f"head branch {head!r} does not exist in {target.full_name}; "
                             "call create_branch and commit_changes first")
        try:
            pull = upstream.create_pull(base=base, head=label if forked else head, title=title, body=body,
                                        draft=draft, maintainer_can_modify=True if forked else NotSet)
        except GithubException as exc:
            # PyGithub retries POSTs: the first attempt may have opened it.
            if exc.status == 422 and "already exists" in str(exc.data):
                for pull in upstream.get_pulls(state="open", head=label):
                    return as_pull(pull, existing=True)
            raise
        return as_pull(pull)

    async def get_issue(self, number: int) -> Issue:
        """Read one issue: its title, body, state and labels."""
        return await self._call(self._get_issue, number)

    def _get_issue(self, number: int) -> Issue:
        try:
            issue = self._upstream().get_issue(number)
            title = issue.title
        except UnknownObjectException:
            raise ForgeError(f"issue #{number} was not found in {self.full_name}") from None
        return Issue(number=issue.number, title=title, body=issue.body or "", state=issue.state,
                     url=issue.html_url, labels=[label.name for label in issue.labels],
                     author=issue.user.login if issue.user else None)

    async def list_pull_requests(self, head: str | None) -> list[PullRequest]:
        """The open pull requests, only those from `head` (a branch or owner:branch) when given."""
        return await self._call(self._list_pulls, head)

    def _list_pulls(self, head: str | None) -> list[PullRequest]:
        upstream = self._upstream()
        if head and ":" in head:
            return [as_pull(p) for p in upstream.get_pulls(state="open", head=head)]
        return [as_pull(p) for p in upstream.get_pulls(state="open") if head is None or p.head.ref == head]


def as_pull(pull: GhPull, existing: bool = False) -> PullRequest:
    """Our view of a PyGithub pull request."""
    same_repo = pull.head.repo is not None and pull.head.repo.full_name == pull.base.repo.full_name
    created = pull.created_at or datetime.datetime.now(datetime.UTC)
    return PullRequest(number=pull.number, url=pull.html_url, head=pull.head.ref if same_repo else pull.head.label,
                       base=pull.base.ref, title=pull.title, body=pull.body or "", draft=bool(pull.draft),
                       state=pull.state, created_at=created.isoformat(), existing=existing)


def explain(exc: GithubException) -> ForgeError:
    """A message the caller can act on, from what GitHub answered."""
    data = exc.data if isinstance(exc.data, dict) else {}
    message = str(data.get("message") or exc.message or "no message")
    details = "; ".join(str(e.get("message") or e.get("code")) for e in data.get("errors", []) if isinstance(e, dict))
    if isinstance(exc, BadCredentialsException):
        return ForgeUnavailable("GitHub rejected the token (401 Bad credentials): set a valid GITHUB_TOKEN")
    if isinstance(exc, RateLimitExceededException):
        headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
        reset = headers.get("x-ratelimit-reset", "")
        when = ""
        if reset.isdigit():
            at = datetime.datetime.fromtimestamp(int(reset), datetime.UTC)
            when = f"; it resets at {at:%H:%M:%S} UTC, in {max(0, int(at.timestamp() - time.time()))} s"
        return ForgeError(f"GitHub API rate limit exhausted ({exc.status}){when}; try again after that")
    if exc.status == 404:
        return ForgeError(f"GitHub answered 404 Not Found: the repository, branch or commit does not exist or the "
                          f"token cannot see it ({message})")
    return ForgeError(f"GitHub answered {exc.status}: {message}" + (f" ({details})" if details else ""))
