"""What the pull request says of the tests: only what the run saw happen in the sandbox.

A model's account of its tests can be wrong or invented; the run records every command an agent ran (`CommandRun`:
who, exit code, time, the end of its output), and the body is built from those records: the plan's verification
commands and the tests the reviewer says it ran, each with its last real run. An approval over a verification that
failed on its last run does not stand: the pull request is a draft saying so.
"""

from __future__ import annotations

import re
from typing import Any

from .tools import CommandRun, RunTools

TAIL_LINES = 12


def verification_commands(plan: dict[str, Any] | None) -> list[str]:
    """The commands of the plan's `verification`, one a line, less list marks, prompts and backticks."""
    commands = []
    for line in str((plan or {}).get("verification") or "").splitlines():
        line = re.sub(r"^\s*(?:[-*]|\d+[.)])?\s*(?:\$\s+)?", "", line).strip().strip("`").strip()
        if line and line not in commands:
            commands.append(line)
    return commands


def failed_verification(plan: dict[str, Any] | None, tools: RunTools) -> str | None:
    """Why an approval cannot stand: a verification command of the plan whose last run failed; None otherwise."""
    for command in verification_commands(plan):
        seen = tools.last_run(command)
        if seen is not None and (seen.exit_code or seen.timed_out):
            return (f"the plan's verification {code(command)} failed on its last run ({outcome(seen, False)}, by "
                    f"the {seen.agent})")
    return None


def tests_section(plan: dict[str, Any] | None, review: dict[str, Any] | None, tools: RunTools,
                  environment: dict[str, Any] | None) -> list[str]:
    """The lines of the body's "Tests run": each claimed or planned test command with its last real run."""
    lines = []
    unusable = bool(environment) and environment.get("status") == "failed"
    if unusable:
        lines.append(f"The environment could not be set up ({environment.get('error') or 'no reason given'}): "
                     "tests could not run.")
    claimed = set()
    for claim in (review or {}).get("tests_run") or []:
        command = str(claim.get("command", "")).strip()
        claimed.add(command)
        # The reviewer's claim counts only for its own run, after the coder's last edit.
        seen = tools.last_run(command, "reviewer")
        said = f"; the reviewer reported: {claim.get('result')}"
        lines += _entry(command, seen, unusable, said)
    for command in verification_commands(plan):
        if command not in claimed:
            lines += _entry(command, tools.last_run(command), unusable, " (the plan's verification)")
    return lines


def attempt_evidence(plan: dict[str, Any] | None, tools: RunTools) -> str:
    """An attempt's verification as it ran in its sandbox, for the reviewer who chooses between attempts."""
    lines = []
    for command in verification_commands(plan):
        lines += _entry(command, tools.last_run(command, "tests"), False, "")
    return "\n".join(lines) or "(the plan names no verification command)"


def attempts_section(plan: dict[str, Any] | None, attempts: list[Any], chosen: Any) -> list[str]:
    """The lines of the body's "Attempts": each attempt's files and how its verification ended, the chosen marked."""
    lines = []
    for attempt in attempts:
        runs = [f"{code(c)} {outcome(attempt.crew.tools.last_run(c, 'tests'), False)}"
                for c in verification_commands(plan)]
        mark = " (chosen)" if attempt is chosen else ""
        files = ", ".join(f"`{f}`" for f in attempt.files) or "no changes"
        stopped = f"; stopped early: {attempt.stopped}" if attempt.stopped else ""
        lines.append(f"- Attempt {attempt.number}{mark}: {files}; verification: {'; '.join(runs) or 'none'}{stopped}")
    return lines


def outcome(seen: CommandRun | None, unusable: bool) -> str:
    if seen is None:
        return "not run in the sandbox"
    if seen.timed_out:
        return f"exit {seen.exit_code} (timed out)"
    if seen.exit_code:
        return f"exit {seen.exit_code} (failed)"
    return "exit 0" if unusable else "exit 0 (passed)"  # without its environment, a pass may have tested nothing


def _entry(command: str, seen: CommandRun | None, unusable: bool, said: str) -> list[str]:
    lines = [f"- {code(command)}: {outcome(seen, unusable)}{said}"]
    if seen is not None:
        lines.append(f"  - run by the {seen.agent}, in {seen.duration_s:.1f} s; the end of its output:")
        tail = [line for line in seen.tail.splitlines() if line.strip()][-TAIL_LINES:] or ["(no output)"]
        fence = "`" * max(3, max((len(m) for m in re.findall("`+", seen.tail)), default=0) + 1)
        lines += [f"    {fence}", *(f"    {line}" for line in tail), f"    {fence}"]
    return lines


def code(text: str) -> str:
    """`text` as inline Markdown code, whatever backticks it holds."""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"
