"""The agent loop: one async generator over a `Model` and a `ToolSet`; `messages` is the transcript, kept under
its budget by a `Context` before each model call (context.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anthropic

from common.redact import Redactor, StreamRedactor

from .budget import Budget, LimitReached
from .context import Context, ContextPolicy, Inbox, take_messages, too_long
from .events import Event, EventLog
from .model import Model, Retrying, TextDelta, ToolInputDelta, TurnDone, Usage
from .tools import ToolSet, call_all

EVENT_RESULT_CHARS = 4000  # how much of a tool result the stream shows; the model gets more


@dataclass
class AgentResult:
    final_text: str = ""
    turns: int = 0
    usage: Usage = field(default_factory=Usage)
    messages: list[dict[str, Any]] = field(default_factory=list)
    submitted: dict[str, Any] | None = None  # what a role's submit tool handed over


async def run_agent(model: Model, tools: ToolSet, system: str, brief: str, budget: Budget, events: EventLog,
                    result: AgentResult, *, max_turns: int, redact: Redactor, agent: str = "agent",
                    must_call: str | None = None, context: Context | None = None,
                    inbox: Inbox | None = None) -> AsyncIterator[Event]:
    """Run turns until the model asks for no tool (or hands over with a final tool); stream what happens; raise
    `LimitReached` at a bound. With `must_call`, stopping without that tool earns a reminder, not an ending. What
    `inbox` returns before a turn is what the user said meanwhile: the model reads it in that turn."""
    messages = result.messages
    messages.append({"role": "user", "content": brief})
    context = context or Context(ContextPolicy(), agent, events)
    while True:
        if result.turns >= max_turns:
            raise LimitReached("turns", f"{agent} reached its limit of {max_turns} turns (TB_MAX_TURNS)")
        for said in take_messages(inbox, messages):
            yield events("user_message", agent=agent, text=redact(said))
        done: TurnDone | None = None
        async for item in _model_turn(model, tools, system, messages, budget, events, context, redact, agent):
            if isinstance(item, TurnDone):
                done = item
            else:
                yield item
        assert done is not None
        result.turns += 1
        budget.charge(done.usage, model.name, agent)  # each agent at its own model's price
        result.usage.add(done.usage)
        for event in context.observed(done):
            yield event
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


async def _model_turn(model: Model, tools: ToolSet, system: str, messages: list[dict[str, Any]], budget: Budget,
                      events: EventLog, context: Context, redact: Redactor, agent: str
                      ) -> AsyncIterator[Event | TurnDone]:
    """One model call, the transcript fitted to its budget first, streamed as events and ending with its
    `TurnDone`; a request refused for its length is fitted harder and sent again."""
    while True:
        specs = tools.specs()
        try:
            async with _deadline(budget):
                async for event in context.fit(model, system, messages, specs, budget):
                    yield event
        except TimeoutError:
            raise LimitReached("run_seconds", "the run's wall-clock limit was reached while fitting the context") \
                from None
        for warning in budget.check(agent, model.name, context.estimate):
            yield events("budget", agent=agent, **warning)
        # Streamed pieces are redacted as a whole: a secret split across two deltas is still caught.
        text_out, inputs = StreamRedactor(redact), {}
        done: TurnDone | None = None
        try:
            async with _deadline(budget):
                async for ev in model.turn(system, messages, specs):
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
        except anthropic.BadRequestError as exc:
            if not too_long(exc):
                raise
            if not context.refused(exc):
                raise LimitReached("context", f"{agent}'s requests stayed too long for the model's context window "
                                              f"however much was cleared: {exc.message} (TB_CONTEXT_WINDOW)") from None
            continue
        assert done is not None, "the model stream ended without a final message"
        if piece := text_out.flush():
            yield events("text", agent=agent, text=piece)
        yield done
        return


def _preview(text: str) -> str:
    return text if len(text) <= EVENT_RESULT_CHARS else text[:EVENT_RESULT_CHARS] + " …"


def _deadline(budget: Budget) -> asyncio.Timeout:
    return asyncio.timeout(max(0.0, budget.remaining_s()))
