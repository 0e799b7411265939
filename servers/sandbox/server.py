"""The sandbox's MCP face: one tool per operation of the contract, each a thin call into a `Sandbox`."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, ParamSpec, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

from common.redact import Redactor, secret_values

from .. import telemetry
from ..toolserver import ToolServer
from .base import Changeset, ExecResult, SandboxError, SandboxInfo
from .environment import DECLARED, MAX_SETUP_CHARS
from .files import MAX_READ_LINES
from .manager import SandboxManager, Settings
from .progress import Relay

P = ParamSpec("P")
R = TypeVar("R")

SandboxId = Annotated[str, Field(description="The id create_sandbox returned.", max_length=200)]
RelPath = Annotated[str, Field(description="A path relative to the repository root, e.g. 'src/app.py'.",
                               max_length=4096)]

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
WRITES = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False)


class Written(BaseModel):
    path: str
    bytes_written: int


class FileList(BaseModel):
    files: list[str]
    truncated: bool = Field(description="True when more files matched than were listed; narrow path or pattern.")


class Matches(BaseModel):
    matches: list[str] = Field(description="One 'path:line: text' entry per matching line.")
    truncated: bool = Field(description="True when more lines matched than were listed; narrow the search.")


class Changes(BaseModel):
    changeset: Changeset
    diff: str = Field(description="A unified diff of the same changes, for reading.")


def _absent(value: object) -> bool:
    return value is None


class Destroyed(BaseModel):
    sandbox_id: str
    destroyed: bool = Field(description="True when this server held the sandbox and destroyed it.")
    # Only for a sandbox this server did not hold (its server died): absent otherwise, as before they existed.
    note: str | None = Field(None, exclude_if=_absent, description="What was done about a sandbox this server did "
                             "not hold.")
    removed: list[str] | None = Field(None, exclude_if=_absent, description="What was left of a sandbox this server "
                                      "did not hold, now removed: Modal sandboxes, folders of this machine.")


def _tool_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn failures the caller can act on into `isError` results that say what to do."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except SandboxError as exc:
            raise ToolError(str(exc)) from None
        except OSError as exc:
            raise ToolError(f"{fn.__name__} failed: {exc.strerror or exc}") from None

    return wrapper


def build_server(settings: Settings | None = None) -> MCPServer:
    """The sandbox MCP server over the backend chosen by `settings` (read from the environment by default)."""
    settings = settings or Settings.from_env()
    manager = SandboxManager(settings)
    # Live output is masked like everything else the server says: its own secrets, and those given to setup alone.
    redactor = Redactor([*secret_values(), *(os.environ[n] for n in settings.setup_env if n in os.environ)])

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[SandboxManager]:
        await manager.reap_orphans()
        reaper = asyncio.create_task(manager.run_reaper())
        try:
            yield manager
        finally:
            reaper.cancel()
            await manager.destroy_all()

    mcp = ToolServer(
        "sandbox",
        instructions=(
            "Isolated copies of git repositories. Call create_sandbox first; pass its sandbox_id to every other "
            "tool. Commands run with no network and no credentials; file paths are relative to the repository root."
        ),
        lifespan=lifespan,
    )

    @mcp.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                                      open_world_hint=True))
    @_tool_errors
    async def create_sandbox(
        repo_url: Annotated[str, Field(description="https URL, owner/name, file:// URL or absolute path of a git "
                                                   "repository.", max_length=2048)],
        ref: Annotated[str | None, Field(description="Branch, tag or commit to check out; the default branch if "
                                                     "omitted.", max_length=250)] = None,
        setup: Annotated[str | None, Field(
            description=f"A bash script that installs what the repository needs into /env (outside the "
                        f"repository), with network access to the package registries only. Omitted: the "
                        f"repository's own {DECLARED}, else one detected from its manifests (Python, Node, Go). "
                        f"An empty string: no setup.", max_length=MAX_SETUP_CHARS)] = None,
        ctx: Context | None = None,
    ) -> SandboxInfo:
        """Clone a repository into a new isolated sandbox, prepare its environment, and return its id, base commit
        and what the environment holds; the setup's output streams as progress notifications."""
        relay = Relay(ctx, redactor)
        try:
            return await manager.create(repo_url, ref, setup, relay)
        finally:
            await relay.close()

    @mcp.tool(name="exec", annotations=WRITES)
    @_tool_errors
    async def run_command(
        sandbox_id: SandboxId,
        command: Annotated[str, Field(description="A bash command line, run with bash -c in the repository root.",
                                      min_length=1, max_length=100_000)],
        timeout_s: Annotated[float, Field(description="Wall-clock limit in seconds; the whole process tree is "
                                                      "killed when it passes.", gt=0, le=600)] = 120,
        workdir: Annotated[str, Field(description="Directory to run in, relative to the repository root.",
                                      max_length=4096)] = ".",
        read_only: Annotated[bool, Field(description="Mount the repository read-only for this command, for "
                                                     "inspection that must change nothing.")] = False,
        ctx: Context | None = None,
    ) -> ExecResult:
        """Run a shell command in the sandbox (no network); a non-zero exit code is a normal result.

        stdout and stderr are each capped at about 30 000 characters, keeping the head and the tail.
        Processes started in the background are killed when the command returns. The output also streams as
        progress notifications while the command runs.
        """
        if not command.strip():
            raise SandboxError("command is empty; give a shell command such as 'ls -la' or 'pytest -q'")
        sandbox = manager.get(sandbox_id)
        attributes = {"tb.sandbox.backend": sandbox.info.backend, "tb.exec.timeout_s": timeout_s,
                      "tb.exec.read_only": read_only}
        relay = Relay(ctx, redactor)
        with telemetry.span("sandbox.exec", attributes) as span:
            try:
                result = await sandbox.exec(command, timeout_s, workdir, read_only, on_output=relay)
            finally:
                await relay.close()
            span.set_attributes({"process.exit.code": result.exit_code, "tb.exec.timed_out": result.timed_out,
                                 "tb.exec.truncated": result.truncated})
        return result

    # Text tools answer text alone: clients show structured content as JSON, escapes and all.
    @mcp.tool(annotations=READ_ONLY, structured_output=False)
    @_tool_errors
    async def read_file(
        sandbox_id: SandboxId,
        path: RelPath,
        offset: Annotated[int, Field(description="First line to read, counted from 1.", ge=1)] = 1,
        limit: Annotated[int, Field(description="Most lines to return.", ge=1, le=MAX_READ_LINES)] = 2000,
    ) -> str:
        """Read a text file with numbered lines; page through long files with offset and limit."""
        return await manager.get(sandbox_id).read_file(path, offset, limit)

    @mcp.tool(annotations=WRITES)
    @_tool_errors
    async def write_file(
        sandbox_id: SandboxId,
        path: RelPath,
        content: Annotated[str, Field(description="The whole new content of the file, as UTF-8 text.")],
    ) -> Written:
        """Create or overwrite a file with the given content, creating parent directories."""
        written = await manager.get(sandbox_id).write_file(path, content)
        return Written(path=path, bytes_written=written)

    @mcp.tool(annotations=WRITES, structured_output=False)
    @_tool_errors
    async def edit_file(
        sandbox_id: SandboxId,
        path: RelPath,
        old_text: Annotated[str, Field(description="Exact text to replace, whitespace included; it must occur once "
                                                   "unless replace_all is set.")],
        new_text: Annotated[str, Field(description="The text to put in its place.")],
        replace_all: Annotated[bool, Field(description="Replace every occurrence of old_text.")] = False,
    ) -> str:
        """Replace text in a file and return a short diff of the edit."""
        return await manager.get(sandbox_id).edit_file(path, old_text, new_text, replace_all)

    @mcp.tool(annotations=READ_ONLY)
    @_tool_errors
    async def list_files(
        sandbox_id: SandboxId,
        path: Annotated[str, Field(description="Directory to list, relative to the repository root.",
                                   max_length=4096)] = ".",
        pattern: Annotated[str | None, Field(description="A glob such as '*.py' or 'src/**/test_*.py'.",
                                             max_length=500)] = None,
    ) -> FileList:
        """List the files under a directory, leaving out .git and what .gitignore ignores."""
        found, truncated = await manager.get(sandbox_id).list_files(path, pattern)
        return FileList(files=found, truncated=truncated)

    @mcp.tool(annotations=READ_ONLY)
    @_tool_errors
    async def search(
        sandbox_id: SandboxId,
        pattern: Annotated[str, Field(description="A regular expression, e.g. 'def \\w+_handler'.", max_length=1000)],
        path: Annotated[str, Field(description="Directory to search, relative to the repository root.",
                                   max_length=4096)] = ".",
        glob: Annotated[str | None, Field(description="Only files matching this glob, e.g. '*.py'.",
                                          max_length=500)] = None,
    ) -> Matches:
        """Find the lines that match a regular expression, as 'path:line: text'."""
        found, truncated = await manager.get(sandbox_id).search(pattern, path, glob)
        return Matches(matches=found, truncated=truncated)

    @mcp.tool(annotations=READ_ONLY)
    @_tool_errors
    async def export_changes(sandbox_id: SandboxId) -> Changes:
        """Every change since the base commit: full contents of added and modified files, deleted paths, a diff."""
        changeset, diff = await manager.get(sandbox_id).export_changes()
        return Changes(changeset=changeset, diff=diff)

    @mcp.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                                      open_world_hint=False))
    @_tool_errors
    async def destroy_sandbox(sandbox_id: SandboxId) -> Destroyed:
        """Destroy a sandbox: kill its processes and delete its files. Of a sandbox another server made and left
        behind when it died, remove what this server can reach (destroyed is false; note says what was done)."""
        if manager.holds(sandbox_id):
            await manager.destroy(sandbox_id)
            return Destroyed(sandbox_id=sandbox_id, destroyed=True)
        left = await manager.remove_left(sandbox_id)
        return Destroyed(sandbox_id=sandbox_id, destroyed=False, note=left.note, removed=left.removed)

    return mcp
