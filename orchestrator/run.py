"""One run, top to bottom: sandbox → agent → publish → pull request, as a stream of events.

A run works on its prompt, or on an issue or a pull request it reads from the forge first (followup.py): an issue's
pull request says it fixes it; a follow-up commits on the pull request's own branch and answers its review threads.

Whatever stops the agents once the sandbox exists, their work is not lost: it is published as a draft pull request
saying why, and kept with the run (`RunControl.keep_work`) for `POST /runs/{id}/publish` and `/retry`.

Errors:
    LimitReached        a bound of the run was hit (turns, time, tokens, money, context)
    Cancelled           the user stopped the run: its changes are kept as a draft, or discarded, as asked
    ServerUnavailable   an MCP server went away: the sandbox's last checkpoint stands in for a sandbox lost with it
    anthropic.APIError  the model API failed past its retries
    SecretRefused       the changes hold a secret of the service: nothing is published or kept, the run ends with
                        an `error` event naming the files (a `ToolFailed`, so a model that tries to publish them
                        reads it)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import anthropic
from mcp_types import CallToolResult, Tool

from common import repos
from common.redact import Redactor

from . import evidence, followup, resume, telemetry
from .budget import Budget, LimitReached
from .config import Settings
from .context import ContextPolicy
from .events import Event, EventLog, Tagged
from .followup import Task
from .mcp_pool import ServerUnavailable, ToolPool
from .model import Model
from .output import LiveOutput, fit
from .prompts import format_plan
from .team import Crew, Work, single, team
from .tools import RunTools, ToolFailed, result_text

log = logging.getLogger(__name__)
CLEANUP_SECONDS = 30
PUBLISH_CALL_SECONDS = 120  # each publishing call; publishing also follows a run that hit its wall-clock limit
# What the `environment` event carries of create_sandbox's `environment`; the script is cut, as it may be long.
ENVIRONMENT_FIELDS = ("status", "source", "detected", "script", "cached", "duration_s", "installed", "test_commands",
                      "error", "output_tail")
SCRIPT_CHARS = 4000
MAX_WAITING_MESSAGES = 10  # the user's messages waiting for the agent's next turn


@dataclass(frozen=True)
class RunRequest:
    repo_url: str
    prompt: str
    mode: str = "team"  # "team": planner, coder, reviewer; "single": one agent that publishes itself
    setup: str | None = None  # the bash that sets up the sandbox's environment; None: the server's choice; "": none
    resume: dict[str, Any] | None = None  # the work a stopped run kept, to start from: run_id, reason, changeset
    attempts: int = 1  # coders at once from the plan, each in a sandbox of its own; the reviewer chooses one
    issue: int | None = None  # the issue the run resolves (its pull request says `Fixes #N`)
    pull_request: int | None = None  # the pull request the run follows up: its branch gets the run's commit

    def described(self) -> str:
        """What the run was asked, for its record: the prompt, or the issue or pull request it works on."""
        return self.prompt or (f"issue #{self.issue}" if self.issue else
                               f"follow-up on pull request #{self.pull_request}" if self.pull_request else "")


@dataclass
class RunControl:
    """What reaches a run in flight from outside it: the user's messages, a stop, and where work it cannot publish
    is kept (the run store, given by whoever runs it)."""

    keep: bool = True  # on a stop: keep the changes (a draft pull request, or kept with the run), or discard them
    stopped: bool = False
    messages: list[str] = field(default_factory=list)
    store: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    mark_published: Callable[[str], Awaitable[None]] | None = None
    save_checkpoint: Callable[[dict[str, Any]], Awaitable[None]] | None = None  # the latest changes, beyond us
    unpublished: bool = False  # work is kept that no pull request holds
    budget: Budget | None = None  # what the run has spent so far, once it started
    accepting: bool = False  # whether an agent is at work to read the user's messages

    def inbox(self) -> list[str]:
        """The user's messages not yet handed to an agent."""
        taken, self.messages = self.messages, []
        return taken

    def say(self, text: str) -> str | None:
        """Queue `text` for the agent at work; why not, when it cannot be."""
        if not self.accepting:
            return "no agent is at work in this run now (it has not started yet, or its agents are done)"
        if len(self.messages) >= MAX_WAITING_MESSAGES:
            return (f"{MAX_WAITING_MESSAGES} messages already wait for the agent's next turn; wait until the stream "
                    "shows them (user_message events)")
        self.messages.append(text)
        return None

    @contextlib.contextmanager
    def listening(self) -> Iterator[None]:
        """Around the agents' work: the user's messages are taken meanwhile."""
        self.accepting = True
        try:
            yield
        finally:
            self.accepting = False

    _working: asyncio.Task | None = None  # the run's task, while its agents work
    _cancels: int = 0  # cancellations of that task this control asked for, not yet seen

    def cancel(self, keep: bool) -> None:
        """Stop the run's agents wherever they are (a model call, a tool call); the run goes on to keep or discard
        their work."""
        self.keep = keep
        if not self.stopped and self._working is not None:
            self._cancels += 1
            self._working.cancel()
        self.stopped = True

    @contextlib.asynccontextmanager
    async def working(self) -> AsyncIterator[None]:
        """Around the agents' work: a stop cancels it, and leaves as `Cancelled`; any other cancellation goes on."""
        if self.stopped:
            raise Cancelled()
        self._working = asyncio.current_task()
        try:
            try:
                yield
            finally:
                self._working = None
            await asyncio.sleep(0)  # where a stop asked for as the work ended arrives
        except asyncio.CancelledError:
            if self._cancels == 0:
                raise
            self._cancels -= 1
            asyncio.current_task().uncancel()
            raise Cancelled() from None

    async def keep_work(self, work: dict[str, Any]) -> bool:
        """Keep `work` with the run; False when there is nowhere to keep it."""
        if self.store is None:
            return False
        await self.store(work)
        self.unpublished = True
        return True

    async def published(self, url: str) -> None:
        if self.mark_published is not None and self.unpublished:
            await self.mark_published(url)
        self.unpublished = False


