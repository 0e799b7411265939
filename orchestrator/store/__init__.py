"""Where runs, their events, the model's turns and the webhook deliveries handled are kept: the `RunStore` protocol,
what its two backends share, and `open_store`, which picks one.

SQLite (sqlite.py) is one file under the data directory, for one machine. PostgreSQL (postgres.py) is shared by
replicas: besides the runs it holds each replica's lease, the rate limit's buckets and the commands one replica sends
to the run of another, and it tells every replica what changed (LISTEN/NOTIFY). What is kept passes the redaction
step first; the commands between replicas, messages in transit, are kept as sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Literal, Protocol

from common.redact import Redactor

from ..events import Event

if TYPE_CHECKING:
    from ..config import Settings

DELIVERIES_KEPT_S = 2 * 86400  # longer than any delivery stays fresh (TB_WEBHOOK_MAX_AGE_S is at most a day)
COMMANDS_KEPT_S = 3600  # a command is answered within seconds; older ones are dropped
BUCKETS_KEPT_S = 3600  # a client idle this long starts again with a full bucket
SWEEP_S = 60.0  # how often the old commands and idle buckets are deleted
CAP_WAIT_S = 10.0  # a run refused by a cap on runs in flight may be tried again this much later


class StoreError(Exception):
    """The store cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Quota:
    """The limits of admission: runs in flight in all and per client, and each client's rate of new runs."""

    max_runs: int
    max_runs_per_client: int
    burst: int
    per_minute: float


@dataclass(frozen=True)
class Refused:
    """Why a run was not admitted, and how many seconds until it might be."""

    reason: Literal["rate", "client", "total"]
    wait_s: float


class RunStore(Protocol):
    replica: str  # this process's replica id
    poll_s: float  # how long a watcher waits before reading again anyway

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def create(self, run_id: str, repo: str, prompt: str, mode: str, client: str = "") -> None: ...
    async def admit(self, run_id: str, repo: str, prompt: str, mode: str, client: str,
                    quota: Quota) -> Refused | None: ...
    async def append(self, *events: Event) -> None: ...
    async def events(self, run_id: str, after: int = 0) -> list[Event]: ...
    async def get(self, run_id: str) -> dict[str, Any] | None: ...
    async def list(self, limit: int, before: float | None) -> list[dict[str, Any]]: ...
    async def running(self) -> list[dict[str, Any]]: ...
    async def last_seq(self, run_id: str) -> int: ...
    async def add_turn(self, run_id: str, seq: int, agent: str, agent_seq: int, turn: dict[str, Any]) -> None: ...
    async def turns(self, run_id: str) -> list[dict[str, Any]]: ...
    async def keep_work(self, run_id: str, work: dict[str, Any]) -> None: ...
    async def kept_work(self, run_id: str) -> dict[str, Any] | None: ...
    async def claim_publishing(self, run_id: str, hold_s: float) -> bool: ...
    async def release_publishing(self, run_id: str) -> None: ...
    async def published(self, run_id: str, url: str) -> None: ...
    async def checkpoint(self, run_id: str, work: dict[str, Any] | None) -> None: ...
    async def checkpoint_of(self, run_id: str) -> dict[str, Any] | None: ...
    async def claim_delivery(self, delivery: str, comment: str) -> dict[str, Any] | None: ...
    async def settle_delivery(self, delivery: str, run_id: str | None, outcome: str) -> None: ...
    async def forget_delivery(self, delivery: str) -> None: ...
    async def answering(self, delivery: str, repo: str, number: int, link: str, answer: int | None) -> None: ...
    async def answered(self, delivery: str) -> None: ...
    async def unanswered(self) -> list[dict[str, Any]]: ...
    async def beat(self, lease_s: float) -> None: ...
    async def leave(self) -> None: ...
    async def adopt(self) -> list[dict[str, Any]]: ...
    async def send(self, run_id: str, kind: str, data: dict[str, Any]) -> int: ...
    async def received(self) -> list[dict[str, Any]]: ...
    async def reply(self, command_id: int, answer: dict[str, Any]) -> None: ...
    async def reply_of(self, command_id: int) -> dict[str, Any] | None: ...
    def watch(self, key: str) -> ContextManager[asyncio.Event]: ...


async def open_store(settings: Settings, redact: Redactor | None = None) -> RunStore:
    """The run store the settings name, open: PostgreSQL at TB_DATABASE_URL, else SQLite under TB_DATA_DIR."""
    store: RunStore
    if settings.database_url:
        from .postgres import PostgresRunStore  # asyncpg loads only when PostgreSQL is chosen

        store = PostgresRunStore(settings.database_url, redact)
    else:
        store = SQLiteRunStore(settings.data_dir / "runs.sqlite3", redact)
    await store.open()
    return store


