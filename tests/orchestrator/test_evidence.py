"""The pull request's account of the tests is what the sandbox saw: who ran each command, how long it took, how
it ended and the end of its output; an approval over a verification that failed does not stand."""

from __future__ import annotations

import pytest

from orchestrator.evidence import verification_commands
from tests.fakes.messages_api import text, tool_use, turn

from .conftest import of_type, post_code, stack
from .test_run import BUGGY
from .test_team import PLAN, planner, record, request

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the MCP servers' pool lives on the session's loop
VERIFY = PLAN["verification"]  # python3 -m unittest -q: its exit code is the tests' own


def coder(new: str) -> list:
    return [turn(tool_use("sandbox_edit_file", {"path": "calc.py", "old_text": "a - b", "new_text": new})),
            turn(tool_use("sandbox_exec", {"command": VERIFY})),
            turn(text(f"add() now returns {new}."))]


def approving_reviewer(runs: bool) -> list:
    review = {"verdict": "approve", "findings": [], "tests_run": [{"command": VERIFY, "result": "OK, all pass"}]}
    ran = [turn(tool_use("sandbox_exec", {"command": VERIFY}))] if runs else []
    return [*ran, turn(tool_use("submit_review", review))]


def section_of(body: str) -> str:
    return body.split("## Tests run\n", 1)[1].split("\n## ", 1)[0]


async def test_the_verification_commands_are_read_one_a_line_less_marks_and_prompts() -> None:
    plan = {"verification": "- `python -m pytest -q`\n$ npm test\n1. go test ./...\n\n- `npm test`"}
    assert verification_commands(plan) == ["python -m pytest -q", "npm test", "go test ./..."]
    assert verification_commands(None) == [] and verification_commands({"verification": None}) == []


async def test_each_test_in_the_body_says_who_ran_it_how_long_and_how_its_output_ended(pool, make_repo):
    async with stack(pool, planner() + coder("a + b") + approving_reviewer(runs=True)) as s:
        _, events, _ = await post_code(s.url, request(make_repo(BUGGY)))
    pr = of_type(events, "pull_request")[0]
    section = section_of(record(pr)["body"])
    assert not pr["draft"]
    assert section.startswith(f"- `{VERIFY}`: exit 0 (passed); the reviewer reported: OK, all pass\n"
                              "  - run by the reviewer, in "), section
    assert "\n    ```\n" in section and "\n    OK\n" in section  # unittest's own last line, from the sandbox


async def test_an_approval_over_a_verification_that_failed_is_a_draft_saying_so(pool, make_repo):
    # The coder's change breaks the test; the reviewer approves without running anything and claims it passed.
    async with stack(pool, planner() + coder("a * b") + approving_reviewer(runs=False)) as s:
        _, events, _ = await post_code(s.url, request(make_repo(BUGGY)))
    pr = of_type(events, "pull_request")[0]
    body = record(pr)["body"]
    assert pr["draft"] and events[-1]["status"] == "success"
    assert body.startswith(f"> **Draft:** the reviewer approved, but the plan's verification `{VERIFY}` failed on "
                           "its last run (exit 1 (failed), by the coder)."), body[:300]
    section = section_of(body)
    # The reviewer's claim is not evidence: it never ran the command itself.
    assert section.startswith(f"- `{VERIFY}`: not run in the sandbox; the reviewer reported: OK, all pass\n")
    assert "passed" not in section.replace("the reviewer reported: OK, all pass", "")
