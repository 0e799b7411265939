"""The GitHub forge: PyGithub over the REST API, commits through the Git Data API (no clone, no push).

PyGithub blocks, so every call runs in a worker thread. When the token cannot push to a repository, branches and
commits go to the token owner's fork and the pull request is opened from there.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import itertools
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, Literal, TypeVar

import requests
from github.File import File
from github.GithubException import (BadCredentialsException, GithubException, RateLimitExceededException,
                                    UnknownObjectException)
from github.GithubObject import NotSet
from github.InputGitTreeElement import InputGitTreeElement
from github.Issue import Issue as GhIssue
from github.IssueComment import IssueComment
from github.PullRequest import PullRequest as GhPull
from github.PaginatedList import PaginatedList
from github.PullRequestComment import PullRequestComment
from github.Repository import Repository

from common.untrusted import OURS, clean

from .clients import NO_TOKEN, Clients
from .config import Settings
from .forge import (MAX_COMMENTS, MAX_DIFF_BYTES, SIGNATURE, BranchRef, Changeset, Comment, CommitResult,
                    DecodedChanges, ForgeError, ForgeUnavailable, Issue, Permission, PullRequest, PullRequestDetail,
                    RepositoryInfo, ReviewThread, check_branch_name, check_comment_body, check_login, check_message,
                    check_sha, check_writable_branch, commit_parent, decode_changeset, nothing_to_commit,
                    refuse_workflow_changes)

T = TypeVar("T")
FORK_READY_TIMEOUT_S = 60
DRAFTS_REFUSED = "Draft pull requests are not supported"
DRAFT_NOTE = ("> [!NOTE]\n> This pull request would have been a draft, but this repository does not support draft "
              "pull requests; it is open for review instead.\n\n")
ROLES = ("admin", "maintain", "write", "triage", "read", "none")


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
            raise explain(exc, self.clients.settings) from None
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
        """Where branches go: the repository itself when the token can push, else the token owner's fork, once
        GitHub has copied it."""
        if can_push(upstream):
            return upstream
        known = self.clients.forks.get(self.full_name)
        if known:
            return self.clients.for_repo(self.full_name).get_repo(known)
        fork = upstream.create_fork()
        # GitHub answers at once but copies the fork later; until then its git data answers 409 "Git Repository is
        # empty.". A branch it lacks (404) is for the caller to find.
        await_github(lambda: self._ref_sha(fork, fork.default_branch), (409,), FORK_READY_TIMEOUT_S,
                     lambda: ForgeError(f"the fork {fork.full_name} of {upstream.full_name} is still being created; "
                                        "try again in a minute"))
        self.clients.forks[self.full_name] = fork.full_name
        return fork

    def _existing_target(self, upstream: Repository) -> Repository | None:
        """Where branches go, as `_target`, but a fork only when there is one already: never made here."""
        if can_push(upstream):
            return upstream
        known = self.clients.forks.get(self.full_name)
        client = self.clients.for_repo(self.full_name)
        try:
            fork = client.get_repo(known or f"{self.clients.login(self.full_name)}/{upstream.name}")
        except UnknownObjectException:
            return None
        if known is None and (fork.parent is None or fork.parent.full_name != upstream.full_name):
            return None  # a repository of the same name, not a fork of this one
        return fork

    def _write_owner(self, upstream: Repository) -> str:
        """Whose branches this server's pull requests come from: the repository's owner when the token can push,
        else the owner of the fork (the token's)."""
        if can_push(upstream):
            return upstream.owner.login
        known = self.clients.forks.get(self.full_name)
        return known.split("/")[0] if known else self.clients.login(self.full_name)

    @staticmethod
    def _ref_sha(repo: Repository, branch: str) -> str | None:
        try:
            return repo.get_git_ref(f"heads/{branch}").object.sha
        except UnknownObjectException:
            return None

    def _await_commit(self, repo: Repository, sha: str, patient: bool) -> None:
        """Wait, within a bound when `patient`, for `sha` to appear in a fork GitHub is still copying."""
        await_github(lambda: repo.get_git_commit(sha), (404, 409, 422), FORK_READY_TIMEOUT_S if patient else 0,
                     lambda: ForgeError(f"commit {sha} is not in {repo.full_name}; branch from a commit the "
                                        "repository has"))

    async def get_repository(self) -> RepositoryInfo:
        """Describe the repository, whether the token can push to it, and where this server's branches are."""
        return await self._call(self._describe)

    def _describe(self) -> RepositoryInfo:
        repo = self._upstream()
        target = self._existing_target(repo)
        return RepositoryInfo(repo=repo.full_name, forge="github", default_branch=repo.default_branch,
                              can_push=can_push(repo), clone_url=repo.clone_url, branch_prefix=self.prefix,
                              writes_to=target.full_name if target is not None else None)

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
        fields = {"base": base, "head": label if forked else head, "title": title,
                  "maintainer_can_modify": True if forked else NotSet}
        try:
            try:
                pull = upstream.create_pull(body=body, draft=draft, **fields)
            except GithubException as exc:
                if not (draft and exc.status == 422 and DRAFTS_REFUSED in str(exc.data)):
                    raise
                # Plans without draft pull requests refuse them: ready for review, saying so first.
                pull = upstream.create_pull(body=DRAFT_NOTE + body, draft=False, **fields)
        except GithubException as exc:
            # PyGithub retries POSTs: the first attempt may have opened it.
            if exc.status == 422 and "already exists" in str(exc.data):
                for pull in upstream.get_pulls(state="open", head=label):
                    return as_pull(pull, existing=True)
            raise
        return as_pull(pull)

    async def get_issue(self, number: int) -> Issue:
        """Read one issue: its title, body, state, labels and conversation, every text cleaned."""
        return await self._call(self._get_issue, number)

    def _get_issue(self, number: int) -> Issue:
        try:
            issue = self._upstream().get_issue(number)
            title = issue.title
        except UnknownObjectException:
            raise ForgeError(f"issue #{number} was not found in {self.full_name}") from None
        me = self.clients.login(self.full_name)
        comments, cut = newest(issue.get_comments())
        return Issue(number=issue.number, title=clean(title), body=clean(issue.body or ""), state=issue.state,
                     url=issue.html_url, labels=[clean(label.name) for label in issue.labels],
                     author=issue.user.login if issue.user else None, comments=[as_comment(c, me) for c in comments],
                     note=cut_note(["comments"] if cut else [], issue.html_url))

    async def list_pull_requests(self, head: str | None, state: Literal["open", "closed", "all"] = "open"
                                 ) -> list[PullRequest]:
        """The pull requests in `state`, only those from `head` (a branch or owner:branch) when given."""
        if state not in ("open", "closed", "all"):
            raise ForgeError(f"state must be 'open', 'closed' or 'all', not {state!r}")
        return await self._call(self._list_pulls, head, state)

    def _list_pulls(self, head: str | None, state: str = "open") -> list[PullRequest]:
        upstream = self._upstream()
        if head is None:
            return [as_pull(p) for p in upstream.get_pulls(state=state)]
        # GitHub filters on `head` only as owner:branch; a branch alone is one where this server writes.
        label = head if ":" in head else f"{self._write_owner(upstream)}:{head}"
        return [as_pull(p) for p in upstream.get_pulls(state=state, head=label)]

    # The conversation: pull requests read whole, review threads answered, comments written as this server.

    def _pull(self, upstream: Repository, number: int) -> GhPull:
        try:
            return upstream.get_pull(number)
        except UnknownObjectException:
            raise ForgeError(f"pull request #{number} was not found in {self.full_name}; list_pull_requests shows "
                             "the ones it has") from None

    async def get_pull_request(self, number: int, diff: bool = False) -> PullRequestDetail:
        """A pull request with where its head is, its conversation, its review threads (the newest MAX_COMMENTS of
        each list, every text cleaned) and, when `diff`, its changes from the files' patches."""
        return await self._call(self._get_pull_request, number, diff)

    def _get_pull_request(self, number: int, diff: bool) -> PullRequestDetail:
        pull = self._pull(self._upstream(), number)
        me = self.clients.login(self.full_name)
        # A pull request from a fork that was deleted has no head repository any more.
        head_repo = pull.head.repo.full_name if pull.head.repo is not None else ""
        comments, comments_cut = newest(pull.get_issue_comments())
        review_comments, reviews_cut = newest(pull.get_review_comments())
        cut = ["comments"] * comments_cut + ["review comments"] * reviews_cut
        return PullRequestDetail(
            **as_pull(pull).model_dump(), head_sha=pull.head.sha, head_repo=head_repo, base_sha=pull.base.sha,
            author=pull.user.login if pull.user else None, comments=[as_comment(c, me) for c in comments],
            review_threads=review_threads(review_comments, me),
            diff=files_diff(pull.get_files(), pull.html_url) if diff else None, note=cut_note(cut, pull.html_url))

    async def reply_to_review_comment(self, number: int, comment_id: int, body: str) -> Comment:
        """Reply, as this server, in the review thread that comment `comment_id` starts on pull request
        `number`."""
        return await self._call(self._reply, number, comment_id, signed(body))

    def _reply(self, number: int, comment_id: int, body: str) -> Comment:
        pull = self._pull(self._upstream(), number)
        try:
            root = pull.get_review_comment(comment_id)
            on = root.pull_request_url
        except UnknownObjectException:
            on = None
        if on is None or not on.endswith(f"/pulls/{number}"):
            raise ForgeError(f"pull request #{number} has no review comment {comment_id}; get_pull_request lists "
                             "its review threads and their ids")
        if root.in_reply_to_id is not None:
            raise ForgeError(f"comment {comment_id} is a reply in the thread of comment {root.in_reply_to_id}; "
                             "reply to the thread's first comment")
        return as_comment(pull.create_review_comment_reply(comment_id, body), self.clients.login(self.full_name))

    async def comment_on_issue(self, number: int, body: str) -> Comment:
        """Add a comment, as this server, to the conversation of an issue or a pull request."""
        return await self._call(self._comment_on_issue, number, signed(body))

    def _comment_on_issue(self, number: int, body: str) -> Comment:
        upstream = self._upstream()
        # Not read first: a pull request's number names an issue too, and the POST alone says whether it exists.
        issue = GhIssue(upstream.requester, url=f"{upstream.url}/issues/{number}", completed=False)
        try:
            made = issue.create_comment(body)
        except UnknownObjectException:
            raise ForgeError(f"there is no issue or pull request #{number} in {self.full_name}") from None
        return as_comment(made, self.clients.login(self.full_name))

    async def edit_issue_comment(self, comment_id: int, body: str) -> Comment:
        """Change the text of a conversation comment this server wrote; any other is refused."""
        return await self._call(self._edit_comment, comment_id, signed(body))

    def _edit_comment(self, comment_id: int, body: str) -> Comment:
        upstream = self._upstream()
        try:
            old = IssueComment(upstream.requester, url=f"{upstream.url}/issues/comments/{comment_id}")
            old.body  # read here: a comment that is not there answers 404
        except UnknownObjectException:
            raise ForgeError(f"there is no issue or pull request comment {comment_id} in {self.full_name}") from None
        me = self.clients.login(self.full_name)
        if not as_comment(old, me).ours:
            author = old.user.login if old.user else "someone else"
            raise ForgeError(f"comment {comment_id} was written by {author}, not by Tiny Backspace ({me}) with its "
                             "mark; only its own comments can be edited")
        old.edit(body)
        return as_comment(old, me)

    async def add_review_comment(self, number: int, body: str, path: str | None = None,
                                 line: int | None = None) -> Comment:
        """Refused: on GitHub, people comment on the pull request's page and this server only answers them."""
        raise ForgeError(f"{self.full_name} is on GitHub: people add review comments on pull request #{number}'s "
                         "page there, where they are theirs; this server only replies to them "
                         "(reply_to_review_comment) and comments as itself (comment_on_issue)")

    async def get_permission(self, user: str) -> Permission:
        """What `user` may do in the repository: their role, and whether it lets them push."""
        return await self._call(self._permission, check_login(user))

    def _permission(self, user: str) -> Permission:
        upstream = self._upstream()
        try:
            role = upstream.get_collaborator_role_name(user)
            if role not in ROLES:  # a custom role: what it builds on says what it may do
                role = upstream.get_collaborator_permission(user)
        except UnknownObjectException:
            role = "none"  # GitHub knows no such user
        permission = role if role in ROLES else "none"
        return Permission(user=user, permission=permission, can_write=permission in ("admin", "maintain", "write"))

    async def delete_branch(self, branch: str) -> bool:
        """Delete a branch inside the prefix where this server writes (never a default branch); False when it was
        not there, or there is no fork for it to be in (none is made)."""
        check_writable_branch(branch, self.prefix)
        return await self._call(self._delete_branch, branch)

    def _delete_branch(self, branch: str) -> bool:
        upstream = self._upstream()
        target = self._existing_target(upstream)
        if target is None:
            return False
        check_writable_branch(branch, self.prefix, upstream.default_branch, target.default_branch)
        try:
            target.get_git_ref(f"heads/{branch}").delete()
        except GithubException as exc:
            # 404: not there when read; 422: gone by the time the DELETE arrived.
            if exc.status not in (404, 422):
                raise
            return False
        return True


def can_push(repo: Repository) -> bool:
    """Whether branches go to `repo` itself: the token can push, or it is an App installation's (GitHub then leaves
    `permissions` out: the access is the App's, on the repositories it is installed on)."""
    return repo.permissions is None or bool(repo.permissions.push)


def backoff(first: float = 0.2, most: float = 2.0) -> Iterator[float]:
    """Waits that start short and double, up to `most`."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, most)


def await_github(probe: Callable[[], object], waiting: Collection[int], bound_s: float,
                 too_long: Callable[[], ForgeError]) -> None:
    """Call `probe` until GitHub answers it with something other than a status in `waiting` (what it answers while
    it is still copying a fork), with waits that start short and double, for at most `bound_s`: then `too_long()`.
    Other failures are raised as they come."""
    deadline = time.monotonic() + bound_s
    for delay in backoff():
        try:
            probe()
            return
        except GithubException as exc:
            if exc.status not in waiting:
                raise
        left = deadline - time.monotonic()
        if left <= 0:
            raise too_long()
        time.sleep(min(delay, left))


def newest(items: PaginatedList[T], most: int | None = None) -> tuple[list[T], bool]:
    """The newest `most` (MAX_COMMENTS) items of a list GitHub gives oldest first, still oldest first, and whether
    older ones were left out. A longer list is read again from its last page back: at most 2 × `most` items read."""
    most = MAX_COMMENTS if most is None else most
    first = list(itertools.islice(items, most + 1))
    if len(first) <= most:
        return first, False
    return list(itertools.islice(items.reversed, most))[::-1], True


def cut_note(lists: list[str], url: str) -> str | None:
    """What a reader should know when lists of comments were cut at MAX_COMMENTS."""
    if not lists:
        return None
    return (f"only the newest {MAX_COMMENTS} {' and '.join(lists)} are here; older ones are left out: read them at "
            f"{url}")


def as_pull(pull: GhPull, existing: bool = False) -> PullRequest:
    """Our view of a PyGithub pull request."""
    same_repo = pull.head.repo is not None and pull.head.repo.full_name == pull.base.repo.full_name
    created = pull.created_at or datetime.datetime.now(datetime.UTC)
    return PullRequest(number=pull.number, url=pull.html_url, head=pull.head.ref if same_repo else pull.head.label,
                       base=pull.base.ref, title=clean(pull.title), body=clean(pull.body or ""),
                       draft=bool(pull.draft), state=pull.state, created_at=created.isoformat(), existing=existing)


def as_comment(comment: IssueComment | PullRequestComment, me: str) -> Comment:
    """Our view of a comment: its text cleaned, `ours` when this server's account `me` wrote it with its mark (anyone
    can type the mark; GitHub does not show it)."""
    raw = comment.body or ""
    created = comment.created_at or datetime.datetime.now(datetime.UTC)
    author = comment.user.login if comment.user else None
    return Comment(id=comment.id, author=author, body=clean(raw.removesuffix(SIGNATURE)),
                   created_at=created.isoformat(), url=comment.html_url,
                   ours=OURS in raw and author is not None and author.lower() == me.lower())


def review_threads(comments: Iterable[PullRequestComment], me: str) -> list[ReviewThread]:
    """Review comments as threads: each first comment (one that replies to none) with its replies in order, and
    `addressed` when the thread's last comment is this server's."""
    threads: dict[int, list[PullRequestComment]] = {}
    replies: list[PullRequestComment] = []
    for comment in comments:
        if comment.in_reply_to_id is None:
            threads[comment.id] = [comment]
        else:
            replies.append(comment)
    for reply in replies:
        # The replies to a first comment that is not here (deleted, or older than the comments read) stay together,
        # under the earliest of them, in the thread of that first comment's id.
        threads.setdefault(reply.in_reply_to_id, []).append(reply)
    result = []
    for thread_id, (first, *rest) in threads.items():
        head, answers = as_comment(first, me), [as_comment(c, me) for c in rest]
        result.append(ReviewThread(id=thread_id, path=first.path, line=first.line, author=head.author, body=head.body,
                                   created_at=head.created_at, url=head.url, replies=answers,
                                   addressed=(answers or [head])[-1].ours))
    return result


def files_diff(files: Iterable[File], url: str) -> str:
    """A unified diff from the patches of a pull request's files, cut at MAX_DIFF_BYTES (no page past it is read)."""
    parts, size = [], 0
    for f in files:
        old = f.previous_filename or f.filename
        text = f"diff --git a/{old} b/{f.filename}\n"
        if f.patch:
            text += (f"--- {'/dev/null' if f.status == 'added' else 'a/' + old}\n"
                     f"+++ {'/dev/null' if f.status == 'removed' else 'b/' + f.filename}\n{f.patch}\n")
        else:
            text += f"({f.status}; GitHub shows no patch: a binary file, a rename alone, or too large a change)\n"
        encoded = text.encode()
        if size + len(encoded) > MAX_DIFF_BYTES:
            cut = encoded[:MAX_DIFF_BYTES - size].decode("utf-8", "ignore")
            parts.append(cut[:cut.rfind("\n") + 1])
            parts.append(f"[the diff is cut at {MAX_DIFF_BYTES} bytes; see all of it at {url}/files]\n")
            break
        parts.append(text)
        size += len(encoded)
    return "".join(parts)


