"""Work that outlives its run: a checkpoint of the sandbox's changes while agents work (for when the sandbox is
lost), and a new run started from the changes a stopped run kept (`POST /runs/{id}/retry`).

Kept changes go back into a sandbox through its own `exec`, as the sandbox's user inside its jail, like any agent's
write: nothing is written into a sandbox from the host.
"""

from __future__ import annotations

import re
import secrets
import shlex
from collections.abc import Awaitable, Callable
from typing import Any

from .events import Event
from .mcp_pool import ServerUnavailable
from .tools import RunTools, ToolFailed, result_text

# Tools whose success may have changed the sandbox's files (exec is read-only for the planner and the reviewer).
WRITES = frozenset({"sandbox_write_file", "sandbox_edit_file", "sandbox_exec"})
READ_ONLY_AGENTS = frozenset({"planner", "reviewer", "tests"})
SCRIPT_CHARS = 90_000  # of one exec's command, under the sandbox's 100 000
CHUNK = 60_000  # base64 characters per line of a script; a multiple of 4, so each line decodes alone
BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class Checkpoint:
    """The sandbox's changes as of the end of the last agent turn that could have changed them."""

    def __init__(self, tools: RunTools, on_saved: Callable[[dict[str, Any]], Awaitable[None]] | None = None):
        self.tools = tools
        self.on_saved = on_saved  # given each new checkpoint, to keep it beyond this process
        self.last: dict[str, Any] | None = None  # what export_changes gave: changeset and diff
        self.when = ""
        self._changed_by: str | None = None

    async def saw(self, event: Event) -> None:
        """Follow the run's events; after a turn whose tools may have written, export the changes."""
        if event["type"] == "tool_result":
            # Of several attempts, the first one's sandbox is the run's own: the one checkpointed.
            if event["name"] in WRITES and not event["is_error"] and event["agent"] not in READ_ONLY_AGENTS \
                    and event.get("attempt", 1) == 1:
                self._changed_by = event["agent"]
            return
        if self._changed_by is None or event["type"] == "output":
            return
        agent, self._changed_by = self._changed_by, None
        try:
            exported = await self.tools.export()
        except (ToolFailed, ServerUnavailable):
            return  # the previous checkpoint stands; the end of the run says what it could publish
        changed = self.last is None or exported["changeset"] != self.last["changeset"]
        self.last, self.when = exported, f"the {agent}'s last turn that changed them"
        if changed and self.on_saved is not None:  # a turn that ran tests only is not kept again
            await self.on_saved(exported)


def note(run_id: str, reason: str, changeset: dict[str, Any]) -> str:
    """What the agents of a retry are told about the work they start from."""
    return (f"\n\nThis continues run {run_id}, which stopped before it finished ({reason}). Its changes are already "
            f"in the sandbox ({len(changeset['files'])} file(s) written, {len(changeset['deleted'])} deleted): "
            "look at them first (export_changes shows them), then finish the task.")


async def apply(tools: RunTools, changeset: dict[str, Any]) -> None:
    """Make the sandbox hold `changeset` (made on the commit the sandbox was cloned at), then check that it does;
    `ToolFailed` says what did not apply."""
    for script in _scripts(changeset):
        result = await tools.pool.call("sandbox", "exec", {"sandbox_id": tools.sandbox_id, "command": script,
                                                          "timeout_s": 120}, tools.timeout_s)
        data = result.structured_content or {}
        if result.is_error or data.get("exit_code") != 0:
            raise ToolFailed(f"the kept changes could not be applied: {result_text(result)[-2000:]}")
    now = (await tools.export())["changeset"]
    if _files(now) != _files(changeset) or sorted(now["deleted"]) != sorted(changeset["deleted"]):
        raise ToolFailed("the kept changes did not apply as they were: the sandbox differs from them afterwards")


def _files(changeset: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {f["path"]: (f["mode"], f["content_base64"]) for f in changeset["files"]}


def _scripts(changeset: dict[str, Any]) -> list[str]:
    """Bash scripts, each under `SCRIPT_CHARS`, that delete and write what `changeset` says; `ToolFailed` for a path
    or a content that no export makes (the jail holds whatever a script does; this keeps a retry from doing
    something else than the changeset says)."""
    lines = [f"rm -rf -- {shlex.quote(_path(path))}" for path in changeset["deleted"]]
    for file in changeset["files"]:
        path, data = shlex.quote(_path(file["path"])), file["content_base64"]
        if not BASE64.fullmatch(data) or len(data) % 4:
            raise ToolFailed(f"the kept changes hold {file['path']!r} in a form no export makes (not base64)")
        temp = shlex.quote(f"{_path(file['path'])}.tb-resume-{secrets.token_hex(4)}")
        lines.append(f'mkdir -p -- "$(dirname -- {path})" && rm -rf -- {path} && : > {temp}')
        lines += [f"printf %s {shlex.quote(data[i:i + CHUNK])} | base64 -d >> {temp}"
                  for i in range(0, len(data), CHUNK)]
        if file["mode"] == "120000":  # the target whole, a final newline included
            lines.append(f'target="$(cat -- {temp}; printf x)" && ln -s -- "${{target%x}}" {path} && rm -f -- {temp}')
        else:
            lines.append(f"chmod {'755' if file['mode'] == '100755' else '644'} -- {temp} && mv -- {temp} {path}")
    scripts, current = [], "set -e"
    for line in lines:
        if len(current) + len(line) + 1 > SCRIPT_CHARS:
            scripts.append(current)
            current = "set -e"
        current += "\n" + line
    return [*scripts, current] if lines else []


def _path(path: str) -> str:
    """`path`, when it is one an export gives: relative, inside the repository, outside .git."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise ToolFailed(f"the kept changes name {path!r}, which is no path inside the repository")
    return path
