"""Bounded context: each request an agent sends stays under a budget of input tokens.

Before each call the request's size is estimated from its characters, at the tokens per character the responses so
far showed (a response's usage counts what was sent: input + cache read + cache write), with a margin; before any
response, a request that looks too big is counted by the API instead. Over the budget, the transcript is cut down
to a low-water mark in one batch, so that its prefix then stays the same for many turns and the prompt cache keeps
serving it:
1. the results of old tool calls give way to a note of what they were and how to get them again (the most recent
   few stay);
2. then the large inputs of old tool calls (a written file's content) give way to a note of their size;
3. when that is not enough, older turns are summarised by the model itself, in one call without tools, and replaced
   by the summary; the brief stays as it was, and every tool call kept keeps its result.
A request refused for its length anyway teaches the real count and window: more is cleared and the turn is tried
again, a few times at most. With TB_CONTEXT_EDITING=api the Messages API clears old tool results itself (its
context management beta, `ContextPolicy.api_edit`), and the clearing here is the backstop at the window's edge.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anthropic

from .events import Event, EventLog
from .model import Model, TurnDone
from .output import fit

if TYPE_CHECKING:
    from .budget import Budget
    from .config import RunLimits

FIRST_TOKENS_PER_CHAR = 0.5  # before any response: more than any tokenizer gives ordinary text and code
MARGIN = 1.1  # on every estimate
# What a tokenizer may give per character, at most and at least: a usage outside it (a proxy that counts otherwise)
# teaches nothing, so what it teaches is held to it.
TOKENS_PER_CHAR = (0.05, 1.5)
LOW_WATER = 0.5  # of the budget: where a clearing stops, so that the next one is many turns away
EDGE = 0.9  # of the room the window leaves a prompt: where the backstop clears when the API clears first
MIN_GAIN_CHARS = 200  # a result or input shorter than its note plus this is left as it is
REFUSALS = 3  # requests refused for their length in a row before the agent stops
PIECE_CHARS = 2000  # of each block, in what the summary is made from
CLEARED = "[cleared to save context"
SUMMARY_HEAD = "[Summary of your earlier turns, which were removed to save context]\n"
SUMMARISE = """\
You condense the record of a software engineering agent's work so that it can carry on without the full record.
Write for the agent itself, as notes: what it found (files, functions, facts, with exact paths and names), what it
changed and how, what it ran and with what result, what failed and why, every message of the user in full, and what
remains to do. Keep what the next steps need; drop the rest. Reply with the notes alone; you cannot call tools.
"""
TOO_LONG = re.compile(r"prompt is too long|exceed context limit")


def too_long(exc: BaseException) -> bool:
    """Whether the API refused a request for its length."""
    return isinstance(exc, anthropic.BadRequestError) and bool(TOO_LONG.search(str(exc.message)))


@dataclass(frozen=True)
class ContextPolicy:
    """How much of the model's context window an agent's requests may use."""

    tokens: int = 100_000  # a request's budget of input tokens (TB_CONTEXT_TOKENS)
    window: int = 200_000  # the model's context window (TB_CONTEXT_WINDOW)
    max_output: int = 16_000  # what a reply may take of the window (TB_MAX_OUTPUT_TOKENS)
    editing: str = "client"  # "api": the Messages API clears old tool results first (TB_CONTEXT_EDITING)
    keep_results: int = 3  # the most recent tool results are never cleared

    @classmethod
    def of(cls, limits: RunLimits) -> ContextPolicy:
        return cls(limits.context_tokens, limits.context_window, limits.max_output_tokens, limits.context_editing)

    def api_edit(self) -> dict[str, Any] | None:
        """The Messages API's edit that clears old tool results at this budget, in the same batches; None unless
        the API is to clear."""
        if self.editing != "api":
            return None
        return {"type": "clear_tool_uses_20250919", "trigger": {"type": "input_tokens", "value": self.tokens},
                "keep": {"type": "tool_uses", "value": self.keep_results},
                "clear_at_least": {"type": "input_tokens", "value": self.tokens - int(self.tokens * LOW_WATER)}}


class Context:
    """One agent's transcript kept under its budget: call `fit` before each model call, `observed` after it, and
    `refused` when the API refused the request for its length."""

    def __init__(self, policy: ContextPolicy, agent: str, events: EventLog):
        self.policy = policy
        self.agent = agent
        self.events = events
        room = policy.window - policy.max_output
        # When the API clears at the budget, the transcript itself may grow up to the window's edge.
        self.limit = policy.tokens if policy.editing == "client" else max(policy.tokens, int(room * EDGE))
        self.low_water = int(policy.tokens * LOW_WATER)
        self.ratios: deque[float] = deque(maxlen=4)  # tokens per character of the last responses
        self.estimate = 0  # of the request `fit` last passed
        self.sent_chars = 0
        self.refusals = 0
        self.force = False  # the last request was refused: clear down to the low-water mark whatever the estimate

    def learn(self, tokens: int, chars: int) -> None:
        """Take `tokens` as the true size of a request of `chars` characters."""
        if tokens > 0 and chars > 0:
            self.ratios.append(min(max(tokens / chars, TOKENS_PER_CHAR[0]), TOKENS_PER_CHAR[1]))

    def tokens_per_char(self) -> float:
        return max(self.ratios) if self.ratios else FIRST_TOKENS_PER_CHAR

    def tokens(self, chars: int) -> int:
        return math.ceil(chars * self.tokens_per_char() * MARGIN)

    async def fit(self, model: Model, system: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                  budget: Budget) -> AsyncIterator[Event]:
        """Bring the transcript under the budget, in place; each clearing and summary is an event."""
        chars = _chars(system, messages, tools)
        tokens = self.tokens(chars)
        count = getattr(model, "count_tokens", None)
        if tokens > self.limit and not self.ratios and count is not None:
            try:  # no response has shown how this model counts yet: ask rather than guess
                self.learn(await count(system, messages, tools), chars)
                tokens = self.tokens(chars)
            except anthropic.APIError:
                pass
        if tokens > self.limit or self.force:
            cleared = self._clear(messages, chars - math.floor(self.low_water / (self.tokens_per_char() * MARGIN)))
            if cleared:
                after = self.tokens(chars := _chars(system, messages, tools))
                yield self.events("context", agent=self.agent, action="cleared", cleared=cleared,
                                  tokens_before=tokens, tokens_after=after)
                tokens = after
        if tokens > self.limit:
            async for event in self._summarise(model, system, messages, tools, budget, tokens):
                yield event
            chars = _chars(system, messages, tools)
            tokens = self.tokens(chars)
        self.force = False
        self.estimate, self.sent_chars = tokens, chars

    def observed(self, done: TurnDone) -> list[Event]:
        """Learn from a response how the model counts; what the API cleared itself, as events."""
        cleared = sum(int(e.get("cleared_input_tokens") or 0) for e in done.applied_edits)
        sent = done.usage.sent + cleared  # the API counts what it read, after its own clearing
        self.learn(sent, self.sent_chars)
        self.refusals = 0
        return [self.events("context", agent=self.agent, action="api_cleared",
                            cleared=int(e.get("cleared_tool_uses") or 0), tokens_before=sent,
                            tokens_after=sent - int(e.get("cleared_input_tokens") or 0))
                for e in done.applied_edits]

    def refused(self, exc: anthropic.BadRequestError) -> bool:
        """Learn from a refusal for length the real count and window; False when trying again is no use."""
        self.refusals += 1
        if self.refusals > REFUSALS:
            return False
        message = str(exc.message)
        counted = room = None
        if found := re.search(r"(\d+) tokens > (\d+) maximum", message):
            counted, room = int(found[1]), int(found[2]) - self.policy.max_output
        elif found := re.search(r"(\d+) \+ (\d+) > (\d+)", message):
            counted, room = int(found[1]), int(found[3]) - int(found[2])
        self.learn(counted or 0, self.sent_chars)
        room = int(room * EDGE) if room and room > 0 else int(self.limit * 0.7)
        self.limit = max(1, min(self.limit, room))
        self.low_water = min(self.low_water, int(self.limit * LOW_WATER))
        self.force = True
        return True

    def _clear(self, messages: list[dict[str, Any]], drop_chars: int) -> int:
        """Clear old tool results, then old large tool inputs, oldest first, until `drop_chars` characters are
        gone or nothing is left to clear; how many were cleared."""
        uses = {b["id"]: b for m in messages if m["role"] == "assistant" for b in _list(m["content"])
                if b["type"] == "tool_use"}
        results = [(m, k) for m in messages if m["role"] == "user" for k, b in enumerate(_list(m["content"]))
                   if b["type"] == "tool_result"]
        keep = self.policy.keep_results
        dropped = cleared = 0
        for message, k in results[:max(len(results) - keep, 0)]:
            if dropped >= drop_chars:
                return cleared
            block = message["content"][k]
            content = block.get("content")
            if isinstance(content, str) and content.startswith(CLEARED):
                continue
            note = _result_note(uses.get(block["tool_use_id"]), block)
            gain = _size(content) - _size(note)
            if gain < MIN_GAIN_CHARS:
                continue
            message["content"] = [*message["content"][:k], {**block, "content": note}, *message["content"][k + 1:]]
            dropped, cleared = dropped + gain, cleared + 1
        old = set(list(uses)[:max(len(uses) - keep, 0)])
        for message in (m for m in messages if m["role"] == "assistant"):
            for k, block in enumerate(_list(message["content"])):
                if dropped >= drop_chars:
                    return cleared
                if block["type"] != "tool_use" or block["id"] not in old or not isinstance(block["input"], dict):
                    continue
                inputs = dict(block["input"])
                for key, value in block["input"].items():
                    note = f"{CLEARED}: {len(value)} characters]" if isinstance(value, str) else ""
                    if note and not value.startswith(CLEARED) and _size(value) - _size(note) >= MIN_GAIN_CHARS:
                        inputs[key] = note
                        dropped, cleared = dropped + _size(value) - _size(note), cleared + 1
                if inputs != block["input"]:
                    message["content"] = [*message["content"][:k], {**block, "input": inputs},
                                          *message["content"][k + 1:]]
        return cleared

    async def _summarise(self, model: Model, system: str, messages: list[dict[str, Any]],
                         tools: list[dict[str, Any]], budget: Budget, tokens: int) -> AsyncIterator[Event]:
        """Replace the turns before the most recent ones by the model's summary of them, kept with the brief."""
        starts = [i for i, m in enumerate(messages) if i > 0 and m["role"] == "assistant"]
        keep = len(starts[-self.policy.keep_results:])
        # The most recent turns stay, fewer when they alone are over the low-water mark; one stays at least.
        while keep > 1 and self.tokens(_chars(system, [messages[0], *messages[starts[-keep]:]], tools)) \
                > self.low_water:
            keep -= 1
        cut = starts[-keep] if starts else 0
        if cut <= 1:
            return  # nothing before the turn in progress: no summary can help
        request = _summary_request(messages, cut, int(self.policy.window * LOW_WATER / self.tokens_per_char()))
        for warning in budget.check(self.agent, model.name, self.tokens(len(SUMMARISE) + len(request))):
            yield self.events("budget", agent=self.agent, **warning)
        done: TurnDone | None = None
        try:
            async for event in model.turn(SUMMARISE, [{"role": "user", "content": request}], []):
                if isinstance(event, TurnDone):
                    done = event
        except anthropic.BadRequestError as exc:
            if not too_long(exc):
                raise
            return  # the older turns stay; the request is then refused and cleared harder, or the agent stops
        assert done is not None, "the model stream ended without a final message"
        budget.charge(done.usage, model.name, self.agent)
        summary = "\n".join(b["text"] for b in done.content if b["type"] == "text").strip()
        if not summary:
            return
        head = [b for b in _list(messages[0]["content"]) if not b.get("text", "").startswith(SUMMARY_HEAD)]
        messages[:cut] = [{"role": "user", "content": [*head, {"type": "text", "text": SUMMARY_HEAD + summary}]}]
        after = self.tokens(_chars(system, messages, tools))
        yield self.events("context", agent=self.agent, action="summarised", cleared=cut - 1, tokens_before=tokens,
                          tokens_after=after)


