"""What a running tool prints, live: the text of its progress messages becomes `output` events, merged into the run's
stream while the call runs.

The agent loop awaits its tool calls, so their output cannot come through it. Instead the run's events are produced
by a task of their own (`LiveOutput.merged`) and meet the output in one queue; each event gets its `seq` as it leaves
that queue, so `seq` is the order of the stream whichever task made the event (agents of several attempts work at
once). A call's pieces are joined, so that it sends at most one event every
`OUTPUT_INTERVAL_S`, and each event is cut to `OUTPUT_EVENT_CHARS`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from common.redact import Redactor, StreamRedactor

from .events import Event, EventLog

OUTPUT_EVENT_CHARS = 8000
OUTPUT_INTERVAL_S = 0.25
CUT_MARK_CHARS = 64  # room for cut()'s "[N characters dropped]" line


def cut(text: str, limit: int) -> str:
    """`text` cut to its head and tail, saying how much was dropped."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n… [{len(text) - 2 * half} characters dropped] …\n{text[-half:]}"


def fit(text: str, limit: int) -> str:
    """`text` at most `limit` characters long, cut to its head and tail when longer."""
    return text if len(text) <= limit else cut(text, limit - CUT_MARK_CHARS)


class LiveOutput:
    """A run's `output` events, made from the progress text of its tool calls."""

    def __init__(self, events: EventLog, redact: Redactor):
        self.events = events
        self.redact = redact
        self._queue: asyncio.Queue[Event | None] | None = None  # while `merged` runs

    def stream(self, tool: str, **where: Any) -> OutputStream:
        """The output of one call of `tool`; `where` (its `agent`, call `id`, `attempt`) goes into each event."""
        return OutputStream(self, {"tool": tool, **where})

    def send(self, fields: dict[str, Any]) -> None:
        """Put an `output` event into the run's stream; outside `merged` there is no stream, and it is dropped."""
        if self._queue is not None:
            self._queue.put_nowait(self.events("output", **fields))

    async def merged(self, run: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """The events of `run`, with the output of its tool calls among them as it comes."""
        queue = self._queue = asyncio.Queue()
        sent = self.events.seq

        async def produce() -> None:
            try:
                async for event in run:
                    queue.put_nowait(event)
            finally:
                queue.put_nowait(None)

        # One task for the whole run: its spans and other context stay in one task, entered and left alike.
        producer = asyncio.create_task(produce())
        try:
            while (event := await queue.get()) is not None:
                sent += 1
                event["seq"] = sent
                yield event
            await producer  # the run's own exception, if it raised one
        finally:
            self._queue = None
            if not producer.done():
                producer.cancel()
                # The run's cleanup (its sandbox) finishes before this generator does.
                await asyncio.gather(producer, return_exceptions=True)
            self.events.rewind(sent)


class OutputStream:
    """One call's output: pieces redacted as one text, joined, and sent at most every `OUTPUT_INTERVAL_S`. Use it as
    a context manager: on leaving, what is left is sent, before the call's result."""

    def __init__(self, live: LiveOutput, fields: dict[str, Any]):
        self.live = live
        self.fields = fields
        self.text = StreamRedactor(live.redact)
        self.pending = ""
        self.last_sent = -math.inf
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    def __enter__(self) -> OutputStream:
        return self

    def __exit__(self, *_: object) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.pending += self.text.flush()
        self._send()
        self.closed = True

    def __call__(self, piece: str) -> None:
        """Take the next piece of output."""
        if self.closed:  # a message that came after the result: the result holds the output
            return
        self.pending += self.text.feed(piece)
        if self.timer is None and self.pending:
            wait = self.last_sent + OUTPUT_INTERVAL_S - time.monotonic()
            if wait <= 0:
                self._send()
            else:
                self.timer = asyncio.get_running_loop().call_later(wait, self._send)

    def _send(self) -> None:
        self.timer = None
        if self.pending:
            self.live.send({**self.fields, "text": fit(self.pending, OUTPUT_EVENT_CHARS)})
            self.pending = ""
            self.last_sent = time.monotonic()