def signed(body: str) -> str:
    """`body` as this server writes it: not empty, within GitHub's size, ending with the mark of its comments."""
    return check_comment_body(body) + SIGNATURE


def explain(exc: GithubException, settings: Settings | None = None) -> ForgeError:
    """A message the caller can act on, from what GitHub answered."""
    data = exc.data if isinstance(exc.data, dict) else {}
    message = str(data.get("message") or exc.message or "no message")
    details = "; ".join(str(e.get("message") or e.get("code")) for e in data.get("errors", []) if isinstance(e, dict))
    if exc.status == 401 and settings is not None and settings.app_id:
        return ForgeUnavailable(f"GitHub refused the GitHub App's credentials (401 {message}): check that "
                                "GITHUB_APP_ID is the App's id and GITHUB_APP_PRIVATE_KEY its private key, and that "
                                "this machine's clock is right")
    if isinstance(exc, BadCredentialsException):
        return ForgeUnavailable("GitHub rejected the token (401 Bad credentials): set a valid GITHUB_TOKEN")
    if isinstance(exc, RateLimitExceededException) or exc.status == 429:
        return rate_limited(exc, message, settings)
    if exc.status == 404:
        return ForgeError(f"GitHub answered 404 Not Found: the repository, branch or commit does not exist or the "
                          f"token cannot see it ({message})")
    return ForgeError(f"GitHub answered {exc.status}: {message}" + (f" ({details})" if details else ""))


