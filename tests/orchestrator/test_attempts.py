"""Several attempts: one plan, N coders at once in N sandboxes, each followed by its own run of the plan's
verification; the reviewer chooses by that evidence, and the chosen sandbox is what is published."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.conftest import git
from tests.fakes.messages_api import text, tool_use, turn

from .conftest import of_type, post_code, stack
from .test_cli import cli
from .test_run import BUGGY
from .test_team import PLAN, planner, record

pytestmark = pytest.mark.asyncio(loop_scope="session")
ATTEMPT = re.compile(r"You are attempt (\d+) of (\d+)")


def coder_writes(content: str, summary: str) -> list:
    return [turn(tool_use("sandbox_write_file", {"path": "calc.py", "content": content})), turn(text(summary))]


def choose(attempt: int, verdict: str = "approve", findings: list[str] | None = None) -> list:
    return [turn(tool_use("submit_choice", {"attempt": attempt, "reason": f"attempt {attempt}'s tests pass",
                                            "verdict": verdict, "findings": findings or []}))]


class Router:
    """Scripted turns per agent, whatever order the attempts' calls arrive in: the planner, each attempt's coder
    (known by its brief), the reviewer that chooses, and any later coder or reviewer."""

    def __init__(self, scripts: dict[str, list]):
        self.scripts = {name: list(turns) for name, turns in scripts.items()}
        self.seen: dict[str, list[dict[str, Any]]] = {}

    def agent(self, body: dict[str, Any]) -> str:
        system = body["system"][0]["text"]
        first = json.dumps(body["messages"][0])
        if "You are the planner" in system:
            return "planner"
        if "several coders worked on the same plan" in system:
            return "chooser"
        if "You are the coder" in system:
            found = ATTEMPT.search(first)
            return f"coder{found[1]}" if found else "coder"
        return "reviewer"

    def __call__(self, body: dict[str, Any]) -> Any:
        name = self.agent(body)
        self.seen.setdefault(name, []).append(body)
        return self.scripts[name].pop(0)

    def steps(self) -> list:
        return [self] * sum(len(turns) for turns in self.scripts.values())


FIXED = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a * b\n"


async def test_the_attempt_whose_tests_pass_is_chosen_and_published_with_its_real_test_output(pool, make_repo):
    repo = make_repo(BUGGY)
    router = Router({"planner": planner(), "coder1": coder_writes(WRONG, "Multiplied."),
                     "coder2": coder_writes(FIXED, "Added."), "chooser": choose(2)})
    async with stack(pool, router.steps()) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Fix add(); its test fails.",
                                               "attempts": 2})
    assert events[0]["attempts"] == 2 and events[-1]["status"] == "success"
    # Each attempt's events say which attempt they belong to; the planner's and the chooser's belong to none.
    coders = [e for e in of_type(events, "agent") if e["agent"] == "coder"]
    assert sorted(e["attempt"] for e in coders if e["state"] == "start") == [1, 2]
    assert all("attempt" not in e for e in of_type(events, "agent") if e["agent"] in ("planner", "reviewer"))
    # Each attempt's own test run, as evidence, and its diff, kept in the run's record.
    tests = [e for e in of_type(events, "tool_result") if e["agent"] == "tests"]
    assert {e["attempt"]: "FAILED" in e["content"] or "Error" in e["content"] for e in tests} == {1: True, 2: False}
    diffs = {e.get("attempt"): e["diff"] for e in of_type(events, "diff")}
    assert "a * b" in diffs[1] and "a + b" in diffs[2] and "a + b" in diffs[None]
    chosen = of_type(events, "attempt_chosen")[0]
    assert chosen["attempt"] == 2 and chosen["verdict"] == "approve"
    # The chooser saw both attempts side by side, with their test runs.
    brief = json.dumps(router.seen["chooser"][0]["messages"][0])
    assert "## Attempt 1" in brief and "## Attempt 2" in brief and "a * b" in brief and "exit 1 (failed)" in brief
    # The two coders were nudged apart: the same plan, different briefs.
    briefs = [json.dumps(router.seen[f"coder{k}"][0]["messages"][0]) for k in (1, 2)]
    assert briefs[0] != briefs[1] and all("add must add" in b for b in briefs)
    pr = of_type(events, "pull_request")[0]
    assert pr["draft"] is False and git(repo, "show", f"{pr['head']}:calc.py") == FIXED.rstrip("\n")
    body = record(pr)["body"]
    assert f"- `{PLAN['verification']}`: exit 0 (passed)" in body and "run by the tests" in body
    assert "- Attempt 2 (chosen): `calc.py`" in body and "- Attempt 1: `calc.py`" in body


async def test_an_approved_attempt_whose_verification_failed_is_published_as_a_draft(pool, make_repo):
    repo = make_repo(BUGGY)
    router = Router({"planner": planner(), "coder1": coder_writes(WRONG, "Multiplied."),
                     "coder2": coder_writes(WRONG.replace("*", "**"), "Powered."), "chooser": choose(1)})
    async with stack(pool, router.steps()) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Fix add()", "attempts": 2})
    pr = of_type(events, "pull_request")[0]
    assert pr["draft"] is True and git(repo, "show", f"{pr['head']}:calc.py") == WRONG.rstrip("\n")
    assert "the reviewer approved, but the plan's verification" in record(pr)["body"]


async def test_changes_requested_on_the_chosen_attempt_go_back_to_its_coder(pool, make_repo, sandbox_root):
    repo = make_repo(BUGGY)
    review = {"verdict": "approve", "findings": [], "tests_run": [{"command": PLAN["verification"],
                                                                   "result": "OK"}]}
    router = Router({"planner": planner(), "coder1": coder_writes(WRONG, "Multiplied."),
                     "coder2": coder_writes(WRONG, "Also multiplied."),
                     "chooser": choose(2, "request_changes", ["calc.py: add must add"]),
                     "coder": coder_writes(FIXED, "Now it adds."),
                     "reviewer": [turn(tool_use("sandbox_exec", {"command": PLAN["verification"]})),
                                  turn(tool_use("submit_review", review))]})
    async with stack(pool, router.steps()) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Fix add()", "attempts": 2})
    assert events[-1]["status"] == "success"
    # The second round works in the chosen attempt's sandbox: its coder's events carry its number.
    second = [e for e in of_type(events, "agent") if e["agent"] == "coder" and e["state"] == "start"][-1]
    assert second["attempt"] == 2
    assert "add must add" in json.dumps(router.seen["coder"][0]["messages"][0])
    pr = of_type(events, "pull_request")[0]
    assert pr["draft"] is False and git(repo, "show", f"{pr['head']}:calc.py") == FIXED.rstrip("\n")
    assert list(sandbox_root.glob("*/sbx-*")) == []


@pytest.mark.parametrize("extra, message", [
    ({"attempts": 0}, "attempts must be a whole number from 1 to 4"),
    ({"attempts": 5}, "TB_MAX_ATTEMPTS"),
    ({"attempts": "2"}, "attempts must be"),
    ({"attempts": True}, "attempts must be"),
    ({"attempts": 2, "mode": "single"}, 'need mode "team"'),
])
async def test_bad_attempts_are_refused_before_any_stream(pool, make_repo, extra, message):
    async with stack(pool, []) as s:
        code, answer, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "x", **extra})
    assert code == 400 and message in answer["error"]


async def test_the_cli_asks_for_attempts_and_tags_each_attempts_lines(pool, make_repo):
    router = Router({"planner": planner(), "coder1": coder_writes(WRONG, "Multiplied."),
                     "coder2": coder_writes(FIXED, "Added."), "chooser": choose(2)})
    async with stack(pool, router.steps()) as s:
        code, out, err = await cli("--service", s.url, "--repo", str(make_repo(BUGGY)), "--attempts", "2",
                                   "Fix add(); its test fails.")
        refused = await cli("--service", s.url, "--repo", str(make_repo(BUGGY)), "--attempts", "9", "Fix it")
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.startswith("[1] == coder start") for line in lines)
    assert any(line.startswith("[2]   Added.") for line in lines), out
    assert any("the reviewer chose attempt 2 (approve)" in line for line in lines)
    assert refused[0] == 2 and "TB_MAX_ATTEMPTS" in refused[2]
