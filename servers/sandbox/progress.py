"""A running tool's output, sent to its client as it comes: MCP progress notifications whose message is the next
piece of output, redacted, a few a second at most (a chatty build must not flood the client)."""

from __future__ import annotations

import asyncio
import contextlib

from mcp.server.mcpserver import Context

from common.redact import Redactor, StreamRedactor

INTERVAL_S = 0.25
MAX_CHARS = 4000  # per notification; more waits for the next one
MAX_BUFFER = 64_000  # what a client that cannot keep up misses, beyond this, is said, not sent


class Relay:
    """Collects output (`relay(text)`) and sends it as progress notifications until `close()`."""

    def __init__(self, ctx: Context | None, redactor: Redactor):
        self._ctx = ctx
        self._redact = StreamRedactor(redactor)
        self._buffer: list[str] = []
        self._buffered = 0
        self._dropped = 0
        self._sent = 0
        self._ready = asyncio.Event()
        self._closed = asyncio.Event()
        self._task = asyncio.create_task(self._pump()) if ctx is not None else None

    def __call__(self, text: str) -> None:
        if self._task is None or not text:
            return
        if self._buffered > MAX_BUFFER:
            self._dropped += len(text)
            return
        self._buffer.append(text)
        self._buffered += len(text)
        self._ready.set()

    async def _pump(self) -> None:
        while True:
            await self._ready.wait()
            closing = self._closed.is_set()
            await self._send(final=closing)
            if closing:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), INTERVAL_S)  # at most a few a second; at once on close

    async def _send(self, final: bool) -> None:
        self._ready.clear()
        text = "".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        if self._dropped:
            text += f"\n… [{self._dropped} characters of output not shown live] …\n"
            self._dropped = 0
        shown = self._redact.feed(text) + (self._redact.flush() if final else "")
        while shown:
            piece, shown = shown[:MAX_CHARS], shown[MAX_CHARS:]
            self._sent += len(piece)
            with contextlib.suppress(Exception):  # a client gone away loses live output, never the result
                await self._ctx.report_progress(self._sent, None, piece)

    async def close(self) -> None:
        """Send what is left and stop."""
        if self._task is None:
            return
        self._closed.set()
        self._ready.set()
        try:
            await self._task
        except asyncio.CancelledError:
            self._task.cancel()
            raise
