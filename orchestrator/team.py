"""The work of a run: one agent, or a team (planner → coder ⇄ reviewer), each a run of the same agent loop.

Each agent starts from a brief made of the previous agent's output, not from the whole history, so contexts stay
small. What the agents hand over is collected in `Work`, from which the run publishes.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from common.redact import Redactor

from . import prompts, telemetry
from .agent import AgentResult, run_agent
from .budget import Budget, LimitReached
from .context import Context, ContextPolicy, Inbox
from .events import Event, EventLog
from .model import Model
from .roles import Role, RoleTools, single_role, team_roles
from .tools import RunTools


@dataclass
class Work:
    """What the agents handed over."""

    summary: str = ""
    plan: dict[str, Any] | None = None
    review: dict[str, Any] | None = None
    approved: bool | None = None  # None: nobody reviewed
    rounds: int = 0


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


async def run_role(crew: Crew, role: Role, brief: str, result: AgentResult) -> AsyncIterator[Event]:
    """One agent in one role, framed by `agent` events and followed by the run's `usage` so far;
    `result.submitted` holds what it handed over."""
    role_tools = RoleTools(crew.tools, role)
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
                 branch_prefix: str) -> AsyncIterator[Event]:
    """One agent that changes the repository and publishes itself."""
    result = AgentResult()
    async for event in run_role(crew, single_role(max_turns, branch_prefix), prompts.brief(prompt, repo,
                                                                                           default_branch), result):
        yield event
    work.summary = result.final_text


async def team(crew: Crew, work: Work, prompt: str, repo: str, default_branch: str, max_turns: int,
               review_rounds: int) -> AsyncIterator[Event]:
    """Plan, then code and review until the reviewer approves or the rounds run out."""
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
    for work.rounds in range(1, review_rounds + 1):
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
