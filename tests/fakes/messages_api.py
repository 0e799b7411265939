"""A scripted Anthropic Messages API on loopback that the real `anthropic` SDK talks to.

Each call to `POST /v1/messages` is answered by the next scripted step: a model turn (streamed as the real SSE
events, or as one Message JSON when `stream` is false), an HTTP error, or an error event inside the stream. Requests
the real API would refuse get its 400 and are recorded as problems, as are calls beyond the script and steps left
unused; `messages_api` raises them when its block ends, so a test cannot pass over them.

    script = [turn(text("Looking."), tool_use("read_file", {"path": "a.py"})), turn(text("Done."))]
    async with messages_api(script) as api:
        client = anthropic.AsyncAnthropic(base_url=api.url, api_key="sk-ant-test")
        ...
    api.requests  # every JSON body received, in order

Like the real API it refuses a request without a credential, or with an empty one (401). `keyless=True` makes it a
Messages-API-compatible local server that needs no key, as `ANTHROPIC_BASE_URL` may point at.

It is as strict as the real API about context (see tests/fakes/messages_tokens.py for how it counts): a prompt over
`context_window` tokens (200_000 by default, None for no limit), or one whose `max_tokens` would not fit after it,
gets the real API's 400; such a refusal takes no step, is no problem, and its token count goes to `api.too_long`.
A turn's usage is computed with prompt caching, per server, unless the script gives the numbers;
`POST /v1/messages/count_tokens` answers with the same count. `context_management` edits
(`clear_tool_uses_20250919`, beta `context-management-2025-06-27`) are applied before anything is counted and
reported in the response (a stream reports them in its `message_delta` event).

`latency_s` makes each `POST /v1/messages` wait that long before it is answered, as a real model's time to answer
(a request refused as invalid or too long is refused at once); calls in flight together wait together.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import string
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.messages_rules import validate
from tests.fakes.messages_tokens import PromptCache, apply_context_edits, content_tokens, count_tokens

__all__ = ["MessagesAPI", "count_tokens", "http_error", "messages_api", "stream_error", "text", "tool_use", "turn"]

CHUNK = 12  # characters per delta, so a client sees every block arrive in pieces as it does from the real API
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               504: "timeout_error", 529: "overloaded_error"}
STATUS_OF = {kind: status for status, kind in ERROR_TYPES.items()}


def _new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(24))


@dataclass(frozen=True)
class Turn:
    """One model response; token counts left as None are computed from the request and the content."""

    content: tuple[dict[str, Any], ...]
    stop_reason: str
    usage: dict[str, int | None]


@dataclass(frozen=True)
class HttpError:
    """An HTTP error response with the real API's JSON body and retry headers."""

    status: int
    error_type: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamError:
    """A stream that starts, sends `partial_text`, then an `error` event instead of finishing."""

    error_type: str
    message: str
    partial_text: str = ""


Reply = Turn | HttpError | StreamError
Step = Reply | Callable[[dict[str, Any]], Reply]


def text(value: str) -> dict[str, Any]:
    """A text content block."""
    return {"type": "text", "text": value}


def tool_use(name: str, input: dict[str, Any], *, id: str | None = None) -> dict[str, Any]:
    """A tool_use content block with a fresh `toolu_…` id unless one is given."""
    return {"type": "tool_use", "id": id or _new_id("toolu_01"), "name": name, "input": input}


def turn(*content: dict[str, Any], stop_reason: str | None = None, input_tokens: int | None = None,
         output_tokens: int | None = None, cache_read_input_tokens: int | None = None,
         cache_creation_input_tokens: int | None = None) -> Turn:
    """A model turn; it stops for `tool_use` when it calls a tool and at `end_turn` otherwise. Token numbers left
    out are computed from the request (with prompt caching) and from the content."""
    calls_tool = any(block["type"] == "tool_use" for block in content)
    return Turn(content, stop_reason or ("tool_use" if calls_tool else "end_turn"),
                {"input_tokens": input_tokens, "output_tokens": output_tokens,
                 "cache_read_input_tokens": cache_read_input_tokens,
                 "cache_creation_input_tokens": cache_creation_input_tokens})


def http_error(status: int, error_type: str | None = None, message: str | None = None, *,
               should_retry: bool | None = None, retry_after_ms: int = 1) -> HttpError:
    """An HTTP error; retryable statuses ask the SDK to retry after `retry_after_ms`, which keeps tests fast."""
    error_type = error_type or ERROR_TYPES.get(status, "api_error")
    retryable = (status in (408, 409, 429) or status >= 500) if should_retry is None else should_retry
    headers = {"x-should-retry": "true", "retry-after-ms": str(retry_after_ms)} if retryable else \
        {"x-should-retry": "false"}
    return HttpError(status, error_type, message or error_type.removesuffix("_error").replace("_", " ").capitalize(),
                     headers)


