"""Run events: what a run emits, numbered and timestamped, and their Server-Sent Events framing."""

from __future__ import annotations

import json
import time
from typing import Any

from common.redact import Redactor

Event = dict[str, Any]


class EventLog:
    """Builds a run's events: each carries `type`, `run_id`, a growing `seq` and `ts`."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.seq = 0

    def __call__(self, type: str, **fields: Any) -> Event:
        self.seq += 1
        return {"type": type, "run_id": self.run_id, "seq": self.seq, "ts": round(time.time(), 3), **fields}

    def rewind(self, seq: int) -> None:
        """Number the next event `seq + 1`: those made after `seq` were never sent, so their numbers are free."""
        self.seq = seq


class Tagged:
    """A run's `EventLog` whose events all carry `fields` too (the number of the attempt they belong to)."""

    def __init__(self, log: EventLog, **fields: Any):
        self.log = log
        self.run_id = log.run_id
        self.fields = fields

    def __call__(self, type: str, **fields: Any) -> Event:
        return self.log(type, **self.fields, **fields)


def sse(event: Event, redact: Redactor) -> bytes:
    """One SSE message, its data redacted; `data:` lines never hold a raw newline, since JSON escapes them."""
    data = redact(json.dumps(event, ensure_ascii=False, separators=(",", ":")))
    return f"id: {event['seq']}\ndata: {data}\n\n".encode()


PING = b": ping\n\n"
