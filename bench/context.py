"""What bounded context saves: one agent's 80-turn run whose every tool result is 20 000 characters, through the
real agent loop and the `anthropic` SDK against the scripted Messages API of tests/fakes (its tokenizer, context
window and prompt caching), the tools answered in process.

- with context management (the default budget of 100 000 tokens a request, cleared by the orchestrator), against
  the same run with none (the fake's window lifted, nothing cleared): the input tokens sent in all (uncached + cache
  read + cache write), at most 0.5x;
- the share of that input the cache served after the agent's first call, at least 80 %;
- for reference, the same run with the Messages API clearing (TB_CONTEXT_EDITING=api).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import anthropic

from common.redact import Redactor
from orchestrator.agent import AgentResult, run_agent
from orchestrator.budget import Budget
from orchestrator.context import Context, ContextPolicy
from orchestrator.events import EventLog
from orchestrator.model import AnthropicModel, Usage
from orchestrator.replay import Recorder
from orchestrator.tools import ToolOutput
from tests.fakes.messages_api import messages_api, text, tool_use, turn

from .sandbox import Result

TURNS = 80
RESULT_CHARS = 20_000
TARGET_RATIO = 0.5
TARGET_CACHED = 0.8
API_KEY = "sk-ant-api03-" + "C" * 48
UNBOUNDED = ContextPolicy(tokens=10**9, window=10**9 + 16_000)  # nothing is ever cleared


@dataclass
class Sources:
    """One tool that reads a module of `RESULT_CHARS` characters, different for each path."""

    def specs(self) -> list[dict[str, Any]]:
        return [{"name": "read_file", "description": "Read a source file.",
                 "input_schema": {"type": "object", "properties": {"path": {"type": "string"}},
                                  "required": ["path"]}}]

    async def call(self, name: str, arguments: dict[str, Any], call_id: str = "") -> ToolOutput:
        path = str(arguments.get("path"))
        lines = (f"{n:5}  def {path.replace('/', '_').removesuffix('.py')}_{n}(x): return x * {n}  # checked\n"
                 for n in range(1, 10**6))
        body = ""
        for line in lines:
            if len(body) + len(line) > RESULT_CHARS:
                break
            body += line
        return ToolOutput(body.ljust(RESULT_CHARS))


@dataclass
class Run:
    label: str
    calls: list[Usage]
    context_events: int
    refused: int
    seconds: float

    @property
    def sent(self) -> int:
        return sum(u.sent for u in self.calls)

    def cached_after_first(self) -> float:
        later = self.calls[1:]
        return sum(u.cache_read_input_tokens for u in later) / max(1, sum(u.sent for u in later))


async def run(label: str, policy: ContextPolicy, window: int | None) -> Run:
    """The scripted run under `policy`, against a model whose window is `window` tokens (None: no limit)."""
    script = [*(turn(tool_use("read_file", {"path": f"src/module_{i}.py"})) for i in range(TURNS)),
              turn(text("Read every module."))]
    calls: list[Usage] = []
    events, result, count = EventLog("run_bench"), AgentResult(), 0
    started = time.perf_counter()
    async with messages_api(script, context_window=window) as api:
        client = anthropic.AsyncAnthropic(base_url=api.url, api_key=API_KEY, max_retries=0)
        model = Recorder(AnthropicModel(client, "claude-sonnet-bench", policy.max_output, 0, 0, policy.api_edit()),
                         lambda t: calls.append(Usage(**t["usage"])))
        async for event in run_agent(model, Sources(), "You read the modules you are asked to.",
                                     f"Read src/module_0.py to src/module_{TURNS - 1}.py, one a turn.",
                                     Budget(10**10, time.monotonic() + 600), events, result, max_turns=TURNS + 1,
                                     redact=Redactor([]), context=Context(policy, "agent", events)):
            count += event["type"] == "context"
    return Run(label, calls, count, len(api.too_long), time.perf_counter() - started)


def show(r: Run) -> None:
    print(f"{r.label:<40} {len(r.calls):>3} calls, input {r.sent:>11,} tokens, cache read after the first call "
          f"{r.cached_after_first():6.1%}, {r.context_events:>2} context events, {r.refused} refused "
          f"({r.seconds:.1f} s)")


async def main() -> list[Result]:
    logging.disable(logging.INFO)
    print(f"\ncontext benchmarks: one agent, {TURNS} turns of {RESULT_CHARS:,}-character tool results, scripted "
          "model with its window and prompt cache")
    managed = await run("context managed (client)", ContextPolicy(), 200_000)
    bare = await run("no context management, no window", UNBOUNDED, None)
    api = await run("for reference: the API clears (api)", ContextPolicy(editing="api"), 200_000)
    for r in (managed, bare, api):
        show(r)
    ratio = managed.sent / bare.sent
    fits, cheaper, cached = managed.refused == 0, ratio <= TARGET_RATIO, managed.cached_after_first() >= TARGET_CACHED
    print(f"input tokens, managed against none: ratio {ratio:.2f}x (target <= {TARGET_RATIO:g}x) "
          f"{'OK' if cheaper else 'MISSED'}; cache read after the first call {managed.cached_after_first():.1%} "
          f"(target >= {TARGET_CACHED:.0%}) {'OK' if cached else 'MISSED'}; refused for length {managed.refused} "
          f"(target 0) {'OK' if fits else 'MISSED'}")
    return [Result("context: input tokens <= 0.5x of none", cheaper),
            Result("context: cache read >= 80% after the first call", cached),
            Result("context: no request refused for its length", fits)]