def stream_error(error_type: str = "overloaded_error", message: str = "Overloaded", *,
                 partial_text: str = "") -> StreamError:
    """An `event: error` in the middle of an otherwise successful stream."""
    return StreamError(error_type, message, partial_text)


def _chunks(value: str) -> list[str]:
    return [value[i:i + CHUNK] for i in range(0, len(value), CHUNK)]


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def _block_events(index: int, block: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if block["type"] == "text":
        yield {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
        deltas = [{"type": "text_delta", "text": piece} for piece in _chunks(block["text"])]
    else:
        yield {"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}}
        # The real API opens a tool's input with an empty fragment.
        deltas = [{"type": "input_json_delta", "partial_json": piece}
                  for piece in ["", *_chunks(json.dumps(block["input"]))]]
    for delta in deltas:
        yield {"type": "content_block_delta", "index": index, "delta": delta}


class MessagesAPI:
    """Answers each call with the next scripted step and records every body it receives."""

    def __init__(self, steps: Iterable[Step], keyless: bool = False, context_window: int | None = 200_000,
                 latency_s: float = 0.0) -> None:
        self.url = ""
        self.keyless = keyless
        self.context_window = context_window
        self.latency_s = latency_s
        self.requests: list[Any] = []
        self.counted: list[Any] = []  # bodies sent to count_tokens
        self.too_long: list[int] = []  # token counts of the prompts refused as over the context window
        self.problems: list[str] = []
        self.cache = PromptCache()
        self._steps: deque[Step] = deque(steps)

    def assert_done(self) -> None:
        """Raise if a request was refused, a call came after the script ended, or steps are left unused."""
        problems = self.problems + ([f"{len(self._steps)} scripted step(s) left unused: {list(self._steps)}"]
                                    if self._steps else [])
        if problems:
            raise AssertionError("fake Messages API:\n  " + "\n  ".join(problems))

    def _error(self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None,
               problem: str | None = None) -> web.Response:
        if problem:
            self.problems.append(problem)
        request_id = _new_id("req_")
        body = {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}
        return web.json_response(body, status=status,
                                 headers={"request-id": request_id, "x-should-retry": "false", **(headers or {})})

    async def _unknown(self, request: web.Request) -> web.Response:
        return self._error(404, "not_found_error", "Not Found",
                           problem=f"unexpected request {request.method} {request.path}")

    async def _accepted(self, request: web.Request, calls: list[Any], call: str,
                        count: bool = False) -> tuple[Any, web.Response | None]:
        """The request's JSON body, recorded in `calls`, and the error response when the real API would refuse it."""
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        calls.append(body)
        call = f"{call} {len(calls)}"
        if refused := self._refused_credential(request):
            return body, self._error(401, "authentication_error", refused, problem=f"{call}: {refused}")
        if not request.headers.get("anthropic-version"):
            return body, self._error(400, "invalid_request_error", "anthropic-version: header is required",
                                     problem=f"{call}: no anthropic-version header")
        betas = {name.strip() for name in request.headers.get("anthropic-beta", "").split(",")}
        if problem := validate(body, betas=betas, count=count):
            return body, self._error(400, "invalid_request_error", problem, problem=f"{call} refused: {problem}")
        return body, None

    async def _count_tokens(self, request: web.Request) -> web.Response:
        body, refused = await self._accepted(request, self.counted, "count_tokens call", count=True)
        if refused:
            return refused
        seen, _ = apply_context_edits(body)
        answer: dict[str, Any] = {"input_tokens": count_tokens(seen)}
        if "context_management" in body:
            answer["context_management"] = {"original_input_tokens": count_tokens(body)}
        return web.json_response(answer, headers={"request-id": _new_id("req_")})

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body, refused = await self._accepted(request, self.requests, "call")
        if refused:
            return refused
        call = f"call {len(self.requests)}"
        seen, edits = apply_context_edits(body)
        tokens = count_tokens(seen)
        if too_long := self._over_window(tokens, body["max_tokens"]):
            self.too_long.append(tokens)
            return self._error(400, "invalid_request_error", too_long)
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)  # the model's time to answer
        if not self._steps:
            message = f"unexpected {call}: the script has no step left"
            return self._error(400, "invalid_request_error", message, problem=message)
        step = self._steps.popleft()
        if not isinstance(step, (Turn, HttpError, StreamError)):
            try:
                step = step(body)
            except Exception as exc:
                return self._error(400, "invalid_request_error", repr(exc), problem=f"{call}: step raised {exc!r}")
            if not isinstance(step, (Turn, HttpError, StreamError)):
                return self._error(400, "invalid_request_error", "bad step",
                                   problem=f"{call}: step returned {step!r}, not a turn or an error")
        if isinstance(step, HttpError):
            return self._error(step.status, step.error_type, step.message, step.headers)
        if not body.get("stream") and isinstance(step, StreamError):
            return self._error(STATUS_OF.get(step.error_type, 500), step.error_type, step.message)
        final = self._message(step if isinstance(step, Turn) else turn(), body, seen, edits)
        if not body.get("stream"):
            return web.json_response(final, headers={"request-id": _new_id("req_")})
        return await self._stream(request, step, final)

    def _over_window(self, tokens: int, max_tokens: int) -> str | None:
        """The real API's refusal of a prompt that does not fit the context window, or None when it fits."""
        window = self.context_window
        if window is None or tokens + max_tokens <= window:
            return None
        if tokens > window:
            return f"prompt is too long: {tokens} tokens > {window} maximum"
        return f"input length and `max_tokens` exceed context limit: {tokens} + {max_tokens} > {window}, " \
               "decrease input length or `max_tokens` and try again"

    def _refused_credential(self, request: web.Request) -> str | None:
        """Why the credential the request carries is refused, or None when it is accepted."""
        key, authorization = request.headers.get("x-api-key"), request.headers.get("authorization")
        if key is None and authorization is None:
            return None if self.keyless else "x-api-key header is required."
        token = key if key is not None else authorization.removeprefix("Bearer").strip()
        return None if token.strip() else "invalid x-api-key"

    def _message(self, step: Turn, body: dict[str, Any], seen: dict[str, Any],
                 edits: list[dict[str, Any]]) -> dict[str, Any]:
        """The whole response message; `seen` is the body after its context edits, which are reported."""
        computed = {**self.cache.usage(seen),
                    "output_tokens": max(1, content_tokens(step.content))}
        usage = {key: computed[key] if value is None else value for key, value in step.usage.items()}
        message = {"id": _new_id("msg_01"), "type": "message", "role": "assistant", "model": body["model"],
                   "content": list(step.content), "stop_reason": step.stop_reason, "stop_sequence": None,
                   "usage": {**usage, "service_tier": "standard"}}
        if "context_management" in body:
            message["context_management"] = {"applied_edits": edits}
        return message

    async def _stream(self, request: web.Request, step: Turn | StreamError,
                      final: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8",
                                               "cache-control": "no-cache", "request-id": _new_id("req_")})
        await response.prepare(request)
        start = {**{k: v for k, v in final.items() if k != "context_management"}, "content": [],
                 "stop_reason": None, "usage": {**final["usage"], "output_tokens": 1}}
        events = [{"type": "message_start", "message": start}, {"type": "ping"}]
        if isinstance(step, StreamError):
            events += list(_block_events(0, text(step.partial_text))) if step.partial_text else []
            events.append({"type": "error", "error": {"type": step.error_type, "message": step.message}})
        else:
            for index, block in enumerate(step.content):
                events += [*_block_events(index, block), {"type": "content_block_stop", "index": index}]
            delta = {"type": "message_delta", "delta": {"stop_reason": step.stop_reason, "stop_sequence": None},
                     "usage": {k: v for k, v in final["usage"].items() if k != "service_tier"}}
            if "context_management" in final:  # where the docs put it, and the SDK's beta stream reads it
                delta["context_management"] = final["context_management"]
            events += [delta, {"type": "message_stop"}]
        try:
            for event in events:
                await response.write(_sse(event))
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client stopped reading, as the orchestrator does when a run is cancelled
        return response


@asynccontextmanager
async def messages_api(steps: Sequence[Step], *, keyless: bool = False, context_window: int | None = 200_000,
                       latency_s: float = 0.0) -> AsyncIterator[MessagesAPI]:
    """Serve `steps` on a random loopback port; on a clean exit, raise every problem the server saw. With
    `keyless`, requests without a credential are accepted, as a local compatible server accepts them; a prompt over
    `context_window` tokens (None: no limit) is refused as the real API refuses it; each call to be answered waits
    `latency_s` seconds first."""
    api = MessagesAPI(steps, keyless, context_window, latency_s)
    app = web.Application(client_max_size=32 * 2**20)  # the real API takes requests up to 32 MB
    app.router.add_post("/v1/messages", api._messages)
    app.router.add_post("/v1/messages/count_tokens", api._count_tokens)
    app.router.add_route("*", "/{tail:.*}", api._unknown)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    api.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield api
    except Exception as exc:
        if api.problems:
            exc.add_note("fake Messages API saw: " + "; ".join(api.problems))
        raise
    finally:
        await runner.cleanup()
    api.assert_done()
