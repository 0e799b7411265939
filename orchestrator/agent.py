"""The agent loop: one async generator over a `Model` and a `ToolSet`; `messages` is the transcript."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from common.redact import Redactor, StreamRedactor

from .events import Event, EventLog
from .model import Model, Retrying, TextDelta, ToolInputDelta, TurnDone, Usage
from .tools import ToolSet, call_all

EVENT_RESULT_CHARS = 4000  # how much of a tool result the stream shows; the model gets more


class LimitReached(Exception):
    """A bound of the run was hit; `limit` names it."""

    def __init__(self, limit: str, message: str):
        super().__init__(message)
        self.limit = limit


@dataclass
class Budget:
    """What a whole run may spend, shared by its agents."""

    max_tokens: int
    deadline: float  # time.monotonic() value
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def check(self) -> None:
        if self.remaining_s() <= 0:
            raise LimitReached("run_seconds", "the run's wall-clock limit was reached (TB_RUN_TIMEOUT_S)")
        if self.usage.total >= self.max_tokens:
            raise LimitReached("tokens", f"the run used {self.usage.total} tokens, its limit (TB_MAX_TOKENS)")


@dataclass
class AgentResult:
    final_text: str = ""
    turns: int = 0
    usage: Usage = field(default_factory=Usage)
    messages: list[dict[str, Any]] = field(default_factory=list)
    submitted: dict[str, Any] | None = None  # what a role's submit tool handed over


async def run_agent(model: Model, tools: ToolSet, system: str, brief: str, budget: Budget, events: EventLog,
                    result: AgentResult, *, max_turns: int, redact: Redactor, agent: str = "agent",
                    must_call: str | None = None) -> AsyncIterator[Event]:
    """Run turns until the model asks for no tool (or hands over with a final tool); stream what happens; raise
    `LimitReached` at a bound. With `must_call`, stopping without that tool earns a reminder, not an ending."""
    messages = result.messages
    messages.append({"role": "user", "content": brief})
    while True:
        if result.turns >= max_turns:
            raise LimitReached("turns", f"{agent} reached its limit of {max_turns} turns (TB_MAX_TURNS)")
        budget.check()
        result.turns += 1
        done: TurnDone | None = None
        # Streamed pieces are redacted as a whole: a secret split across two deltas is still caught.
        text_out, inputs = StreamRedactor(redact), {}
        try:
            async with _deadline(budget):
                async for ev in model.turn(system, messages, tools.specs()):
                    if isinstance(ev, TextDelta):
                        if piece := text_out.feed(ev.text):
                            yield events("text", agent=agent, text=piece)
                    elif isinstance(ev, ToolInputDelta):
                        if piece := inputs.setdefault(ev.id, StreamRedactor(redact)).feed(ev.partial_json):
                            yield events("tool_call", agent=agent, id=ev.id, name=ev.name, state="streaming",
                                         partial_input=piece)
                    elif isinstance(ev, Retrying):
                        text_out, inputs = StreamRedactor(redact), {}
                        yield events("status", agent=agent, stage="retry", attempt=ev.attempt, message=ev.reason)
                    else:
                        done = ev
        except TimeoutError:
            raise LimitReached("run_seconds", "the run's wall-clock limit was reached during a model call") from None
        assert done is not None, "the model stream ended without a final message"
        if piece := text_out.flush():
            yield events("text", agent=agent, text=piece)
        budget.usage.add(done.usage)
        budget.cost_usd += done.usage.cost_usd(model.name)  # each agent at its own model's price
        result.usage.add(done.usage)
        # The API refuses empty text blocks in a transcript.
        content = [b for b in done.content if b["type"] != "text" or b["text"].strip()]
        calls = [b for b in content if b["type"] == "tool_use"]
        result.final_text = "\n".join(b["text"] for b in content if b["type"] == "text") or result.final_text
        if content:
            messages.append({"role": "assistant", "content": content})
        if done.stop_reason == "max_tokens":
            # A cut-off turn: its last tool call may be incomplete, so none of them runs; the model goes on instead.
            messages.append({"role": "user", "content": [
                *({"type": "tool_result", "tool_use_id": c["id"], "is_error": True,
                   "content": "not run: your reply was cut off at the output limit; make this call again"}
                  for c in calls),
                {"type": "text", "text": "Your reply was cut off at the output limit. Continue, in smaller steps."}]})
            continue
        if not calls:
            if must_call is None:
                return
            messages.append({"role": "user", "content": f"Finish by calling {must_call}; nothing is handed over "
                                                        "until you do."})
            continue
        for call in calls:
            yield events("tool_call", agent=agent, id=call["id"], name=call["name"], state="complete",
                         input=call["input"])
        try:
            async with _deadline(budget):
                outputs = await call_all(tools, calls)
        except TimeoutError:
            raise LimitReached("run_seconds", "the run's wall-clock limit was reached during a tool call") from None
        for call, out in zip(calls, outputs):
            yield events("tool_result", agent=agent, id=call["id"], name=call["name"], is_error=out.is_error,
                         content=_preview(redact(out.text)))
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call["id"], "content": out.text or "(no output)",
             "is_error": out.is_error}
            for call, out in zip(calls, outputs)]})
        if any(out.final for out in outputs):
            return


def _preview(text: str) -> str:
    return text if len(text) <= EVENT_RESULT_CHARS else text[:EVENT_RESULT_CHARS] + " …"


def _deadline(budget: Budget) -> asyncio.Timeout:
    return asyncio.timeout(max(0.0, budget.remaining_s()))
