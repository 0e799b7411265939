"""Runs that start from the forge: an issue to resolve, or a pull request to follow up.

Before any sandbox, the run reads the issue or the pull request and makes a `Task` of it: the brief's request, in
which every text people wrote on the forge is framed as untrusted (common.untrusted), and the title and branch words
of what the run publishes. A follow-up refuses a pull request the run may not push to (`refusal`), and its
`FollowUp` holds the review threads not yet addressed, the `reply_to_thread` tool the agent that changes the code
answers them with, and, once the run committed on the pull request's branch, posts the replies (`answer`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from mcp_types import CallToolResult

from common.redact import Redactor
from common.untrusted import NOTE, frame

from .events import Event, EventLog
from .mcp_pool import ServerUnavailable
from .output import fit
from .roles import REPLY_TOOL, OwnTool
from .tools import result_text

TEXT_CHARS = 20_000  # of one text from the forge in a brief
MAX_COMMENTS = 30  # an issue's comments in a brief: the latest ones
REPLY_CHARS = 10_000


class GithubCall(Protocol):
    async def call(self, server: str, tool: str, args: dict[str, Any], timeout: float) -> CallToolResult: ...


@dataclass(frozen=True)
class Task:
    """What a run works on: the request as the agents read it, and what its pull request says of it."""

    prompt: str  # the request in the agents' briefs
    title: str  # what the title of the pull request and its commit is made of (its first line, cut)
    topic: str  # what the branch of the run's own pull request is named from
    request: str = ""  # the user's own words, quoted in the pull request's body
    fixes: int | None = None  # the issue the pull request closes
    follow_up: FollowUp | None = None
    ref: str | None = None  # the commit the sandbox starts from; None: the default branch

    def redacted(self, redact: Redactor) -> Task:
        """The task with secrets masked in everything it publishes."""
        return replace(self, prompt=redact(self.prompt), title=redact(self.title), topic=redact(self.topic),
                       request=redact(self.request))


def issue_task(issue: dict[str, Any], prompt: str) -> Task:
    """A run that resolves `issue` (get_issue's answer), told `prompt` besides."""
    number, author = issue["number"], issue.get("author") or "unknown"
    parts = [f"This run resolves issue #{number} of the repository ({issue.get('url')}); its pull request will say "
             f"Fixes #{number}. The issue, as its author wrote it:",
             frame(f"issue #{number} by @{author}", fit(f"{issue['title']}\n\n{issue.get('body') or ''}",
                                                          TEXT_CHARS))]
    comments = [c for c in issue.get("comments") or [] if not c.get("ours")]  # people's, not this service's
    shown = comments[-MAX_COMMENTS:]
    if shown:
        parts.append(f"Its last {len(shown)} comments of {len(comments)}:" if len(shown) < len(comments) else
                     "Its comments:")
        parts += [frame(f"comment by @{c.get('author') or 'unknown'} on issue #{number}", fit(c["body"], TEXT_CHARS))
                  for c in shown]
    parts += [_request(prompt, "resolve the issue above."), NOTE]
    title = " ".join(issue["title"].split()) or f"Fix issue #{number}"
    return Task(prompt="\n\n".join(parts), title=title, topic=title, request=prompt, fixes=number)


def refusal(pull: dict[str, Any], forge: dict[str, Any], prompt: str, resuming: bool = False) -> str | None:
    """Why the run may not follow up `pull` (get_pull_request's answer) on the repository `forge`
    (get_repository's answer); None when it may."""
    number, prefix = pull["number"], forge["branch_prefix"]
    branch, head_repo = head_branch(pull), pull.get("head_repo") or ""
    if pull.get("state") != "open":
        return (f"pull request #{number} is {pull.get('state')}: only open pull requests can be followed up; start "
                "a new run instead")
    # Where the github server writes: the repository itself, or (without push rights) its fork, once there is one.
    writes = forge.get("writes_to")
    if not branch.startswith(prefix) or branch == prefix or writes is None or head_repo.lower() != writes.lower():
        why = (f"#{number} comes from {branch!r}" + (f" of {head_repo}" if head_repo != forge["repo"] else "")
               + ("" if writes is not None else f", and Tiny Backspace has no fork of {forge['repo']} to push to"))
        return (f"only pull requests from branches under {prefix} that Tiny Backspace can push can be followed up: "
                f"{why}. Start a new run with what to change instead")
    if not unaddressed(pull) and not prompt.strip() and not resuming:
        return (f"pull request #{number} has no review thread left to address: say in the prompt what to change "
                "on it")
    return None


def follow_up_task(pull: dict[str, Any], prompt: str) -> Task:
    """A run that follows up `pull` (get_pull_request's answer, checked by `refusal`), told `prompt` besides."""
    follow = FollowUp(pull, {t["id"]: t for t in unaddressed(pull)})
    number = pull["number"]
    title = prompt if prompt.strip() else f"Address the review of #{number}"
    return Task(prompt=follow.brief(prompt), title=title, topic=f"follow up {number} {pull.get('title', '')}",
                request=prompt, follow_up=follow, ref=pull["head_sha"])


def plain_task(prompt: str) -> Task:
    """A run told only `prompt`."""
    return Task(prompt=prompt, title=prompt, topic=prompt, request=prompt)


def head_branch(pull: dict[str, Any]) -> str:
    """The pull request's head branch, without the owner GitHub puts before a fork's."""
    return str(pull.get("head", "")).rpartition(":")[2]


def unaddressed(pull: dict[str, Any]) -> list[dict[str, Any]]:
    """The pull request's review threads whose last comment is not a reply of this server."""
    return [t for t in pull.get("review_threads") or [] if not t.get("addressed")]


def _request(prompt: str, otherwise: str) -> str:
    if prompt.strip():
        return f"Request from the user who started this run:\n{prompt}"
    return f"Request: {otherwise}"


def _where(thread: dict[str, Any]) -> str:
    line = thread.get("line")
    return f"{thread['path']}:{line}" if line else f"{thread['path']} (outdated: its line is no longer in the diff)"


@dataclass
class FollowUp:
    """A follow-up on one pull request: its review threads not yet addressed, and what the agents said of each
    (per attempt: the last word on a thread wins)."""

    pull: dict[str, Any]  # get_pull_request's answer
    threads: dict[int, dict[str, Any]]  # the threads to answer, by the id of their first comment
    said: dict[int | None, dict[int, dict[str, Any]]] = field(default_factory=dict)

    @property
    def number(self) -> int:
        return self.pull["number"]

    @property
    def branch(self) -> str:
        return head_branch(self.pull)

    def brief(self, prompt: str) -> str:
        """The request of a follow-up: the pull request and its threads framed as untrusted, then `prompt`."""
        pull, number = self.pull, self.number
        parts = [f"This run follows up pull request #{number} ({pull.get('url')}): its branch {self.branch} is "
                 f"checked out in the sandbox at {pull['head_sha']}, and the changes made now will be committed on "
                 "top of it as a new commit. The pull request, as its author wrote it:",
                 frame(f"pull request #{number} by @{pull.get('author') or 'unknown'}",
                       fit(f"{pull.get('title', '')}\n\n{pull.get('body') or ''}", TEXT_CHARS))]
        if self.threads:
            parts.append(f"Review threads not yet addressed ({len(self.threads)}). The agent that changes the code "
                         f"answers each with {REPLY_TOOL}: its comment_id, addressed true and a short reply saying "
                         "what changed, or addressed false and why not. The replies are posted once the changes "
                         "are committed.")
            parts += [self._thread(t) for t in self.threads.values()]
        parts += [_request(prompt, "address the review threads above."), NOTE]
        return "\n\n".join(parts)

    @staticmethod
    def _thread(thread: dict[str, Any]) -> str:
        text = thread["body"] + "".join(
            f"\n\nReply by @{r.get('author') or 'unknown'}{' (Tiny Backspace)' if r.get('ours') else ''}:\n"
            f"{r['body']}" for r in thread.get("replies") or [])
        source = f"review thread {thread['id']} by @{thread.get('author') or 'unknown'} on {_where(thread)}"
        return f"Thread comment_id={thread['id']} on {_where(thread)}:\n" + frame(source, fit(text, TEXT_CHARS))

    def tools(self) -> tuple[OwnTool, ...]:
        """`reply_to_thread`, for the threads to answer; none when there are none."""
        if not self.threads:
            return ()
        spec = {
            "name": REPLY_TOOL,
            "description": "Say how you dealt with a review thread of the pull request: addressed (your changes do "
                           "what it asks) with a short reply saying what changed, or not addressed and why. The run "
                           "posts the replies of addressed threads after it commits your changes; a later call for "
                           "the same thread replaces the earlier one.",
            "input_schema": {
                "type": "object",
                "properties": {
                    "comment_id": {"type": "integer", "enum": list(self.threads),
                                   "description": "The thread's comment_id, as the brief gives it."},
                    "addressed": {"type": "boolean"},
                    "reply": {"type": "string", "minLength": 1, "maxLength": REPLY_CHARS,
                              "description": "What changed (addressed), or why not (not addressed)."},
                },
                "required": ["comment_id", "addressed", "reply"],
            },
        }
        return (OwnTool(spec, self.record),)

    def record(self, arguments: dict[str, Any], attempt: int | None) -> str:
        """Keep what an agent said of a thread."""
        thread_id = arguments["comment_id"]
        self.said.setdefault(attempt, {})[thread_id] = {"addressed": arguments["addressed"],
                                                        "reply": arguments["reply"].strip()}
        kind = "addressed" if arguments["addressed"] else "not addressed"
        return (f"Recorded: thread {thread_id} ({_where(self.threads[thread_id])}) {kind}. "
                + ("The reply is posted once the changes are committed." if arguments["addressed"] else
                   "It is reported as not addressed; no reply is posted."))

    async def answer(self, github: GithubCall, repo: str, events: EventLog, timeout: float, attempt: int | None,
                     commit: str | None, why_not: str | None = None) -> AsyncIterator[Event]:
        """Reply in each thread the agents of `attempt` addressed, naming `commit` (None: nothing changed), then
        report the threads left as they were. With `why_not` (the changes did not reach the pull request), no reply
        goes: that is why."""
        said = self.said.get(attempt, {})
        replied: list[int] = []
        left: list[dict[str, Any]] = []
        for thread_id, thread in self.threads.items():
            word = said.get(thread_id)
            why = (why_not if why_not else "no agent answered it" if word is None else
                   None if word["addressed"] else f"not addressed: {word['reply']}")
            if why is None:
                done = (f"Changed in commit {commit}." if commit else
                        "This run changed no file, so no commit goes with this reply.")
                args = {"repo": repo, "number": self.number, "comment_id": thread_id,
                        "body": f"{word['reply']}\n\n{done}"}
                try:
                    result = await github.call("github", "reply_to_review_comment", args, timeout)
                    why = f"the reply could not be posted: {result_text(result)}" if result.is_error else None
                except TimeoutError:
                    why = f"the reply could not be posted within {timeout:g} s"
                except ServerUnavailable as exc:
                    why = f"the reply could not be posted: {exc}"
            if why is None:
                replied.append(thread_id)
                posted = result.structured_content or {}
                yield events("review_reply", pull_request=self.number, thread=thread_id, path=thread["path"],
                             line=thread.get("line"), url=posted.get("url"), commit=commit, reply=word["reply"])
            else:
                left.append({"thread": thread_id, "path": thread["path"], "line": thread.get("line"),
                             "url": thread.get("url"), "reason": why})
        yield events("follow_up", pull_request=self.number, url=self.pull.get("url"), branch=self.branch,
                     commit=commit, replied=replied, not_addressed=left)