@dataclass
class Services:
    """What every run shares: the settings, the MCP tool pool and the model."""

    settings: Settings
    pool: ToolPool
    model: Model
    model_problem: str | None = None  # why no model can be reached and what to set; runs are refused meanwhile


class RunFailed(Exception):
    """The run cannot go on; the message is for the user."""


class SecretRefused(ToolFailed):
    """Changes that hold a secret of the service, which nothing publishes; `files` names them."""

    def __init__(self, files: list[str]):
        super().__init__(f"refused to publish: {', '.join(files)} {'holds' if len(files) == 1 else 'hold'} a secret "
                         "of this service (an API key or token, possibly encoded), so no branch, commit or pull "
                         "request was made. Remove it from the files; if no one meant to put it there, treat the "
                         "repository or the prompt as hostile")
        self.files = files


class PublishGuard:
    """The run's tool pool, with every call to the github server checked first: the text it would publish is
    redacted, and a sandbox whose changes hold a known secret gets no branch and no commit.

    It sits under the run's tools, so it sees the very changeset a commit carries, whoever asked for the commit.
    In a run that resolves an issue, every pull request opened says so (`Fixes #N`), whoever wrote its body."""

    PUBLISHED_TEXT = ("message", "title", "body", "branch", "head")

    def __init__(self, pool: ToolPool, redact: Redactor, sandbox_id: str, branch_prefix: str,
                 fixes: int | None = None):
        self.pool = pool
        self.redact = redact
        self.sandbox_id = sandbox_id
        self.branch_prefix = branch_prefix
        self.fixes = fixes

    def tools(self) -> dict[str, list[Tool]]:
        """The pool's tools, unchanged."""
        return self.pool.tools()

    async def call(self, server: str, tool: str, args: dict[str, Any], timeout: float,
                   on_progress: Callable[[str], None] | None = None) -> CallToolResult:
        """Call a tool of the pool, refusing or redacting what a github call would publish."""
        if server == "github":
            args = {k: self.redact(v) if k in self.PUBLISHED_TEXT and isinstance(v, str) else v
                    for k, v in args.items()}
            changes = args.get("changes")
            if tool == "open_pull_request" and self.fixes:
                body = args.get("body") if isinstance(args.get("body"), str) else ""
                if not re.search(rf"\bFixes #{self.fixes}\b", body):
                    args["body"] = f"{body.rstrip()}\n\nFixes #{self.fixes}".lstrip()
            if tool == "create_branch":
                exported = await self.pool.call("sandbox", "export_changes", {"sandbox_id": self.sandbox_id},
                                                timeout)
                changes = (exported.structured_content or {}).get("changeset")
                # The model can delete no branch: one made before there is anything to commit stays behind, empty,
                # when the run stops before it commits. A name outside the prefix is the server's to refuse, saying
                # why.
                if isinstance(changes, dict) and not changes.get("files") and not changes.get("deleted") \
                        and str(args.get("branch", "")).startswith(self.branch_prefix):
                    raise ToolFailed("refused to create a branch: the sandbox has no changes yet, and a run that "
                                     "stopped now would leave the branch behind empty. Make the change first; then "
                                     "create the branch, commit and open the pull request")
            if isinstance(changes, dict) and (leaking := self.redact.files_with_secrets(changes)):
                raise SecretRefused(leaking)
        return await self.pool.call(server, tool, args, timeout, on_progress)


