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
"""

from __future__ import annotations

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

CHUNK = 12  # characters per delta, so a client sees every block arrive in pieces as it does from the real API
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               504: "timeout_error", 529: "overloaded_error"}
STATUS_OF = {kind: status for status, kind in ERROR_TYPES.items()}


def _new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(24))


@dataclass(frozen=True)
class Turn:
    """One model response; token counts left as None are estimated from the request and the content."""

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
         output_tokens: int | None = None, cache_read_input_tokens: int = 0,
         cache_creation_input_tokens: int = 0) -> Turn:
    """A model turn; it stops for `tool_use` when it calls a tool and at `end_turn` otherwise."""
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

    def __init__(self, steps: Iterable[Step], keyless: bool = False) -> None:
        self.url = ""
        self.keyless = keyless
        self.requests: list[Any] = []
        self.problems: list[str] = []
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

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        self.requests.append(body)
        call = f"call {len(self.requests)}"
        if refused := self._refused_credential(request):
            return self._error(401, "authentication_error", refused, problem=f"{call}: {refused}")
        if not request.headers.get("anthropic-version"):
            return self._error(400, "invalid_request_error", "anthropic-version: header is required",
                               problem=f"{call}: no anthropic-version header")
        if problem := validate(body):
            return self._error(400, "invalid_request_error", problem, problem=f"{call} refused: {problem}")
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
        if not body.get("stream"):
            if isinstance(step, StreamError):
                return self._error(STATUS_OF.get(step.error_type, 500), step.error_type, step.message)
            return web.json_response(self._message(step, body, raw), headers={"request-id": _new_id("req_")})
        return await self._stream(request, step, body, raw)

    def _refused_credential(self, request: web.Request) -> str | None:
        """Why the credential the request carries is refused, or None when it is accepted."""
        key, authorization = request.headers.get("x-api-key"), request.headers.get("authorization")
        if key is None and authorization is None:
            return None if self.keyless else "x-api-key header is required."
        token = key if key is not None else authorization.removeprefix("Bearer").strip()
        return None if token.strip() else "invalid x-api-key"

    def _message(self, step: Turn, body: dict[str, Any], raw: bytes) -> dict[str, Any]:
        estimate = {"input_tokens": max(1, len(raw) // 4),
                    "output_tokens": max(1, len(json.dumps(step.content)) // 4)}
        usage = {key: estimate[key] if value is None else value for key, value in step.usage.items()}
        return {"id": _new_id("msg_01"), "type": "message", "role": "assistant", "model": body["model"],
                "content": list(step.content), "stop_reason": step.stop_reason, "stop_sequence": None,
                "usage": {**usage, "service_tier": "standard"}}

    async def _stream(self, request: web.Request, step: Turn | StreamError, body: dict[str, Any],
                      raw: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8",
                                               "cache-control": "no-cache", "request-id": _new_id("req_")})
        await response.prepare(request)
        final = self._message(step if isinstance(step, Turn) else turn(), body, raw)
        start = {**final, "content": [], "stop_reason": None, "usage": {**final["usage"], "output_tokens": 1}}
        events = [{"type": "message_start", "message": start}, {"type": "ping"}]
        if isinstance(step, StreamError):
            events += list(_block_events(0, text(step.partial_text))) if step.partial_text else []
            events.append({"type": "error", "error": {"type": step.error_type, "message": step.message}})
        else:
            for index, block in enumerate(step.content):
                events += [*_block_events(index, block), {"type": "content_block_stop", "index": index}]
            events += [{"type": "message_delta", "delta": {"stop_reason": step.stop_reason, "stop_sequence": None},
                        "usage": {k: v for k, v in final["usage"].items() if k != "service_tier"}},
                       {"type": "message_stop"}]
        try:
            for event in events:
                await response.write(_sse(event))
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client stopped reading, as the orchestrator does when a run is cancelled
        return response


@asynccontextmanager
async def messages_api(steps: Sequence[Step], *, keyless: bool = False) -> AsyncIterator[MessagesAPI]:
    """Serve `steps` on a random loopback port; on a clean exit, raise every problem the server saw. With
    `keyless`, requests without a credential are accepted, as a local compatible server accepts them."""
    api = MessagesAPI(steps, keyless)
    app = web.Application()
    app.router.add_post("/v1/messages", api._messages)
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