def _list(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str) else len(json.dumps(value, ensure_ascii=False))


def _chars(system: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int:
    return len(system) + _size(tools) + _size(messages)


def _arguments(arguments: Any) -> str:
    """A call's inputs, short: the long ones by their size."""
    if not isinstance(arguments, dict):
        return ""
    shown = []
    for key, value in arguments.items():
        if isinstance(value, str) and len(value) > 120:
            value = f"<{len(value)} characters>" if len(value) > 1000 or value.startswith(CLEARED) \
                else value[:100] + "…"
        shown.append(f"{key}={json.dumps(value, ensure_ascii=False)[:120]}")
    return ", ".join(shown)


def _result_note(use: dict[str, Any] | None, result: dict[str, Any]) -> str:
    name = use["name"] if use else "a tool"
    call = f"{name}({_arguments(use['input'])})" if use else name
    error = " as an error" if result.get("is_error") else ""
    return (f"{CLEARED}: {call} returned {_size(result.get('content'))} characters{error}; call it again if you need "
            "them]")


def _render(messages: list[dict[str, Any]], names: dict[str, str]) -> str:
    lines = []
    for message in messages:
        for block in _list(message["content"]):
            if block["type"] == "text":  # the user's words whole: the summary must keep every one of them
                said = block["text"] if message["role"] == "user" else fit(block["text"], PIECE_CHARS)
                lines.append(f"{message['role']}: {said}")
            elif block["type"] == "tool_use":
                lines.append(f"assistant called {block['name']}: "
                             f"{fit(json.dumps(block['input'], ensure_ascii=False), PIECE_CHARS)}")
            elif block["type"] == "tool_result":
                content = block.get("content")
                content = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
                error = " (an error)" if block.get("is_error") else ""
                lines.append(f"{names.get(block['tool_use_id'], 'the tool')} returned{error}: "
                             f"{fit(content, PIECE_CHARS)}")
    return "\n\n".join(lines)


def _summary_request(messages: list[dict[str, Any]], cut: int, max_chars: int) -> str:
    """What the summary is made from: the brief, an earlier summary, and the turns from the second message to
    `cut`, at most `max_chars` characters."""
    names = {b["id"]: b["name"] for m in messages for b in _list(m["content"]) if b["type"] == "tool_use"}
    head = _list(messages[0]["content"])
    brief = "\n\n".join(b["text"] for b in head if b["type"] == "text" and not b["text"].startswith(SUMMARY_HEAD))
    earlier = "".join(b["text"].removeprefix(SUMMARY_HEAD) for b in head
                      if b["type"] == "text" and b["text"].startswith(SUMMARY_HEAD))
    parts = [f"The agent's task:\n<task>\n{fit(brief, 4 * PIECE_CHARS)}\n</task>"]
    if earlier:
        parts.append(f"The summary of its turns before these:\n<summary>\n{earlier}\n</summary>")
    turns = _render(messages[1:cut], names)
    room = max(max_chars - sum(map(len, parts)) - 200, PIECE_CHARS)
    parts.append(f"Its turns to summarise:\n<turns>\n{fit(turns, room)}\n</turns>")
    parts.append("Write the notes that will replace these turns.")
    return "\n\n".join(parts)


Inbox = Callable[[], list[str]]  # the user's messages to an agent at work, taken once each


def take_messages(inbox: Inbox | None, messages: list[dict[str, Any]]) -> list[str]:
    """Add what the user said meanwhile to the transcript as the user's words: into the last message when it is the
    user's, else as a new one; the texts added."""
    said = [text for text in (inbox() if inbox else []) if text.strip()]
    if not said:
        return []
    blocks = [{"type": "text", "text": text} for text in said]
    if messages and messages[-1]["role"] == "user":
        messages[-1] = {**messages[-1], "content": [*_list(messages[-1]["content"]), *blocks]}
    else:
        messages.append({"role": "user", "content": blocks})
    return said