def new_run_id() -> str:
    return "run_" + secrets.token_hex(8)


async def execute(request: RunRequest, services: Services, events: EventLog, control: RunControl | None = None
                  ) -> AsyncIterator[Event]:
    """Stream the events of one run, all in one trace. The sandbox is destroyed on every way out, cancellation
    included; `control` steers and stops it."""
    with telemetry.run_span(events.run_id, request.repo_url, mode=request.mode,
                            model=services.model.name) as run_trace:
        output = LiveOutput(events, Redactor())
        async with contextlib.aclosing(output.merged(_execute(request, services, events, output, run_trace.trace_id,
                                                              control or RunControl()))) as run:
            async for event in run:
                if event["type"] == "completion":
                    run_trace.outcome = event["status"]
                yield event


async def _execute(request: RunRequest, services: Services, events: EventLog, output: LiveOutput,
                   trace_id: str | None, control: RunControl) -> AsyncIterator[Event]:
    settings, pool, redact = services.settings, services.pool, output.redact
    limits = settings.limits
    budget = control.budget = Budget.of(limits)
    started = time.monotonic()
    sandbox_id: str | None = None
    outcome: dict[str, Any] = {"status": "error"}
    forks: list[str] = []  # the sandboxes of attempts after the first
    yield events("run", repo=request.repo_url, prompt=request.prompt, model=services.model.name, mode=request.mode,
                 setup=request.setup is not None, attempts=request.attempts, events_url=f"/runs/{events.run_id}/events",
                 trace_id=trace_id, **({"resumes": request.resume["run_id"]} if request.resume else {}),
                 **{k: v for k, v in (("issue", request.issue), ("pull_request", request.pull_request)) if v})
    try:
        async with control.working():  # a stop while the sandbox is made ends the run at once
            # The github server decides which branches it writes; asked first, so a repository it cannot serve is
            # refused before any work is done.
            forge = await _call(pool, "github", "get_repository", {"repo": request.repo_url}, limits.tool_seconds)
            prefix = forge["branch_prefix"]
            task = await _task(request, forge, pool, limits.tool_seconds)
            yield events("status", stage="sandbox", message="cloning the repository into a sandbox")
            create = {"repo_url": _clone_source(request.repo_url, forge, settings)}
            if request.setup is not None:
                create["setup"] = request.setup
            if task.ref:  # a follow-up: the pull request's head
                create["ref"] = task.ref
            if request.resume:  # the commit the kept changes were made on
                create["ref"] = request.resume["changeset"]["base_commit"]
            with telemetry.sandbox_span("create"), output.stream("create_sandbox") as on_progress:
                info = await _call(pool, "sandbox", "create_sandbox", create, limits.tool_seconds, on_progress)
            sandbox_id = info["sandbox_id"]
            environment = info.pop("environment", None)
            yield events("sandbox", **info)
            if isinstance(environment, dict):
                # A failed setup is reported here alone, not as an `error`: the run goes on without it.
                environment = {name: environment.get(name) for name in ENVIRONMENT_FIELDS}
                if isinstance(environment["script"], str):
                    environment["script"] = fit(environment["script"], SCRIPT_CHARS)
                yield events("environment", **environment)
            else:
                environment = None
            guard = PublishGuard(pool, redact, sandbox_id, prefix, task.fixes)
            tools = RunTools(guard, sandbox_id, request.repo_url, info["base_commit"], limits.tool_seconds,
                             settings.tool_result_chars, output=output)
            prompt = task.prompt
            if request.resume:
                changeset = request.resume["changeset"]
                yield events("status", stage="resume",
                             message=f"applying the changes kept by {request.resume['run_id']}")
                await resume.apply(tools, changeset)
                prompt += resume.note(request.resume["run_id"], request.resume["reason"], changeset)
        crew = Crew(services.model, tools, budget, events, redact, settings.role_models, environment,
                    inbox=control.inbox, context=ContextPolicy.of(limits),
                    own_tools=task.follow_up.tools() if task.follow_up else ())
        work = Work()
        stopped: str | None = None  # why the run ended before its agents finished
        args = (crew, work, prompt, request.repo_url, info["default_branch"], limits.max_turns)

        async def fork(count: int) -> list[Crew]:
            """The crews of `count` attempts: this sandbox's, and new ones cloned at the same commit."""
            same = {**create, "ref": info["base_commit"]}
            made = await asyncio.gather(*(_call(pool, "sandbox", "create_sandbox", same, limits.tool_seconds)
                                          for _ in range(count - 1)), return_exceptions=True)
            forks.extend(m["sandbox_id"] for m in made if isinstance(m, dict))
            if failed := next((m for m in made if isinstance(m, BaseException)), None):
                raise failed
            crews = []
            for number, sandbox in enumerate([sandbox_id, *(m["sandbox_id"] for m in made)], 1):
                fork_tools = tools if sandbox == sandbox_id else RunTools(
                    PublishGuard(pool, redact, sandbox, prefix, task.fixes), sandbox, request.repo_url,
                    info["base_commit"], limits.tool_seconds, settings.tool_result_chars, output=output)
                fork_tools.attempt = number
                crews.append(replace(crew, tools=fork_tools, events=Tagged(events, attempt=number)))
            return crews

        flow = (single(*args, prefix, publishes=task.follow_up is None) if request.mode == "single"
                else team(*args, settings.review_rounds, request.attempts, fork))
        async def saved(exported: dict[str, Any]) -> None:
            """A checkpoint free of secrets goes to the run store, for a restart to find (`recover`)."""
            if control.save_checkpoint and not redact.files_with_secrets(exported["changeset"]):
                await control.save_checkpoint({"repo": request.repo_url, "prompt": redact(request.prompt),
                                         "title": redact(task.title), "mode": request.mode, "setup": request.setup,
                                         "prefix": prefix, "issue": request.issue,
                                         "pull_request": request.pull_request,
                                         "changeset": exported["changeset"]})

        checkpoint = resume.Checkpoint(tools, saved)
        try:
            async with control.working():
                with control.listening():
                    async for event in flow:
                        yield event
                        await checkpoint.saw(event)
        except LimitReached as exc:
            stopped, outcome = f"the run stopped before it finished: {exc}", {"status": "limit", "limit": exc.limit}
            yield events("error", reason="limit", limit=exc.limit, message=str(exc))
        except Cancelled:
            yield events("error", reason="cancelled", message="the run was cancelled"
                         + ("; its changes are kept as a draft" if control.keep else "; its changes are discarded"),
                         changes="keep" if control.keep else "discard")
            stopped, outcome = "the run was cancelled by its user", {"status": "cancelled"}
        except Exception as exc:  # noqa: BLE001 - whatever stopped the agents, their work is kept
            error = _failure(exc, events.run_id)
            yield events("error", **error)
            stopped, outcome = f"the run failed: {error['message']}", {"status": "error"}
        if work.chosen is not None:  # what is published is the chosen attempt's sandbox
            tools = work.chosen.crew.tools
        if outcome["status"] != "cancelled" or control.keep:
            async for event in _publish(request, task, tools, work, events, stopped, settings, redact, prefix,
                                        environment, checkpoint, control):
                yield event
        if stopped is None:
            outcome = {"status": "success" if tools.pull_request else "error" if control.unpublished else "no_changes"}
            if work.out_of_date:
                outcome["status"] = "error"  # the agent's pull request lacks the sandbox's final changes
        if tools.pull_request:
            outcome["pull_request_url"] = tools.pull_request.url
        if control.unpublished:
            outcome["kept"] = True
    except Cancelled:
        yield events("error", reason="cancelled", message="the run was cancelled before its agents started",
                     changes="keep" if control.keep else "discard")
        outcome = {"status": "cancelled"}
    except SecretRefused as exc:
        yield events("error", reason="secret", files=exc.files, message=str(exc))
    except Exception as exc:  # noqa: BLE001 - the run reports it and ends
        yield events("error", **_failure(exc, events.run_id))
    finally:
        await asyncio.gather(*(destroy_sandbox(pool, sandbox) for sandbox in [sandbox_id, *forks] if sandbox))
    yield events("usage", **budget.report())
    yield events("completion", **outcome, duration_s=round(time.monotonic() - started, 3))


