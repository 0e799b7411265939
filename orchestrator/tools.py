"""The tools a run hands the model: MCP tools as `<server>_<tool>`, with the run's own arguments bound.

The model never sees `sandbox_id`, `repo` or `from_sha`: the run fills them in, so it cannot pick where it writes.
It never sees `changes` of `commit_changes` either: the run exports them from the sandbox at call time, so every
commit holds the sandbox's state as it is then, on top of the run's last commit to that branch.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from mcp_types import CallToolResult

from common.changeset import Changeset
from common.untrusted import frame

from .mcp_pool import ServerUnavailable, ToolPool
from .output import LiveOutput, cut

TAIL_CHARS = 2000  # of a command's output, kept as evidence of how it ended
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# Sandbox lifecycle belongs to the run, not the model; so do what the run says on the forge in its own name
# (replies, answers) and what only people (through the page or the CLI) or the webhook do.
HIDDEN = {("sandbox", "create_sandbox"), ("sandbox", "destroy_sandbox"),
          *(("github", name) for name in ("reply_to_review_comment", "comment_on_issue", "edit_issue_comment",
                                          "add_review_comment", "get_permission", "delete_branch"))}

# What the model reads of the forge: people's words (cleaned by the github server), framed as untrusted data.
FORGE_READS = {"get_issue", "get_pull_request", "list_pull_requests"}


@dataclass
class ToolOutput:
    text: str
    is_error: bool = False
    data: Any = None
    final: bool = False  # the agent's work is handed over: its loop ends after this turn


class ToolSet(Protocol):
    def specs(self) -> list[dict[str, Any]]: ...
    async def call(self, name: str, arguments: dict[str, Any], call_id: str = "") -> ToolOutput: ...


def result_text(result: CallToolResult) -> str:
    parts = [getattr(block, "text", None) or f"[{block.type} content]" for block in result.content]
    if parts:
        return "\n".join(parts)
    return json.dumps(result.structured_content) if result.structured_content else "(no output)"


@dataclass
class PullRequestSeen:
    number: int
    url: str
    head: str
    draft: bool = False
    branch: str = ""  # the branch it was opened from, as named to open_pull_request (`head` may be owner:branch)


@dataclass(frozen=True)
class CommandRun:
    """A command an agent ran in the sandbox, and how it ended."""

    agent: str
    command: str
    exit_code: int
    timed_out: bool
    duration_s: float = 0.0
    tail: str = ""  # the end of its output, stdout then stderr


@dataclass
class RunTools:
    """The MCP tool pool bound to one run's sandbox and repository."""

    pool: ToolPool
    sandbox_id: str
    repo: str
    base_commit: str
    timeout_s: float
    result_chars: int = 30_000
    pull_request: PullRequestSeen | None = None
    output: LiveOutput | None = None  # where the output of a running call goes, live
    attempt: int | None = None  # which of several attempts this sandbox holds; its output events say so
    commands: list[CommandRun] = field(default_factory=list)  # every command that ran, in order: the tests' evidence
    _commits: dict[str, str] = field(default_factory=dict)  # branch -> the last commit this run made on it
    _digests: dict[str, str] = field(default_factory=dict)  # branch -> the digest of the changeset it holds
    _specs: list[dict[str, Any]] | None = None
    _routes: dict[str, tuple[str, str, set[str]]] = field(default_factory=dict)

    def bound(self) -> dict[str, str]:
        return {"sandbox_id": self.sandbox_id, "repo": self.repo, "from_sha": self.base_commit}

    def specs(self) -> list[dict[str, Any]]:
        if self._specs is None:
            self._specs = []
            for server, tools in self.pool.tools().items():
                for tool in tools:
                    name = f"{server}_{tool.name}"
                    if (server, tool.name) in HIDDEN or not NAME.match(name):
                        continue
                    schema = copy.deepcopy(tool.input_schema)
                    props = schema.get("properties", {})
                    hidden = {k for k in (*self.bound(), "changes") if k in props}
                    if server != "github":
                        hidden.discard("changes")
                    for key in hidden:
                        props.pop(key)
                    schema["required"] = [r for r in schema.get("required", []) if r not in hidden]
                    self._routes[name] = (server, tool.name, hidden)
                    self._specs.append({"name": name, "description": tool.description or name,
                                        "input_schema": schema})
        return self._specs

    async def call(self, name: str, arguments: dict[str, Any], call_id: str = "", agent: str = "agent"
                   ) -> ToolOutput:
        """Call a tool for `agent`; every failure it can act on comes back as an error result. What the call prints
        while it runs streams as `output` events naming `call_id`."""
        self.specs()
        route = self._routes.get(name)
        if route is None:
            known = ", ".join(s["name"] for s in self.specs())
            return ToolOutput(f"unknown tool {name!r}; the tools are: {known}", is_error=True)
        server, tool, hidden = route
        if not isinstance(arguments, dict):
            return ToolOutput("tool input must be a JSON object", is_error=True)
        args = {k: v for k, v in arguments.items() if k not in hidden}
        args.update({k: v for k, v in self.bound().items() if k in hidden})
        try:
            if "changes" in hidden:
                args["changes"] = await self.changes_for(str(args.get("branch", "")))
            started = time.monotonic()
            where = {"agent": agent, "id": call_id} | ({"attempt": self.attempt} if self.attempt else {})
            with (self.output.stream(tool, **where) if self.output else contextlib.nullcontext()) as on_progress:
                result = await self.pool.call(server, tool, args, self.timeout_s, on_progress)
        except TimeoutError:
            return ToolOutput(f"{name} did not answer within {self.timeout_s:g} s and was abandoned", is_error=True)
        except ToolFailed as exc:
            return ToolOutput(str(exc), is_error=True)
        self._observe(server, tool, args, result, agent, time.monotonic() - started)
        text = cut(result_text(result), self.result_chars)
        if server == "github" and tool in FORGE_READS and not result.is_error:
            text = frame(f"github {tool}: what people wrote on the forge", text)  # data, never instructions
        return ToolOutput(text, result.is_error, result.structured_content)

    async def export(self) -> dict[str, Any]:
        """The sandbox's changes since the base commit: `changeset` and `diff`."""
        try:
            exported = await self.pool.call("sandbox", "export_changes", {"sandbox_id": self.sandbox_id},
                                            self.timeout_s)
        except TimeoutError:
            raise ToolFailed(f"exporting the sandbox's changes took longer than {self.timeout_s:g} s") from None
        if exported.is_error or not exported.structured_content:
            raise ToolFailed(f"could not export the sandbox's changes: {result_text(exported)}")
        return exported.structured_content

    async def changes_for(self, branch: str, changeset: dict[str, Any] | None = None) -> dict[str, Any]:
        """The sandbox's changes against the base commit (`changeset` when the caller just exported them), to commit
        on top of this run's last commit to `branch` when there is one (its `parent`)."""
        changeset = dict(changeset) if changeset is not None else (await self.export())["changeset"]
        # Against the base, not the last commit: a file added, committed, then deleted leaves the next commit too.
        changeset["parent"] = self._commits.get(branch)
        return changeset

    async def sync_pull_request(self, message: str, changeset: dict[str, Any]) -> str | None:
        """Bring the pull request an agent opened up to the sandbox's state, `changeset` (just exported): when they
        differ, commit that state on its branch as a new commit. None when they match afterwards (or there is no
        pull request), else why they do not, for the user. What the run reports itself (a secret refused, the
        github server gone) is raised."""
        if self.pull_request is None:
            return None
        branch = self.pull_request.branch or self.pull_request.head
        if branch not in self._commits:
            return f"its branch {branch!r} holds no commit of this run, so the run cannot bring it up to date"
        changes = await self.changes_for(branch, changeset)
        if Changeset.model_validate(changes).digest() == self._digests.get(branch):
            return None
        args = {"repo": self.repo, "branch": branch, "message": message, "changes": changes}
        try:
            result = await self.pool.call("github", "commit_changes", args, self.timeout_s)
        except TimeoutError:
            return f"committing the last changes to {branch!r} took longer than {self.timeout_s:g} s"
        if result.is_error:
            return f"the last changes could not be committed to {branch!r}: {result_text(result)}"
        self._observe("github", "commit_changes", args, result, "run", 0.0)
        return None

    def last_run(self, command: str, agent: str | None = None) -> CommandRun | None:
        """The last run of `command` in the sandbox (compared as written, less outer whitespace), by `agent` when
        given; None if none ran."""
        command = command.strip()
        return next((c for c in reversed(self.commands)
                     if c.command.strip() == command and agent in (None, c.agent)), None)

    def _observe(self, server: str, tool: str, args: dict[str, Any], result: CallToolResult, agent: str,
                 duration_s: float) -> None:
        data = result.structured_content or {}
        if result.is_error:
            return
        if server == "sandbox" and tool == "exec" and isinstance(data.get("exit_code"), int):
            output = f"{data.get('stdout') or ''}\n{data.get('stderr') or ''}"
            self.commands.append(CommandRun(agent, str(args.get("command", "")), data["exit_code"],
                                            bool(data.get("timed_out")), round(duration_s, 3),
                                            output[-TAIL_CHARS:]))
        if server != "github":
            return
        if tool == "commit_changes" and data.get("sha"):
            self._commits[args["branch"]] = data["sha"]
            self._digests[args["branch"]] = Changeset.model_validate(args["changes"]).digest()
        elif tool == "open_pull_request":
            self.saw_pull_request(data, args.get("head", ""))

    def saw_pull_request(self, data: dict[str, Any], head: str) -> None:
        """Remember the run's pull request, from the result of `open_pull_request`."""
        if data.get("url"):
            self.pull_request = PullRequestSeen(int(data.get("number", 0)), data["url"], data.get("head", head),
                                                bool(data.get("draft", False)), branch=head)


class ToolFailed(Exception):
    """A failure inside a composite tool call, reported to the model as an error result."""


async def call_all(tools: ToolSet, calls: list[dict[str, Any]]) -> list[ToolOutput]:
    """Run the tool calls of one turn concurrently; a raised error becomes an error result carrying its type."""

    async def one(call: dict[str, Any]) -> ToolOutput:
        try:
            return await tools.call(call["name"], call.get("input") or {}, call["id"])
        except ServerUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - the model reads it, as in the SDK's tool runner
            return ToolOutput(repr(exc), is_error=True)

    return list(await asyncio.gather(*(one(c) for c in calls)))