def refill(tokens: float, last: float, now: float, burst: int, per_minute: float) -> tuple[float, float]:
    """A token bucket `last` updated holding `tokens`, refilled until `now`, one token taken if it holds one: the
    tokens left and the seconds to wait (0.0: the token was taken)."""
    tokens = min(burst, tokens + max(0.0, now - last) * per_minute / 60)
    if tokens >= 1:
        return tokens - 1, 0.0
    return tokens, (1 - tokens) * 60 / per_minute


def over_cap(mine: int, total: int, quota: Quota) -> Refused | None:
    """The cap a new run of a client with `mine` runs in flight, of `total` in all, would go over."""
    if mine >= quota.max_runs_per_client:
        return Refused("client", CAP_WAIT_S)
    if total >= quota.max_runs:
        return Refused("total", CAP_WAIT_S)
    return None


def machine() -> str:
    """Where process ids mean the same: this boot of this machine, in this pid namespace (and, should two
    containers ever share both, under this host name)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}/{socket.gethostname()}"
    except OSError:  # no /proc: process ids cannot be checked, and leases alone tell what is gone
        return f"{socket.gethostname()}/unknown"


def start_time(pid: int | str = "self") -> int | None:
    """When a process started, in clock ticks after boot (field 22 of /proc/<pid>/stat); None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])  # the command's name, in parentheses, may hold spaces


def alive_here(pid: int, started: int) -> bool:
    """Whether the process `pid` that started at `started` still runs (a pid reused by another process is not it)."""
    if not os.path.isdir("/proc/self"):
        return True  # cannot tell; its lease will
    return start_time(pid) == started


class Sweeps:
    """When the old rows of each kind (commands, buckets) are next due for deleting: once every SWEEP_S."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def due(self, what: str) -> bool:
        now = time.monotonic()
        if now - self.last.get(what, -SWEEP_S) < SWEEP_S:
            return False
        self.last[what] = now
        return True


class Watchers:
    """The events that wait for a key's notifications in this process; spurious wake-ups are harmless, since a
    watcher reads again when woken."""

    def __init__(self) -> None:
        self.events: dict[str, set[asyncio.Event]] = {}

    @contextmanager
    def watch(self, key: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self.events.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            waiting = self.events[key]
            waiting.discard(event)
            if not waiting:
                del self.events[key]

    def notify(self, *keys: str) -> None:
        for key in keys:
            for event in self.events.get(key, ()):
                event.set()

    def notify_all(self) -> None:
        for waiting in self.events.values():
            for event in waiting:
                event.set()

    def __bool__(self) -> bool:
        return bool(self.events)


def run_changes(event: Event) -> dict[str, Any]:
    """The columns of a run's record that an event changes (most change none)."""
    kind = event["type"]
    rest = {k: v for k, v in event.items() if k not in ("type", "run_id", "seq", "ts")}
    if kind == "sandbox":
        return {"sandbox_id": event.get("sandbox_id")}
    if kind == "pull_request":
        return {"pull_request_url": event.get("url")}
    if kind == "error":
        return {"error": json.dumps(rest, ensure_ascii=False)}
    if kind == "usage":
        return {"usage": json.dumps(rest)}
    if kind == "completion":
        return {"status": event.get("status", "error"), "finished": event["ts"]}
    return {}


def run_record(row: Mapping[str, Any], kept: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run's record as callers see it: usage and error decoded, its duration once finished, its owner as
    `replica`, what was kept of its work when `kept` is given; the client's key stays in the store."""
    record = dict(row)
    record["replica"] = record.pop("owner", None)
    record.pop("client", None)
    record["usage"] = json.loads(record["usage"]) if record["usage"] else None
    record["error"] = json.loads(record["error"]) if record["error"] else None
    if record["finished"]:
        record["duration_s"] = round(record["finished"] - record["created"], 3)
    if kept is not None:
        changeset = kept["changeset"]
        record["kept"] = {"reason": kept["reason"], "files": [f["path"] for f in changeset["files"]],
                          "deleted": changeset["deleted"], "published_url": kept["published_url"]}
    return record


def work_text(redact: Redactor, work: dict[str, Any]) -> str:
    """A run's work as stored: its changeset as it is (the run refuses one that holds a secret), the rest redacted."""
    rest = redact.data({k: v for k, v in work.items() if k != "changeset"})
    return json.dumps({**rest, "changeset": work["changeset"]}, ensure_ascii=False)


def gone(replica: Mapping[str, Any] | None, now: float, here: str) -> bool:
    """Whether a replica (its row in `replicas`; None: it has none) is gone: its lease ran out, or it ran on this
    machine and its process is no more."""
    if replica is None or replica["expires"] < now:
        return True
    return replica["machine"] == here and not alive_here(replica["pid"], replica["started"])


from .sqlite import SQLiteRunStore  # noqa: E402 - sqlite.py uses what is above

__all__ = ["Quota", "Refused", "RunStore", "SQLiteRunStore", "StoreError", "alive_here", "machine", "open_store",
           "refill", "start_time"]