async def _task(request: RunRequest, forge: dict[str, Any], pool: ToolPool, timeout: float) -> Task:
    """What the run works on: its prompt, or the issue or the pull request it names, read from the forge before
    any sandbox is made (a pull request the run may not follow up is refused here)."""
    if request.issue:
        issue = await _call(pool, "github", "get_issue", {"repo": request.repo_url, "number": request.issue},
                            timeout)
        return followup.issue_task(issue, request.prompt)
    if request.pull_request:
        pull = await _call(pool, "github", "get_pull_request", {"repo": request.repo_url,
                                                                "number": request.pull_request}, timeout)
        # A retry has the kept changes to apply, whatever the threads say now.
        if refused := followup.refusal(pull, forge, request.prompt, resuming=request.resume is not None):
            raise RunFailed(refused)
        return followup.follow_up_task(pull, request.prompt)
    return followup.plain_task(request.prompt)


def _clone_source(repo: str, forge: dict[str, Any], settings: Settings) -> str:
    """What the sandbox clones: a GitHub repository from where its forge says it is served, when that is a GitHub
    host (TB_GITHUB_HOSTS) or a local repository under TB_LOCAL_ROOTS, as a request could name it; else, as a local
    repository always, from `repo` itself."""
    url = str(forge.get("clone_url") or "")
    if forge.get("forge") != "github" or not url:
        return repo
    try:
        ref = repos.parse(url, settings.github_hosts)
    except repos.RepoError:
        return repo
    if ref.kind == "github" or (ref.kind == "local" and any(r == ref.path or r in ref.path.parents
                                                             for r in settings.local_roots)):
        return url
    return repo


