"""The team: a planner, a coder and a reviewer, each a run of the same loop with its own tools and brief."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from orchestrator.model import Usage

from tests.conftest import git
from tests.fakes.messages_api import text, tool_use, turn

from .conftest import FAST, of_type, post_code, stack
from .test_run import BUGGY, TESTS

pytestmark = pytest.mark.asyncio(loop_scope="session")

PLAN = {"summary": "add() subtracts; make it add.",
        "changes": [{"file": "calc.py", "what": "return a + b", "why": "add must add"}],
        "verification": "python3 -m unittest -q"}


def planner() -> list:
    return [turn(text("Reading."), tool_use("sandbox_read_file", {"path": "calc.py"})),
            turn(tool_use("submit_plan", PLAN))]


def coder(old: str = "a - b", new: str = "a + b") -> list:
    return [turn(tool_use("sandbox_edit_file", {"path": "calc.py", "old_text": old, "new_text": new})),
            turn(tool_use("sandbox_exec", {"command": TESTS})),
            turn(text(f"Changed add() to return {new}; unittest passes."))]


def reviewer(verdict: str, findings: list[str] | None = None) -> list:
    review = {"verdict": verdict, "findings": findings or [],
              "tests_run": [{"command": "python3 -m unittest -q", "result": "OK"}]}
    return [turn(tool_use("sandbox_exec", {"command": TESTS})), turn(tool_use("submit_review", review))]


def request(repo) -> dict:
    return {"repoUrl": str(repo), "prompt": "Fix add(); its test fails."}


def record(pr_event: dict) -> dict:
    return json.loads(open(pr_event["url"].removeprefix("file://")).read())


async def test_the_team_plans_codes_reviews_and_opens_a_pull_request(pool, make_repo):
    repo = make_repo(BUGGY)
    async with stack(pool, planner() + coder() + reviewer("approve")) as s:
        _, events, _ = await post_code(s.url, request(repo))
    agents = [(e["agent"], e["state"]) for e in of_type(events, "agent")]
    assert agents == [("planner", "start"), ("planner", "end"), ("coder", "start"), ("coder", "end"),
                      ("reviewer", "start"), ("reviewer", "end")]
    assert of_type(events, "planned_change") == [
        {**of_type(events, "planned_change")[0], "agent": "planner", "file": "calc.py", "what": "return a + b",
         "why": "add must add"}]
    for kind in ("text", "tool_call", "tool_result"):
        assert all(e["agent"] in ("planner", "coder", "reviewer") for e in of_type(events, kind))
    pr = of_type(events, "pull_request")[0]
    assert pr["draft"] is False and events[-1]["status"] == "success"
    body = record(pr)["body"]
    assert "Changed add() to return a + b" in body and "add must add" in body and "approve" in body
    # The reviewer claims a command it did not run as written: the body says so, next to its words.
    assert "- `python3 -m unittest -q`: not run in the sandbox; the reviewer reported: OK" in body
    assert git(repo, "show", f"{pr['head']}:calc.py").endswith("a + b")
    # Each agent starts from a brief, not from the previous agent's history.
    coder_first = s.api.requests[2]
    assert len(coder_first["messages"]) == 1 and "add must add" in json.dumps(coder_first["messages"])
    reviewer_first = s.api.requests[5]
    assert "+    return a + b" in json.dumps(reviewer_first["messages"])


async def test_findings_go_back_to_the_coder_until_the_reviewer_approves(pool, make_repo):
    repo = make_repo(BUGGY)
    script = (planner() + coder("a - b", "b + a") + reviewer("request_changes", ["calc.py: write a + b, as planned"])
              + coder("b + a", "a + b") + reviewer("approve"))
    async with stack(pool, script) as s:
        _, events, _ = await post_code(s.url, request(repo))
    second_coder = s.api.requests[7]
    assert "calc.py: write a + b, as planned" in json.dumps(second_coder["messages"])
    pr = of_type(events, "pull_request")[0]
    assert pr["draft"] is False and "after 2 round(s)" in record(pr)["body"]
    assert git(repo, "show", f"{pr['head']}:calc.py").endswith("a + b")


async def test_a_reviewer_that_never_approves_leads_to_a_draft_saying_why(pool, make_repo):
    repo = make_repo(BUGGY)
    script = planner() + coder() + reviewer("request_changes", ["needs a docstring"]) + coder("a + b", "b + a") \
        + reviewer("request_changes", ["still no docstring"])
    async with stack(pool, script) as s:
        _, events, _ = await post_code(s.url, request(repo))
    pr = of_type(events, "pull_request")[0]
    assert pr["draft"] is True and events[-1]["status"] == "success"
    body = record(pr)["body"]
    assert "the reviewer did not approve after 2 round(s)" in body and "still no docstring" in body


async def test_a_planner_that_never_submits_is_stopped_by_its_turn_limit(pool, make_repo):
    script = [turn(text("I think we should fix it.")), turn(text("Really, just fix it."))]
    async with stack(pool, script, limits=replace(FAST, max_turns=4)) as s:
        _, events, _ = await post_code(s.url, request(make_repo(BUGGY)))
    assert "Finish by calling submit_plan" in json.dumps(s.api.requests[1]["messages"])
    error = of_type(events, "error")[0]
    assert error["limit"] == "turns" and "planner" in error["message"]
    assert [(e["agent"], e["state"]) for e in of_type(events, "agent")] == [("planner", "start"),
                                                                           ("planner", "stopped")]
    assert events[-1]["status"] == "limit" and not of_type(events, "pull_request")


async def test_per_agent_usage_adds_up_to_the_run_usage(pool, make_repo):
    async with stack(pool, planner() + coder() + reviewer("approve")) as s:
        _, events, _ = await post_code(s.url, request(make_repo(BUGGY)))
    ends = [e for e in of_type(events, "agent") if e["state"] == "end"]
    usage = of_type(events, "usage")[-1]
    for kind in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
        assert sum(e["usage"][kind] for e in ends) == usage[kind]
    assert usage["input_tokens"] > 0


async def test_the_planner_and_the_reviewer_cannot_write(pool, make_repo):
    repo = make_repo(BUGGY)
    script = [
        turn(tool_use("sandbox_write_file", {"path": "calc.py", "content": "hacked"}),
             tool_use("sandbox_exec", {"command": "echo hacked > calc.py; cat calc.py"})),
        turn(tool_use("submit_plan", PLAN)),
        *coder(),
        turn(tool_use("sandbox_edit_file", {"path": "calc.py", "old_text": "a + b", "new_text": "0"}),
             tool_use("sandbox_exec", {"command": "sed -i s/a/b/ calc.py"})),
        turn(tool_use("submit_review", {"verdict": "approve", "findings": [], "tests_run": []})),
    ]
    async with stack(pool, script) as s:
        _, events, _ = await post_code(s.url, request(repo))
    results = of_type(events, "tool_result")
    planner_results = [r for r in results if r["agent"] == "planner"][:2]
    assert planner_results[0]["is_error"] and "not available to the planner" in planner_results[0]["content"]
    assert "Read-only file system" in planner_results[1]["content"]
    reviewer_results = [r for r in results if r["agent"] == "reviewer"][:2]
    assert reviewer_results[0]["is_error"] and "not available to the reviewer" in reviewer_results[0]["content"]
    assert "Read-only file system" in reviewer_results[1]["content"]
    names = {t["name"] for t in s.api.requests[0]["tools"]}
    assert "sandbox_write_file" not in names and "sandbox_edit_file" not in names and "submit_plan" in names
    # The planner reads issues and pull requests; it writes nothing on the forge.
    assert {n for n in names if n.startswith("github_")} == {"github_get_issue", "github_get_pull_request",
                                                             "github_list_pull_requests"}
    pr = of_type(events, "pull_request")[0]
    assert git(repo, "show", f"{pr['head']}:calc.py") == "def add(a, b):\n    return a + b"


async def test_a_malformed_hand_over_is_an_error_the_agent_can_fix(pool, make_repo):
    repo = make_repo(BUGGY)
    script = [turn(tool_use("submit_plan", {"summary": "x", "changes": "edit calc.py", "verification": "tests"})),
              *planner()[1:], *coder(),
              turn(tool_use("submit_review", {"verdict": "maybe", "findings": None, "tests_run": []})),
              *reviewer("approve")[1:]]
    async with stack(pool, script) as s:
        _, events, _ = await post_code(s.url, request(repo))
    errors = [r for r in of_type(events, "tool_result") if r["is_error"]]
    assert [e["agent"] for e in errors] == ["planner", "reviewer"]
    assert "changes" in errors[0]["content"] and "not recorded" in errors[0]["content"]
    assert "verdict" in errors[1]["content"] or "findings" in errors[1]["content"]
    assert events[-1]["status"] == "success" and of_type(events, "pull_request")[0]["draft"] is False


async def test_each_role_can_have_its_own_model_and_is_priced_at_it(pool, make_repo):
    roles = {"planner": "claude-haiku-test", "reviewer": "claude-opus-test"}
    async with stack(pool, planner() + coder() + reviewer("approve"), planner_model=roles["planner"],
                     reviewer_model=roles["reviewer"]) as s:
        _, events, _ = await post_code(s.url, request(make_repo(BUGGY)))
    asked = [r["model"] for r in s.api.requests]
    assert asked == ["claude-haiku-test"] * 2 + ["claude-sonnet-test"] * 3 + ["claude-opus-test"] * 2
    starts = {e["agent"]: e["model"] for e in of_type(events, "agent") if e["state"] == "start"}
    assert starts == {"planner": "claude-haiku-test", "coder": "claude-sonnet-test", "reviewer": "claude-opus-test"}
    # Each agent's tokens at its own model's price; what all of them would cost at Sonnet's differs unless the
    # planner's and the reviewer's tokens happen to balance, so the sum is checked, not a difference.
    ends = [e for e in of_type(events, "agent") if e["state"] == "end"]
    expected = sum(Usage(**e["usage"]).cost_usd(starts[e["agent"]]) for e in ends)
    # The run's total adds each call's cost rounded to a millionth of a dollar: up to half of one off per call.
    assert of_type(events, "usage")[-1]["cost_usd"] == pytest.approx(expected, abs=len(s.api.requests) * 5e-7)
    assert Usage(**ends[0]["usage"]).cost_usd(starts["planner"]) < Usage(**ends[0]["usage"]).cost_usd("sonnet")
