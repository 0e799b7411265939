"""The `Sandbox` protocol and the types every backend shares.

Errors:
    SandboxError            the caller can fix it (bad path, bad argument, unknown id); becomes `isError`
    └── BackendUnavailable  the operator must fix it (bubblewrap missing, unsafe backend not allowed)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

from pydantic import BaseModel, Field

from common.changeset import Changeset


class SandboxError(Exception):
    """A failure the caller can act on; its message says what to do instead."""


class BackendUnavailable(SandboxError):
    """The chosen backend cannot run on this machine."""


class ExecResult(BaseModel):
    exit_code: int = Field(description="The command's exit status; -1 when it was killed.")
    stdout: str
    stderr: str
    timed_out: bool = Field(description="True when the wall-clock timeout killed the command.")
    truncated: bool = Field(description="True when stdout or stderr was cut to its head and tail.")


class EnvironmentInfo(BaseModel):
    status: Literal["ready", "failed", "none"] = Field(
        description="ready: installed and found by every command; failed: setup failed (see error), commands run "
                    "without it; none: nothing to set up.")
    source: str = Field(description="Where the setup came from: request, .tb/setup.sh, detected, or none.")
    detected: list[str] = Field(default_factory=list, description="The ecosystems found, and how each is set up.")
    script: str = Field(default="", description="The setup script that ran (or would have run).")
    cached: bool = Field(default=False, description="True when a prepared environment was reused.")
    duration_s: float = Field(default=0.0, description="Time to prepare it now (a cached one: to mount it).")
    installed: list[str] = Field(default_factory=list, description="What the environment holds, per ecosystem.")
    test_commands: list[str] = Field(default_factory=list, description="How the tests run in this environment.")
    error: str | None = Field(default=None, description="Why setup failed, and what to do.")
    output_tail: str = Field(default="", description="The end of the setup's output.")


class SandboxInfo(BaseModel):
    sandbox_id: str
    base_commit: str
    default_branch: str
    backend: str
    workdir: str = Field(description="Where the repository sits for commands run with exec.")
    note: str | None = Field(default=None, description="Why the sandbox runs on another backend than the one "
                                                       "configured, e.g. a fallback from Modal to the local backend.")
    environment: EnvironmentInfo | None = Field(default=None, description="The dependencies installed for commands "
                                                                          "(outside the repository), if any.")


class Sandbox(Protocol):
    """One isolated copy of a repository with a way to run commands in it."""

    info: SandboxInfo

    async def exec(self, command: str, timeout_s: float, workdir: str, read_only: bool = False,
                   on_output: Callable[[str], None] | None = None) -> ExecResult: ...
    async def read_file(self, path: str, offset: int, limit: int) -> str: ...
    async def write_file(self, path: str, content: str) -> int: ...
    async def edit_file(self, path: str, old_text: str, new_text: str, replace_all: bool) -> str: ...
    async def list_files(self, path: str, pattern: str | None) -> tuple[list[str], bool]: ...
    async def search(self, pattern: str, path: str, glob: str | None) -> tuple[list[str], bool]: ...
    async def export_changes(self) -> tuple[Changeset, str]: ...
    async def destroy(self) -> None: ...