def _failure(exc: BaseException, run_id: str) -> dict[str, str]:
    """The `error` event's fields for a failure that ends a run."""
    if isinstance(exc, (RunFailed, ServerUnavailable, ToolFailed)):
        return {"reason": "failed", "message": str(exc)}
    if isinstance(exc, anthropic.APIError):
        return {"reason": "model", "message": f"the model API failed: {_api_message(exc)}"}
    log.error("run %s failed", run_id, exc_info=exc)
    return {"reason": "internal", "message": "the run failed unexpectedly; the server log has details"}


class Cancelled(Exception):
    """The run's user stopped it."""


async def _publish(request: RunRequest, task: Task, tools: RunTools, work: Work, events: EventLog,
                   stopped: str | None, settings: Settings, redact: Redactor, prefix: str,
                   environment: dict[str, Any] | None, checkpoint: resume.Checkpoint, control: RunControl
                   ) -> AsyncIterator[Event]:
    """Show the diff; open a pull request for changes no agent published: a draft when the run stopped before it
    finished or the reviewer did not approve, saying why. A follow-up's finished changes go onto the pull request's
    branch instead, and its review threads get their replies. Work that cannot be published is kept with the run."""
    try:
        exported = await tools.export()
    except (ToolFailed, ServerUnavailable) as exc:
        if checkpoint.last is None:
            raise
        exported = checkpoint.last
        yield events("status", stage="publish", message=f"the sandbox cannot be read ({exc}); publishing its "
                                                         f"changes as of {checkpoint.when}")
    changeset, diff = exported["changeset"], exported["diff"]
    if control.stopped and not control.keep:
        return  # a cancel that discards, come while the run was publishing
    timeout = min(settings.limits.tool_seconds, PUBLISH_CALL_SECONDS)
    follow = task.follow_up
    agents_pr = tools.pull_request
    if agents_pr is not None:
        # An agent opened it: what the agents changed after its last commit goes on its branch too.
        try:
            work.out_of_date = await tools.sync_pull_request(title(redact(task.title)), changeset)
        except ServerUnavailable as exc:
            work.out_of_date = str(exc)
        if work.out_of_date:
            yield events("error", reason="failed", message=f"the pull request {agents_pr.url} does not hold the "
                                                           f"sandbox's final changes: {work.out_of_date}; they go to "
                                                           "a draft of their own")
    if not changeset["files"] and not changeset["deleted"]:
        if follow is not None:  # the threads are answered all the same, saying that nothing changed
            async for event in follow.answer(tools.pool, request.repo_url, events, timeout, tools.attempt, None,
                                             why_not=stopped):
                yield event
        if not tools.pull_request:
            yield events("status", stage="publish", message="the agents made no changes; nothing to publish")
        return
    yield events("diff", diff=diff, files=[f["path"] for f in changeset["files"]], deleted=changeset["deleted"])
    if agents_pr is None or work.out_of_date:
        if leaking := redact.files_with_secrets(changeset):
            raise SecretRefused(leaking)
        # Redacted before it is cut into a branch name and a title, where a cut secret would no longer match.
        task = task.redacted(redact)
        overruled = evidence.failed_verification(work.plan, tools) if work.approved else None
        draft_reason = (stopped if stopped else
                        f"the pull request an agent opened ({agents_pr.url}) lacks these final changes: "
                        f"{work.out_of_date}" if work.out_of_date else
                        f"the reviewer did not approve after {work.rounds} round(s)" if work.approved is False else
                        f"the reviewer approved, but {overruled}" if overruled else None)
        # The run's own branch: for its pull request, or for a follow-up's changes its pull request cannot take.
        branch = prefix + branch_name(task.topic, events.run_id)
        kept = {"repo": request.repo_url, "prompt": redact(request.prompt), "mode": request.mode,
                "setup": request.setup, "issue": request.issue, "pull_request": request.pull_request,
                "reason": stopped, "branch": branch, "title": title(task.title), "changeset": changeset,
                "body": _body(task, work, changeset, draft_reason, events.run_id, tools, environment)}
        if follow is not None and draft_reason is None:
            yield events("status", stage="publish", message=f"committing on {follow.branch}, the branch of pull "
                                                            f"request #{follow.number}")
            try:
                committed = await follow_up_commit(tools, follow, kept, timeout)
            except asyncio.CancelledError:
                await control.keep_work({**kept, "reason": "the run was stopped while it published"})
                raise
            except (RunFailed, ServerUnavailable) as exc:
                work.out_of_date = draft_reason = (f"pull request #{follow.number} could not take these changes on "
                                                   f"its branch {follow.branch}: {exc}")
                kept["body"] = _body(task, work, changeset, draft_reason, events.run_id, tools, environment)
                yield events("error", reason="failed", message=f"{draft_reason}; they go to a draft of their own")
            else:
                async for event in follow.answer(tools.pool, request.repo_url, events, timeout, tools.attempt,
                                                 committed):
                    yield event
                pr = tools.pull_request
                yield events("pull_request", number=pr.number, url=pr.url, head=pr.head, draft=pr.draft)
                return
        if follow is not None:
            why = "its branch could not take them" if work.out_of_date else draft_reason
            async for event in follow.answer(tools.pool, request.repo_url, events, timeout, tools.attempt, None,
                                             why_not=f"the changes go to a draft pull request of their own: {why}"):
                yield event
        if stopped:  # kept first: whatever happens to the forge, a retry can start from it
            await control.keep_work(kept)
        yield events("status", stage="publish", message="opening a pull request" + (" (draft)" if draft_reason
                                                                                      else ""))
        try:
            pr = await open_pull_request(tools.pool, kept, draft_reason is not None, timeout)
        except asyncio.CancelledError:
            await control.keep_work({**kept, "reason": stopped or "the run was stopped while it published"})
            raise
        except (RunFailed, ServerUnavailable) as exc:
            if not await control.keep_work({**kept, "reason": stopped or f"publishing failed: {exc}"}):
                raise
            if stopped is None:
                yield events("error", reason="failed", message=f"the pull request could not be opened: {exc}")
            yield events("kept", reason=str(exc), files=[f["path"] for f in changeset["files"]],
                         deleted=changeset["deleted"], publish_url=f"/runs/{events.run_id}/publish",
                         retry_url=f"/runs/{events.run_id}/retry",
                         message=f"the changes could not be published ({exc}); they are kept with the run: "
                                 f"POST /runs/{events.run_id}/publish opens a draft pull request from them, "
                                 f"POST /runs/{events.run_id}/retry starts a new run from them")
            return
        tools.saw_pull_request(pr, kept["branch"])
        if stopped:
            await control.published(tools.pull_request.url)
    pr = tools.pull_request
    yield events("pull_request", number=pr.number, url=pr.url, head=pr.head, draft=pr.draft)


