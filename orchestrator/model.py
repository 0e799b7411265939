"""The model: one streamed Messages API turn at a time, through the `anthropic` SDK."""

from __future__ import annotations

import asyncio
import copy
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import anthropic
from opentelemetry.trace import Span

from . import telemetry

CACHE = {"type": "ephemeral"}
CONTEXT_BETA = "context-management-2025-06-27"  # the Messages API's own clearing of old tool uses
# USD per million tokens: input, output, cache read, cache write (5 minutes). Sonnet's list price by default.
PRICES = {"opus": (5.0, 25.0, 0.5, 6.25), "haiku": (1.0, 5.0, 0.1, 1.25), "sonnet": (3.0, 15.0, 0.3, 3.75)}


def prices(model: str) -> tuple[float, float, float, float]:
    """The model's list prices, by its family's name in the model's name."""
    return next((p for family, p in PRICES.items() if family in model), PRICES["sonnet"])


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0

    def add(self, other: Usage) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens

    @property
    def sent(self) -> int:
        """The size of the prompt that was sent, however much of it the cache served."""
        return self.input_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens

    def cost_usd(self, model: str) -> float:
        price = prices(model)
        counts = (self.input_tokens, self.output_tokens, self.cache_read_input_tokens,
                  self.cache_creation_input_tokens)
        return round(sum(c * p for c, p in zip(counts, price)) / 1e6, 6)

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class TextDelta:
    text: str


@dataclass
class ToolInputDelta:
    index: int
    id: str
    name: str
    partial_json: str


@dataclass
class Retrying:
    attempt: int
    reason: str


@dataclass
class TurnDone:
    content: list[dict[str, Any]]
    stop_reason: str | None
    usage: Usage = field(default_factory=Usage)
    applied_edits: list[dict[str, Any]] = field(default_factory=list)  # what the API's context management cleared


ModelEvent = TextDelta | ToolInputDelta | Retrying | TurnDone


class Model(Protocol):
    name: str

    def turn(self, system: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
             ) -> AsyncIterator[ModelEvent]: ...


def with_cache_breakpoints(system: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
                           ) -> tuple[list[dict], list[dict], list[dict]]:
    """System, messages and tools with three cache breakpoints: tools, system, and the latest message."""
    system_blocks = [{"type": "text", "text": system, "cache_control": CACHE}]
    tools = [*tools[:-1], {**tools[-1], "cache_control": CACHE}] if tools else []
    messages = list(messages)
    if messages:
        last = copy.copy(messages[-1])
        content = last["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        blocks[-1] = {**blocks[-1], "cache_control": CACHE}
        last["content"] = blocks
        messages[-1] = last
    return system_blocks, messages, tools


NO_MODEL = ("no model API is set up: set ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN) for Claude, or ANTHROPIC_BASE_URL "
            "for a Messages-API-compatible server that needs no key, then restart the service")


def anthropic_client() -> tuple[anthropic.AsyncAnthropic, str | None]:
    """The SDK's client, configured by the environment as everywhere else, and what to set when it reaches no model."""
    client = anthropic.AsyncAnthropic()
    headers = {name.lower() for name, value in client.default_headers.items() if isinstance(value, str) and value}
    if client.credentials is not None or headers & {"authorization", "x-api-key"}:
        return client, None
    if os.environ.get("ANTHROPIC_BASE_URL"):
        # A compatible server that needs no key gets no credential header: the SDK sends none only when told to
        # omit it, and an empty key makes a header the HTTP library refuses before anything is sent.
        return anthropic.AsyncAnthropic(default_headers={"Authorization": anthropic.Omit()}), None
    return client, NO_MODEL


def _overloaded_mid_stream(exc: anthropic.APIStatusError) -> bool:
    """An overload the API reported inside a stream that had started (HTTP 200): the one failure the SDK does not
    retry itself. An HTTP 529 it has already retried `max_retries` times; retrying it again would multiply."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    return exc.status_code < 400 and isinstance(error, dict) and error.get("type") == "overloaded_error"


class AnthropicModel:
    """Claude through `AsyncAnthropic.messages.stream`; HTTP errors are retried by the SDK itself. With
    `context_edit` (a `clear_tool_uses_20250919` edit) it streams through the beta client, which applies it."""

    def __init__(self, client: anthropic.AsyncAnthropic, name: str, max_tokens: int, overloaded_retries: int = 3,
                 backoff_s: float = 2.0, context_edit: dict[str, Any] | None = None):
        self.client = client
        self.name = name
        self.max_tokens = max_tokens
        self.overloaded_retries = overloaded_retries
        self.backoff_s = backoff_s
        self.context_edit = context_edit

    async def count_tokens(self, system: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int:
        """The input tokens of a request, counted by the API (free of charge) without sending it."""
        counted = await self.client.messages.count_tokens(model=self.name, system=system, messages=messages,
                                                          tools=tools or anthropic.omit)
        return counted.input_tokens

    async def turn(self, system: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
                   ) -> AsyncIterator[ModelEvent]:
        with telemetry.model_span(self.name, self.max_tokens, messages) as span:
            system_blocks, messages, tools = with_cache_breakpoints(system, messages, tools)
            for attempt in range(self.overloaded_retries + 1):
                try:
                    async for event in self._stream(system_blocks, messages, tools, span):
                        yield event
                    return
                except anthropic.APIStatusError as exc:
                    # An overload reported inside a started stream is not retried by the SDK: retry the turn.
                    if not _overloaded_mid_stream(exc) or attempt == self.overloaded_retries:
                        raise
                    span.add_event("retry", {"attempt": attempt + 1, "error.type": "overloaded_error"})
                    yield Retrying(attempt + 1, "the model API is overloaded")
                    await asyncio.sleep(self.backoff_s * 2**attempt)

    async def _stream(self, system: list[dict], messages: list[dict], tools: list[dict], span: Span
                      ) -> AsyncIterator[ModelEvent]:
        blocks: dict[int, tuple[str, str]] = {}
        request: dict[str, Any] = {"model": self.name, "max_tokens": self.max_tokens, "system": system,
                                   "messages": messages, "tools": tools}
        if self.context_edit:
            opened = self.client.beta.messages.stream(**request, betas=[CONTEXT_BETA],
                                                      context_management={"edits": [self.context_edit]})
        else:
            opened = self.client.messages.stream(**request)
        async with opened as stream:
            async for event in stream:
                if event.type == "content_block_start" and event.content_block.type == "tool_use":
                    blocks[event.index] = (event.content_block.id, event.content_block.name)
                elif event.type == "content_block_delta":
                    if event.delta.type == "text_delta" and event.delta.text:
                        yield TextDelta(event.delta.text)
                    elif event.delta.type == "input_json_delta" and event.index in blocks:
                        yield ToolInputDelta(event.index, *blocks[event.index], event.delta.partial_json)
            final = await stream.get_final_message()
        u = final.usage
        usage = Usage(u.input_tokens or 0, u.output_tokens or 0, u.cache_read_input_tokens or 0,
                      u.cache_creation_input_tokens or 0)
        content = [b.model_dump(mode="json", exclude_none=True, include={"type", "text", "id", "name", "input"})
                   for b in final.content if b.type in ("text", "tool_use")]
        managed = getattr(final, "context_management", None)
        edits = [e.model_dump(mode="json") for e in managed.applied_edits] if managed else []
        telemetry.record_response(span, self.name, usage.as_dict(), final.stop_reason, content, final.id, final.model)
        yield TurnDone(content, final.stop_reason, usage, edits)
