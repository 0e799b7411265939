"""Roles are data: a system prompt, the tools a role may use, its turn limit, and the tool that ends its work (a
role's model comes from TB_<ROLE>_MODEL, see config.py).

`RoleTools` wraps a run's tools for one role: it filters them (a tool outside the role is refused by the filter,
whatever the prompt says), makes `exec` read-only for roles that must not change the repository, and adds the
role's own `submit_*` tool and the run's own tools the role names (`OwnTool`, such as a follow-up's
`reply_to_thread`), which the orchestrator answers itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from . import prompts
from .tools import RunTools, ToolOutput

READ_TOOLS = frozenset({"sandbox_read_file", "sandbox_list_files", "sandbox_search", "sandbox_exec"})
WRITE_TOOLS = READ_TOOLS | {"sandbox_write_file", "sandbox_edit_file", "sandbox_export_changes"}
# What the forge says of the repository's issues and pull requests; `repo` is bound, as for every github tool.
FORGE_READ_TOOLS = frozenset({"github_get_issue", "github_get_pull_request", "github_list_pull_requests"})
PUBLISH_TOOLS = FORGE_READ_TOOLS | {"github_create_branch", "github_commit_changes", "github_open_pull_request",
                                    "github_get_repository"}
REPLY_TOOL = "reply_to_thread"  # a follow-up's: how the agent that changes the code answers a review thread

SUBMIT_PLAN = {
    "name": "submit_plan",
    "description": "Hand over the plan: the changes to make (file, what, why) and how to verify them. Ends planning.",
    "input_schema": {
        "type": "object",
        "properties": {
            "summary": {"type": "string", "description": "The approach in two or three sentences."},
            "changes": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["file", "what", "why"],
                "properties": {"file": {"type": "string"}, "what": {"type": "string"}, "why": {"type": "string"}}}},
            "verification": {"type": "string", "description": "The commands that show the change works."},
        },
        "required": ["summary", "changes", "verification"],
    },
}
SUBMIT_REVIEW = {
    "name": "submit_review",
    "description": "Hand over the review: approve, or request changes with findings the coder can act on.",
    "input_schema": {
        "type": "object",
        "properties": {
            "verdict": {"type": "string", "enum": ["approve", "request_changes"]},
            "findings": {"type": "array", "items": {"type": "string"},
                         "description": "Each problem found, specific enough to fix; empty when approving."},
            "tests_run": {"type": "array", "items": {
                "type": "object", "required": ["command", "result"],
                "properties": {"command": {"type": "string"}, "result": {"type": "string"}}}},
        },
        "required": ["verdict", "findings", "tests_run"],
    },
}


def submit_choice(numbers: list[int]) -> dict[str, Any]:
    """The tool with which the reviewer chooses one of several attempts (those numbered `numbers`)."""
    return {
        "name": "submit_choice",
        "description": "Choose the attempt to publish, and approve it or request changes to it. Ends the review.",
        "input_schema": {
            "type": "object",
            "properties": {
                "attempt": {"type": "integer", "enum": numbers, "description": "The number of the chosen attempt."},
                "reason": {"type": "string", "description": "Why this one, from what its diff and tests show."},
                "verdict": {"type": "string", "enum": ["approve", "request_changes"]},
                "findings": {"type": "array", "items": {"type": "string"},
                             "description": "What the chosen attempt must fix; empty when approving."},
            },
            "required": ["attempt", "reason", "verdict", "findings"],
        },
    }


@dataclass(frozen=True)
class Role:
    name: str
    system: str
    tools: frozenset[str]
    max_turns: int
    submit: dict[str, Any] | None = None  # the tool that ends this role's work
    read_only: bool = False  # exec runs with the repository mounted read-only


def team_roles(max_turns: int) -> dict[str, Role]:
    return {
        "planner": Role("planner", prompts.PLANNER, READ_TOOLS | FORGE_READ_TOOLS, max(1, max_turns // 2),
                        SUBMIT_PLAN, read_only=True),
        "coder": Role("coder", prompts.CODER, WRITE_TOOLS | {REPLY_TOOL}, max_turns),
        "reviewer": Role("reviewer", prompts.REVIEWER, READ_TOOLS | FORGE_READ_TOOLS, max(1, max_turns // 2),
                         SUBMIT_REVIEW, read_only=True),
    }


def judge_role(max_turns: int, numbers: list[int]) -> Role:
    """The reviewer choosing between attempts: it reads their diffs and test runs in its brief, and has no tools but
    its choice (the reviewer's model and limits apply)."""
    return Role("reviewer", prompts.JUDGE, frozenset(), max(1, max_turns // 2), submit_choice(numbers),
                read_only=True)


def single_role(max_turns: int, branch_prefix: str, publishes: bool = True) -> Role:
    """The one agent of a run: it publishes itself, unless the run publishes (a follow-up on a pull request, whose
    branch the run commits to and whose threads it answers)."""
    if not publishes:
        return Role("agent", prompts.FOLLOW_UP, WRITE_TOOLS | FORGE_READ_TOOLS | {REPLY_TOOL}, max_turns)
    return Role("agent", prompts.system_prompt(branch_prefix), WRITE_TOOLS | PUBLISH_TOOLS, max_turns)


@dataclass(frozen=True)
class OwnTool:
    """A tool the run answers itself rather than an MCP server, offered to the roles whose tools name it.
    `answer(arguments, attempt)` gets input valid against the spec's schema and returns what the model reads; the
    attempt is the number of the sandbox the calling agent works in (None with one attempt)."""

    spec: dict[str, Any]
    answer: Callable[[dict[str, Any], int | None], str]


@dataclass
class RoleTools:
    """The run's tools as one role sees them."""

    base: RunTools
    role: Role
    own: tuple[OwnTool, ...] = ()
    submitted: dict[str, Any] | None = None
    _specs: list[dict[str, Any]] | None = field(default=None, repr=False)

    def specs(self) -> list[dict[str, Any]]:
        if self._specs is None:
            self._specs = []
            for spec in self.base.specs():
                if spec["name"] not in self.role.tools:
                    continue
                if spec["name"] == "sandbox_exec":  # the role decides, not the model
                    spec = copy.deepcopy(spec)
                    spec["input_schema"]["properties"].pop("read_only", None)
                self._specs.append(spec)
            self._specs += [tool.spec for tool in self.own if tool.spec["name"] in self.role.tools]
            if self.role.submit:
                self._specs.append(self.role.submit)
        return self._specs

    async def call(self, name: str, arguments: dict[str, Any], call_id: str = "") -> ToolOutput:
        submit = self.role.submit
        if submit and name == submit["name"]:
            if problem := _invalid(submit, arguments):
                return problem
            self.submitted = arguments
            return ToolOutput(f"{name} recorded.", final=True)
        own = next((t for t in self.own if t.spec["name"] == name and name in self.role.tools), None)
        if own is not None:
            return _invalid(own.spec, arguments) or ToolOutput(own.answer(arguments, self.base.attempt))
        if name not in self.role.tools:
            known = ", ".join(s["name"] for s in self.specs())
            exists = any(s["name"] == name for s in self.base.specs())
            problem = f"{name} is not available to the {self.role.name}" if exists else f"unknown tool {name!r}"
            return ToolOutput(f"{problem}; the tools are: {known}", is_error=True)
        if name == "sandbox_exec":
            arguments = {**arguments, "read_only": self.role.read_only}
        return await self.base.call(name, arguments, call_id, agent=self.role.name)


def _invalid(spec: dict[str, Any], arguments: dict[str, Any]) -> ToolOutput | None:
    """The error result for input that does not fit the spec's schema; None when it fits."""
    problem = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(spec["input_schema"]).iter_errors(
        arguments))
    if problem is None:
        return None
    where = "/".join(str(p) for p in problem.absolute_path) or "the input"
    return ToolOutput(f"{spec['name']} was not recorded: {where}: {problem.message}; call it again, fixed",
                      is_error=True)