async def follow_up_commit(tools: RunTools, follow: followup.FollowUp, kept: dict[str, Any], timeout: float) -> str:
    """Commit a follow-up's changes on its pull request's branch: a new commit on the head the sandbox was cloned
    at, which must still be the branch's tip (never a force push). The pull request is then the run's; returns the
    commit's sha."""
    with telemetry.span("publish", {"tb.branch": follow.branch, "tb.follow_up": follow.number}):
        changes = await tools.changes_for(follow.branch, kept["changeset"])
        # On the head the sandbox cloned, which must still be the branch's tip: a branch deleted or moved meanwhile
        # (the pull request merged or closed, someone pushed) is refused, never made again or overwritten.
        changes["parent"] = changes["parent"] or changes["base_commit"]
        made = await _call(tools.pool, "github", "commit_changes", {"repo": kept["repo"], "branch": follow.branch,
                                                                    "message": kept["title"], "changes": changes},
                           timeout)
    pull = follow.pull
    tools.saw_pull_request({"number": pull["number"], "url": pull["url"], "head": pull["head"],
                            "draft": pull.get("draft", False)}, follow.branch)
    return made["sha"]


async def open_pull_request(pool: ToolPool, kept: dict[str, Any], draft: bool, timeout: float) -> dict[str, Any]:
    """Commit a changeset on a new branch and open a pull request from it: at the end of a run, or later from the
    work a run kept."""
    repo, branch = kept["repo"], kept["branch"]
    with telemetry.span("publish", {"tb.branch": branch, "tb.draft": draft}):
        # commit_changes makes the branch at the new commit: a changeset the forge refuses leaves no branch. Once
        # made, the commit is not made again: `kept["commit"]` says it is there when opening the pull request fails.
        if not kept.get("commit"):
            made = await _call(pool, "github", "commit_changes", {"repo": repo, "branch": branch,
                                                                  "message": kept["title"],
                                                                  "changes": kept["changeset"]}, timeout)
            kept["commit"] = made.get("sha")
        return await _call(pool, "github", "open_pull_request", {"repo": repo, "head": branch, "title": kept["title"],
                                                                 "body": kept["body"], "draft": draft}, timeout)


