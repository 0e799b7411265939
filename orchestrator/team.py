"""The work of a run: one agent, or a team (planner → coder ⇄ reviewer), each a run of the same agent loop.

Each agent starts from a brief made of the previous agent's output, not from the whole history, so contexts stay
small. What the agents hand over is collected in `Work`, from which the run publishes.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from common.redact import Redactor

from . import evidence, prompts, telemetry
from .agent import AgentResult, run_agent
from .budget import Budget, LimitReached
from .context import Context, ContextPolicy, Inbox
from .events import Event, EventLog
from .model import Model
from .output import fit
from .roles import OwnTool, Role, RoleTools, judge_role, single_role, team_roles
from .tools import RunTools


@dataclass
class Work:
    """What the agents handed over."""

    summary: str = ""
    plan: dict[str, Any] | None = None
    review: dict[str, Any] | None = None
    approved: bool | None = None  # None: nobody reviewed
    rounds: int = 0
    attempts: list[Attempt] = field(default_factory=list)  # with several attempts: all of them
    chosen: Attempt | None = None  # the one the reviewer chose, whose sandbox is published
    # Why the pull request an agent opened (or the one a follow-up commits to) lacks the sandbox's final changes.
    out_of_date: str | None = None


@dataclass
class Crew:
    """What every agent of a run shares."""

    model: Model
    tools: RunTools
    budget: Budget
    events: EventLog
    redact: Redactor
    role_models: dict[str, str] = field(default_factory=dict)
    environment: dict[str, Any] | None = None  # what create_sandbox set up, for the briefs
    inbox: Inbox | None = None  # what the user says to the run while it works, read by the agent at work
    context: ContextPolicy = field(default_factory=ContextPolicy)
    own_tools: tuple[OwnTool, ...] = ()  # tools the run answers itself, for the roles that name them


async def run_role(crew: Crew, role: Role, brief: str, result: AgentResult) -> AsyncIterator[Event]:
    """One agent in one role, framed by `agent` events and followed by the run's `usage` so far;
    `result.submitted` holds what it handed over."""
    role_tools = RoleTools(crew.tools, role, crew.own_tools)
    model = crew.model
    if role.name in crew.role_models:
        model = copy.copy(model)
        model.name = crew.role_models[role.name]
    if (edit := crew.context.api_edit()) and hasattr(model, "context_edit"):
        model = copy.copy(model)
        model.context_edit = edit
    brief += prompts.environment_note(crew.environment)
    yield crew.events("agent", agent=role.name, state="start", model=model.name)
    with telemetry.agent_span(role.name, model.name, role.system, brief) as span:
        try:
            async for event in run_agent(model, role_tools, role.system, brief, crew.budget, crew.events, result,
                                         max_turns=role.max_turns, redact=crew.redact, agent=role.name,
                                         must_call=role.submit["name"] if role.submit else None,
                                         context=Context(crew.context, role.name, crew.events), inbox=crew.inbox):
                yield event
        except LimitReached:
            yield crew.events("agent", agent=role.name, state="stopped", turns=result.turns,
                              usage=result.usage.as_dict())
            yield crew.events("usage", **crew.budget.report())
            raise
        finally:
            span.set_attribute("tb.agent.turns", result.turns)
        result.submitted = role_tools.submitted
        telemetry.record_content(span, "tb.agent.submitted", result.submitted)
    yield crew.events("agent", agent=role.name, state="end", turns=result.turns, usage=result.usage.as_dict())
    yield crew.events("usage", **crew.budget.report())


async def single(crew: Crew, work: Work, prompt: str, repo: str, default_branch: str, max_turns: int,
                 branch_prefix: str, publishes: bool = True) -> AsyncIterator[Event]:
    """One agent that changes the repository and publishes itself (unless the run publishes: a follow-up)."""
    result = AgentResult()
    role = single_role(max_turns, branch_prefix, publishes)
    async for event in run_role(crew, role, prompts.brief(prompt, repo, default_branch), result):
        yield event
    work.summary = result.final_text


async def team(crew: Crew, work: Work, prompt: str, repo: str, default_branch: str, max_turns: int,
               review_rounds: int, attempts: int = 1, fork: Fork | None = None) -> AsyncIterator[Event]:
    """Plan, then code and review until the reviewer approves or the rounds run out. With several `attempts`, the
    first round is that many coders at once, each in a sandbox of its own (`fork` makes them), and the reviewer
    chooses between them; later rounds go on with the chosen one."""
    roles = team_roles(max_turns)
    planned = AgentResult()
    async for event in run_role(crew, roles["planner"], prompts.planner_brief(prompt, repo, default_branch),
                                planned):
        yield event
    work.plan = planned.submitted
    for change in work.plan["changes"]:
        yield crew.events("planned_change", agent="planner", file=change.get("file"), what=change.get("what"),
                          why=change.get("why"))
    findings: list[str] | None = None
    first = 1
    if attempts > 1 and fork is not None:
        async for event in _attempt_round(crew, work, roles, prompt, attempts, fork, max_turns):
            yield event
        if work.chosen is None or work.approved:
            return
        crew = work.chosen.crew
        findings = [str(f) for f in work.review.get("findings", [])]
        first = 2
    for work.rounds in range(first, review_rounds + 1):
        coded = AgentResult()
        async for event in run_role(crew, roles["coder"], prompts.coder_brief(prompt, work.plan, findings), coded):
            yield event
        work.summary = coded.final_text
        diff = (await crew.tools.export())["diff"]
        if not diff:
            return
        reviewed = AgentResult()
        async for event in run_role(crew, roles["reviewer"],
                                    prompts.reviewer_brief(prompt, work.plan, work.summary, diff), reviewed):
            yield event
        work.review = reviewed.submitted
        work.approved = work.review["verdict"] == "approve"
        if work.approved:
            return
        findings = [str(f) for f in work.review.get("findings", [])]


Fork = Callable[[int], Awaitable[list[Crew]]]  # n crews, one per attempt, each with a sandbox of its own


@dataclass
class Attempt:
    """One of several coders working from the same plan, and what came of it."""

    number: int
    crew: Crew
    summary: str = ""
    diff: str = ""
    files: list[str] = field(default_factory=list)
    stopped: str | None = None  # why its coder stopped before it finished


async def _attempt_round(crew: Crew, work: Work, roles: dict[str, Role], prompt: str, count: int, fork: Fork,
                         max_turns: int) -> AsyncIterator[Event]:
    """`count` coders at once from the same plan, each nudged its own way and followed by its own run of the plan's
    verification; then the reviewer sees them side by side and chooses one."""
    attempts = [Attempt(k, c) for k, c in enumerate(await fork(count), 1)]
    # Their sandboxes, for a replica that adopts the run if this one dies: it removes them.
    yield crew.events("status", stage="attempts", message=f"{count} coders at once, each in a sandbox of its own",
                      sandbox_ids=[a.crew.tools.sandbox_id for a in attempts])
    work.rounds = 1
    async for event in merge([_attempt(a, count, roles, prompt, work.plan) for a in attempts]):
        yield event
    work.attempts = attempts
    if not any(a.diff for a in attempts):
        return
    judged = AgentResult()
    judge = judge_role(max_turns, [a.number for a in attempts if a.diff])
    brief = prompts.judge_brief(prompt, work.plan, [(a.number, a.summary, a.diff, a.stopped,
                                                     evidence.attempt_evidence(work.plan, a.crew.tools))
                                                    for a in attempts])
    async for event in run_role(crew, judge, brief, judged):
        yield event
    choice = judged.submitted
    work.chosen = next(a for a in attempts if a.number == choice["attempt"])
    work.review = {"verdict": choice["verdict"], "findings": choice.get("findings") or [], "tests_run": [],
                   "reason": choice.get("reason", "")}
    work.approved = choice["verdict"] == "approve"
    work.summary = work.chosen.summary
    yield crew.events("attempt_chosen", agent="reviewer", attempt=work.chosen.number, verdict=choice["verdict"],
                      reason=choice.get("reason", ""))


async def _attempt(attempt: Attempt, count: int, roles: dict[str, Role], prompt: str, plan: dict[str, Any]
                   ) -> AsyncIterator[Event]:
    crew = attempt.crew
    coded = AgentResult()
    brief = prompts.coder_brief(prompt, plan) + prompts.attempt_note(attempt.number, count)
    try:
        async for event in run_role(crew, roles["coder"], brief, coded):
            yield event
    except LimitReached as exc:
        if exc.limit != "turns":  # the run's own bounds stop every attempt
            raise
        attempt.stopped = str(exc)
    attempt.summary = coded.final_text
    # Its own test run: the plan's verification, as the orchestrator runs it, read-only.
    for k, command in enumerate(evidence.verification_commands(plan), 1):
        call_id = f"tests_{attempt.number}_{k}"
        yield crew.events("tool_call", agent="tests", id=call_id, name="sandbox_exec", state="complete",
                          input={"command": command})
        out = await crew.tools.call("sandbox_exec", {"command": command, "read_only": True}, call_id, agent="tests")
        yield crew.events("tool_result", agent="tests", id=call_id, name="sandbox_exec", is_error=out.is_error,
                          content=fit(crew.redact(out.text), 4000))
    exported = await crew.tools.export()
    attempt.diff, attempt.files = exported["diff"], [f["path"] for f in exported["changeset"]["files"]]
    deleted = exported["changeset"]["deleted"]
    yield crew.events("diff", diff=exported["diff"], files=attempt.files, deleted=deleted)


async def merge(flows: list[AsyncIterator[Event]]) -> AsyncIterator[Event]:
    """The events of several flows at once, as they come; the first failure stops them all."""
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def pump(flow: AsyncIterator[Event]) -> None:
        try:
            async for event in flow:
                queue.put_nowait(("event", event))
            queue.put_nowait(("done", None))
        except Exception as exc:  # noqa: BLE001 - raised again in the run's task
            queue.put_nowait(("failed", exc))

    tasks = [asyncio.create_task(pump(flow)) for flow in flows]
    try:
        finished = 0
        while finished < len(tasks):
            kind, value = await queue.get()
            if kind == "event":
                yield value
            elif kind == "done":
                finished += 1
            else:
                raise value
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

