"""Bounded context and money: long runs stay inside the model's window (old results cleared, older turns
summarised, a refusal for length recovered), the Messages API's own clearing when asked for, the run's and each
role's money limits, and the user's words reaching an agent at work."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import anthropic
import pytest

from common.redact import Redactor
from orchestrator.agent import AgentResult, run_agent
from orchestrator.budget import Budget, LimitReached
from orchestrator.config import Settings
from orchestrator.context import SUMMARY_HEAD, Context, ContextPolicy
from orchestrator.events import EventLog
from orchestrator.model import AnthropicModel
from orchestrator.roles import Role
from orchestrator.run import Services
from orchestrator.team import Crew, run_role
from orchestrator.tools import ToolOutput
from tests.fakes.messages_api import MessagesAPI, count_tokens, messages_api, text, tool_use, turn

from .conftest import API_KEY, FAST, Stack, of_type, post_code, serve
from .test_run import BUGGY

pytestmark = pytest.mark.asyncio(loop_scope="session")

LONG = replace(FAST, max_turns=100, max_tokens=10**9, run_seconds=300)
LINE = "{:04d} the quick brown fox jumps over the lazy dog, and the lazy dog lets it; " + "." * 3 + "\n"
BIG_FILE = "".join(LINE.format(i) for i in range(250))  # 20 000 characters


def reads(n: int, path: str = "big.txt") -> list:
    """`n` turns that each read `path`, then a last turn that says it is done."""
    return [*(turn(tool_use("sandbox_read_file", {"path": path})) for _ in range(n)), turn(text("Read it all."))]


def valid_pairs(messages: list[dict[str, Any]]) -> bool:
    """Each tool call is answered in the next message, and each result answers a call of the message before."""
    for previous, message in zip(messages, messages[1:]):
        asked = {b["id"] for b in previous["content"] if isinstance(previous["content"], list)
                 and b["type"] == "tool_use"}
        answered = {b["tool_use_id"] for b in message["content"] if isinstance(message["content"], list)
                    and b["type"] == "tool_result"}
        if asked != answered:
            return False
    return True


@asynccontextmanager
async def windowed(pool, script: list, window: int | None, limits=LONG) -> AsyncIterator[Stack]:
    """The service in front of a model with a context window of `window` tokens."""
    async with messages_api(script, context_window=window) as api:
        settings = Settings(model="claude-sonnet-test", limits=limits)
        client = anthropic.AsyncAnthropic(base_url=api.url, api_key=API_KEY, max_retries=0)
        model = AnthropicModel(client, settings.model, limits.max_output_tokens, 0, 0)
        async with serve(Services(settings, pool, model)) as url:
            yield Stack(url, api, Services(settings, pool, model))


async def test_an_80_turn_run_of_20000_character_results_stays_in_the_window(pool, make_repo):
    repo = make_repo({**BUGGY, "big.txt": BIG_FILE})
    async with windowed(pool, reads(80), 200_000) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Read big.txt 80 times.",
                                               "mode": "single"}, timeout=300)
    assert events[-1]["status"] == "no_changes", of_type(events, "error")
    assert s.api.too_long == [] and len(s.api.requests) == 81
    cleared = of_type(events, "context")
    assert cleared and all(e["action"] == "cleared" and e["agent"] == "agent" for e in cleared)
    assert all(e["tokens_after"] <= 50_000 < 100_000 < e["tokens_before"] for e in cleared)
    # Cleared in batches: many turns between two clearings.
    assert 3 <= len(cleared) <= 12
    sizes = [count_tokens(body) for body in s.api.requests]
    assert max(sizes) < 100_000 and sizes[-1] < 100_000
    last = s.api.requests[-1]["messages"]
    assert valid_pairs(last) and last[0]["content"].startswith("Repository:")
    notes = [b["content"] for m in last if isinstance(m["content"], list) for b in m["content"]
             if b["type"] == "tool_result" and b["content"].startswith("[cleared")]
    assert len(notes) >= 70
    assert 'sandbox_read_file(path="big.txt")' in notes[0] and "call it again" in notes[0]
    # The three most recent results are whole.
    whole = [b for m in last if isinstance(m["content"], list) for b in m["content"]
             if b["type"] == "tool_result" and not b["content"].startswith("[cleared")]
    assert len(whole) >= 3 and all("0249 the quick brown fox" in b["content"] for b in whole)
    usage = of_type(events, "usage")[-1]
    sent = usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]
    assert usage["cache_read_input_tokens"] / sent > 0.75
    assert usage["by_role"]["agent"]["cost_usd"] == usage["cost_usd"] > 0


async def test_a_request_refused_for_its_length_is_cleared_harder_and_sent_again(pool, make_repo):
    repo = make_repo({**BUGGY, "big.txt": BIG_FILE})
    # The service believes the window holds 200 000 tokens; the model's holds 60 000.
    async with windowed(pool, reads(16), 60_000) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Read big.txt.", "mode": "single"},
                                       timeout=120)
    assert events[-1]["status"] == "no_changes", of_type(events, "error")
    assert len(s.api.too_long) == 1 and s.api.too_long[0] > 60_000 - FAST.max_output_tokens
    cleared = of_type(events, "context")
    assert cleared[0]["action"] == "cleared" and cleared[0]["tokens_after"] < cleared[0]["tokens_before"]
    # The refusal taught the window: later requests stay under it without being refused.
    assert all(count_tokens(body) + FAST.max_output_tokens <= 60_000 for body in s.api.requests[-8:])
    assert len(s.api.requests) == 17 + 1


@dataclass
class Files:
    """A tool set of one tool that reads any path as `size` characters of text."""

    size: int = 20_000

    def specs(self) -> list[dict[str, Any]]:
        return [{"name": "read", "description": "Read a file.",
                 "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}]

    async def call(self, name: str, arguments: dict[str, Any], call_id: str = "") -> ToolOutput:
        return ToolOutput((f"{arguments.get('path')}: " + BIG_FILE)[:self.size])


async def agent_run(script: list, *, window: int | None = 200_000, policy: ContextPolicy = ContextPolicy(),
                    tools: Any = None, max_output: int = 16_000, budget: Budget | None = None,
                    inbox: Callable[[], list[str]] | None = None, agent: str = "agent",
                    brief: str = "Read the files.") -> tuple[list[dict], MessagesAPI, AgentResult]:
    """The agent loop alone, over the real SDK and the fake Messages API; its events, the API, and its result."""
    events, result, seen = EventLog("run_context"), AgentResult(), []
    policy = replace(policy, max_output=max_output)
    async with messages_api(script, context_window=window) as api:
        client = anthropic.AsyncAnthropic(base_url=api.url, api_key=API_KEY, max_retries=0)
        model = AnthropicModel(client, "claude-sonnet-test", max_output, 0, 0, policy.api_edit())
        loop = run_agent(model, tools or Files(), "You read files.", brief,
                         budget or Budget(10**9, time.monotonic() + 60), events, result, max_turns=100,
                         redact=Redactor(), agent=agent, context=Context(policy, agent, events), inbox=inbox)
        try:
            async for event in loop:
                seen.append(event)
        except LimitReached as exc:
            seen.append({"type": "stopped", "limit": exc.limit, "message": str(exc)})
    return seen, api, result


@pytest.mark.parametrize("window, max_output, message", [(30_000, 1000, "prompt is too long"),
                                                         (30_000, 8000, "exceed context limit")])
async def test_either_refusal_for_length_is_recovered(window, max_output, message):
    script = [turn(tool_use("read", {"path": f"f{i}"})) for i in range(12)] + [turn(text("Done."))]
    events, api, result = await agent_run(script, window=window, max_output=max_output)
    assert [e["type"] for e in events if e["type"] == "stopped"] == []
    assert len(api.too_long) == 1 and result.final_text == "Done." and result.turns == 13
    assert [count_tokens(body) + max_output > window for body in api.requests].count(True) == 1
    assert of_type(events, "context")[0]["action"] == "cleared"
    assert valid_pairs(api.requests[-1]["messages"])


async def test_a_window_too_small_for_the_brief_stops_the_agent_with_a_limit():
    events, api, _ = await agent_run([], window=50, max_output=10)
    stopped = of_type(events, "stopped")
    assert stopped[0]["limit"] == "context" and "TB_CONTEXT_WINDOW" in stopped[0]["message"]
    assert len(api.too_long) == 4  # the first try and three after clearing what could be cleared


async def test_a_first_request_that_looks_too_big_is_counted_not_guessed():
    # 300 000 characters: about 83 000 tokens, where a blind guess must allow for twice as many. The money check
    # (US$0.40; the guess would cost about US$0.50 at Sonnet's input price) sees the count.
    brief = "Read this: " + BIG_FILE * 15
    budget = Budget(10**9, time.monotonic() + 60, max_cost_usd=0.4)
    events, api, result = await agent_run([turn(text("Read."))], brief=brief, budget=budget)
    assert result.final_text == "Read." and of_type(events, "stopped") == []
    assert len(api.counted) == 1 and api.counted[0]["messages"] == [{"role": "user", "content": brief}]
    assert of_type(events, "context") == [] and of_type(events, "budget") == []


async def test_old_large_tool_inputs_are_cleared_when_old_results_are_not_enough():
    written = [turn(tool_use("read", {"path": f"f{i}", "content": BIG_FILE})) for i in range(8)]
    events, api, _ = await agent_run([*written, turn(text("Done."))], policy=ContextPolicy(tokens=30_000),
                                     tools=Files(100))
    assert {e["action"] for e in of_type(events, "context")} == {"cleared"} and api.too_long == []
    calls = [b for m in api.requests[-1]["messages"] if m["role"] == "assistant" for b in m["content"]]
    assert calls[0]["input"] == {"path": "f0", "content": "[cleared to save context: 20000 characters]"}
    assert all(c["input"]["content"] == BIG_FILE for c in calls[-3:])


async def test_older_turns_are_summarised_when_clearing_is_not_enough():
    musing = "I think about the next file at length. " * 300  # 12 000 characters of text clearing cannot touch
    work = iter([*(turn(text(f"{i}: {musing}"), tool_use("read", {"path": f"f{i}"})) for i in range(8)),
                 turn(text("Done."))])
    summaries: list[dict] = []

    def step(body: dict) -> Any:
        if not body.get("tools"):
            summaries.append(body)
            return turn(text("Read f0 to f5; each holds the fox line 250 times. Next: f6."))
        return next(work)

    events, api, result = await agent_run([step] * 10, policy=ContextPolicy(tokens=20_000), tools=Files(200))
    assert result.final_text == "Done." and api.too_long == []
    summarised = of_type(events, "context")
    assert [e["action"] for e in summarised] == ["summarised"]
    assert summarised[0]["tokens_after"] < 10_000 < 20_000 < summarised[0]["tokens_before"]
    # The summary was made without tools from the turns it replaced, and the brief kept.
    request = summaries[0]["messages"][0]["content"]
    assert "0: I think about" in json.dumps(request) and "Read the files." in json.dumps(request)
    after = api.requests[api.requests.index(summaries[0]) + 1]["messages"]
    brief, summary = after[0]["content"][:2]
    assert brief["text"] == "Read the files." and summary["text"].startswith(SUMMARY_HEAD)
    assert "Next: f6." in summary["text"] and "0: I think about" not in json.dumps(after)
    assert after[1]["role"] == "assistant" and valid_pairs(after)
    assert all(count_tokens(body) < 20_000 for body in api.requests[api.requests.index(summaries[0]) + 1:])


async def test_the_api_clears_old_tool_results_itself_when_asked():
    policy = ContextPolicy(tokens=20_000, editing="api")
    script = [turn(tool_use("read", {"path": f"f{i}"})) for i in range(10)] + [turn(text("Done."))]
    events, api, result = await agent_run(script, policy=policy)
    assert result.final_text == "Done." and api.too_long == []
    edit = {"type": "clear_tool_uses_20250919", "trigger": {"type": "input_tokens", "value": 20_000},
            "keep": {"type": "tool_uses", "value": 3}, "clear_at_least": {"type": "input_tokens", "value": 10_000}}
    assert all(body["context_management"] == {"edits": [edit]} for body in api.requests)
    applied = of_type(events, "context")
    assert applied and all(e["action"] == "api_cleared" and e["cleared"] >= 1 for e in applied)
    assert all(e["tokens_after"] < e["tokens_before"] for e in applied)
    # The client keeps the whole transcript: its own clearing waits for the window's edge.
    assert not any("[cleared" in json.dumps(body) for body in api.requests)


async def test_a_crew_in_api_mode_has_each_role_ask_the_api_to_clear_and_reports_its_usage_after_it():
    @dataclass
    class NoTools:
        def specs(self) -> list[dict[str, Any]]:
            return []

    async with messages_api([turn(text("Nothing to do."))]) as api:
        client = anthropic.AsyncAnthropic(base_url=api.url, api_key=API_KEY, max_retries=0)
        crew = Crew(AnthropicModel(client, "claude-sonnet-test", 1000, 0, 0), NoTools(),
                    Budget(10**9, time.monotonic() + 60), EventLog("run_crew"), Redactor(),
                    context=ContextPolicy(tokens=50_000, editing="api"))
        events = [e async for e in run_role(crew, Role("coder", "You code.", frozenset(), 3), "Do.", AgentResult())]
    assert api.requests[0]["context_management"]["edits"][0]["trigger"]["value"] == 50_000
    assert crew.model.context_edit is None  # the run's model is left as it was
    assert [e["type"] for e in events[-2:]] == ["agent", "usage"]
    assert events[-1]["by_role"]["coder"]["output_tokens"] == events[-1]["output_tokens"] > 0


async def test_the_user_words_reach_the_agent_at_its_next_turn():
    said = iter([[], ["Also count the foxes. My key is sk-ant-api03-" + "Z" * 40], []])
    script = [turn(tool_use("read", {"path": "a"})), turn(tool_use("read", {"path": "b"})), turn(text("Done."))]
    events, api, _ = await agent_run(script, tools=Files(100), inbox=lambda: next(said))
    last = api.requests[1]["messages"][-1]["content"]
    assert [b["type"] for b in last] == ["tool_result", "text"]
    assert last[1]["text"].startswith("Also count the foxes.")
    assert "Also count" not in json.dumps(api.requests[0])
    message = of_type(events, "user_message")
    assert len(message) == 1 and message[0]["agent"] == "agent"
    assert message[0]["text"].startswith("Also count the foxes.") and "sk-ant-api03" not in message[0]["text"]
    # Shown before the turn that reads it.
    calls = [e for e in events if e["type"] == "tool_call" and e["state"] == "complete"]
    streamed = [e["seq"] for e in events if e["type"] == "tool_call" and e["id"] == calls[1]["id"]]
    assert calls[0]["seq"] < message[0]["seq"] < min(streamed)


async def test_a_role_is_warned_at_80_percent_of_its_money_and_stopped_at_its_limit():
    # 100 000 uncached input tokens at Sonnet's list price: $0.30 a call.
    script = [turn(tool_use("read", {"path": f"f{i}"}), input_tokens=100_000) for i in range(3)]
    budget = Budget(10**9, time.monotonic() + 60, max_cost_usd=10.0, role_max_cost_usd={"coder": 0.75})
    events, api, result = await agent_run(script, tools=Files(100), budget=budget, agent="coder")
    warnings = of_type(events, "budget")
    assert [(w["scope"], w["agent"]) for w in warnings] == [("coder", "coder")]
    assert 0.6 <= warnings[0]["spent_usd"] < 0.75 and warnings[0]["limit_usd"] == 0.75
    assert 0.8 <= warnings[0]["share"] < 1
    stopped = of_type(events, "stopped")[0]
    assert stopped["limit"] == "cost" and "TB_CODER_MAX_COST_USD" in stopped["message"]
    assert result.turns == 3 and len(api.requests) == 3
    report = budget.report()
    assert report["by_role"]["coder"]["cost_usd"] == report["cost_usd"] == pytest.approx(0.9, abs=0.01)
    assert report["by_role"]["coder"]["input_tokens"] == 300_000


async def test_the_run_stops_at_its_money_limit_and_publishes_a_draft(pool, make_repo):
    repo = make_repo(BUGGY)
    script = [turn(tool_use("sandbox_edit_file", {"path": "calc.py", "old_text": "a - b", "new_text": "a + b"}),
                   input_tokens=100_000),
              *(turn(tool_use("sandbox_read_file", {"path": "calc.py"}), input_tokens=100_000) for _ in range(3))]
    async with windowed(pool, script, 200_000, replace(LONG, max_cost_usd=1.0)) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Fix add().", "mode": "single"})
    warnings = of_type(events, "budget")
    assert [(w["scope"], w["limit_usd"]) for w in warnings] == [("run", 1.0)] and warnings[0]["share"] >= 0.8
    error = of_type(events, "error")[0]
    assert error["limit"] == "cost" and "TB_MAX_COST_USD" in error["message"]
    assert of_type(events, "pull_request")[0]["draft"] is True
    assert events[-1]["status"] == "limit" and events[-1]["limit"] == "cost"
    usage = of_type(events, "usage")
    assert usage[0]["by_role"]["agent"]["input_tokens"] >= 400_000 and usage[-1]["cost_usd"] >= 1.2


async def test_a_planner_over_its_own_limit_stops_the_team(pool, make_repo):
    repo = make_repo(BUGGY)
    script = [turn(tool_use("sandbox_read_file", {"path": "calc.py"}), input_tokens=100_000) for _ in range(3)]
    limits = replace(LONG, planner_max_cost_usd=0.75)
    async with windowed(pool, script, 200_000, limits) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(repo), "prompt": "Fix add()."})
    assert [(w["scope"], w["agent"]) for w in of_type(events, "budget")] == [("planner", "planner")]
    assert "TB_PLANNER_MAX_COST_USD" in of_type(events, "error")[0]["message"]
    assert events[-1]["status"] == "limit" and events[-1]["limit"] == "cost"
    assert [e["state"] for e in of_type(events, "agent")] == ["start", "stopped"]


async def test_a_run_through_the_service_in_api_mode_asks_the_api_to_clear(pool, make_repo):
    limits = replace(LONG, context_editing="api")
    script = [turn(tool_use("sandbox_read_file", {"path": "calc.py"})), turn(text("Nothing to change."))]
    async with windowed(pool, script, 200_000, limits) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Look", "mode": "single"})
    assert events[-1]["status"] == "no_changes"
    edits = [body.get("context_management") for body in s.api.requests]
    assert edits == [{"edits": [ContextPolicy.of(limits).api_edit()]}] * 2