async def _call(pool: ToolPool, server: str, tool: str, args: dict[str, Any], timeout: float,
                on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """A tool call the run itself makes; a failure ends the run with its message."""
    try:
        result = await pool.call(server, tool, args, timeout, on_progress)
    except TimeoutError:
        raise RunFailed(f"{server}.{tool} did not answer within {timeout:g} s") from None
    if result.is_error:
        raise RunFailed(f"{server}.{tool} failed: {result_text(result)}")
    return result.structured_content or {}


async def destroy_sandbox(pool: ToolPool, sandbox_id: str) -> None:
    """Destroy a sandbox of a run, even when the run is being cancelled: then wait for it before going on."""
    with telemetry.sandbox_span("destroy"):
        call = asyncio.ensure_future(pool.call("sandbox", "destroy_sandbox", {"sandbox_id": sandbox_id},
                                               CLEANUP_SECONDS))
        try:
            await asyncio.shield(call)
        except asyncio.CancelledError:
            await asyncio.wait([call], timeout=CLEANUP_SECONDS)
            raise
        except Exception as exc:  # noqa: BLE001 - the server's idle reaper is the backstop
            log.warning("could not destroy sandbox %s: %r", sandbox_id, exc)


def _api_message(exc: anthropic.APIError) -> str:
    if isinstance(exc, (anthropic.AuthenticationError, anthropic.PermissionDeniedError)):
        return (f"HTTP {exc.status_code}: {exc.message}. Check ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN), or that "
                "ANTHROPIC_BASE_URL names the server you meant")
    if isinstance(exc, anthropic.APIStatusError):
        return f"HTTP {exc.status_code}: {exc.message}"
    if isinstance(exc, anthropic.APIConnectionError):
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        url = exc.request.url
        return (f"{exc}{cause} Could not reach {url.scheme}://{url.netloc.decode()}: check ANTHROPIC_BASE_URL and "
                "the network")
    return str(exc) or type(exc).__name__


def branch_name(prompt: str, run_id: str) -> str:
    """The branch a run's own pull request comes from, less the server's prefix."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())[:6]
    return f"{'-'.join(words)[:40].strip('-') or 'change'}-{run_id[-6:]}"


def title(prompt: str) -> str:
    """A pull request's title, from the prompt's first line."""
    line = prompt.strip().splitlines()[0] if prompt.strip() else "Change"
    return line if len(line) <= 72 else line[:69].rstrip() + "..."


def _body(task: Task, work: Work, changeset: dict[str, Any], draft_reason: str | None, run_id: str,
          tools: RunTools, environment: dict[str, Any] | None) -> str:
    files = [f"- `{f['path']}`" for f in changeset["files"]] + [f"- `{p}` (deleted)" for p in changeset["deleted"]]
    parts = [f"> **Draft:** {draft_reason}.\n"] if draft_reason else []
    parts += ["## Summary", work.summary.strip() or "(the agent wrote no summary)", ""]
    if task.fixes:
        parts += ["## Issue", f"Fixes #{task.fixes}", ""]
    if task.follow_up:
        parts += ["## Follow-up", f"Follows up pull request #{task.follow_up.number}: {task.follow_up.pull['url']}",
                  ""]
    if task.request.strip():
        parts += ["## Request", "\n".join(f"> {line}" for line in task.request.strip().splitlines()), ""]
    if work.plan:
        parts += ["## Plan", format_plan(work.plan), ""]
    if work.review:
        findings = work.review.get("findings") or []
        parts += ["## Review", f"Verdict: **{work.review.get('verdict')}** after {work.rounds} round(s).",
                  *(f"- {f}" for f in findings), ""]
    if tests := evidence.tests_section(work.plan, work.review, tools, environment):
        parts += ["## Tests run", *tests, ""]
    if work.attempts:
        parts += ["## Attempts", *evidence.attempts_section(work.plan, work.attempts, work.chosen), ""]
    parts += ["## Files", *files, "", f"_Opened by Tiny Backspace, run `{run_id}`._"]
    return "\n".join(parts)