def rate_limited(exc: GithubException, message: str, settings: Settings | None) -> ForgeError:
    """What a rate limit GitHub answered means for the caller: when to try again."""
    headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
    reset = headers.get("x-ratelimit-reset", "")
    if headers.get("x-ratelimit-remaining") == "0" or message.lower().startswith("api rate limit exceeded"):
        when = ""
        if reset.isdigit():
            at = datetime.datetime.fromtimestamp(int(reset), datetime.UTC)
            when = f"; it resets at {at:%H:%M:%S} UTC, in {max(0, int(at.timestamp() - time.time()))} s"
        return ForgeError(f"GitHub API rate limit exhausted ({exc.status}){when}; try again after that")
    wait = getattr(exc, "wait", None)
    if wait is None and headers.get("retry-after", "").isdigit():
        wait = int(headers["retry-after"])
    limit = settings.max_rate_limit_wait_s if settings is not None else None
    text = f"GitHub's secondary rate limit refused the request ({exc.status}: {message})"
    if wait is None:
        return ForgeError(f"{text}; try again in a few minutes")
    at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=wait)
    longer = f", longer than GITHUB_MAX_RATE_LIMIT_WAIT_S ({limit:g} s) lets this server wait" \
        if limit is not None and wait > limit else ""
    return ForgeError(f"{text}; it asks to wait {wait:.0f} s{longer}: try again after {at:%H:%M:%S} UTC")
