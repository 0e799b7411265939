"""Where runs, their events, the model's turns and the webhook deliveries handled are kept: a `RunStore` protocol
and its SQLite implementation.

SQLite in WAL mode, one file under the data directory. Calls run on the event loop: events arrive in batches (see
runs.py), a commit in WAL mode with `synchronous=NORMAL` needs no fsync, and a lock held by another process is waited
for at most half a second. What is kept passes the redaction step first, and only the service's user can read it: the
data directory is 0700 when the store creates it, the database and its -wal and -shm files 0600.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Protocol

from common.redact import Redactor

from .events import Event

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, repo TEXT NOT NULL, prompt TEXT NOT NULL, mode TEXT NOT NULL, status TEXT NOT NULL,
    created REAL NOT NULL, finished REAL, pull_request_url TEXT, usage TEXT, sandbox_id TEXT, error TEXT
);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created DESC);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS turns (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, agent TEXT NOT NULL, agent_seq INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kept (
    run_id TEXT PRIMARY KEY, data TEXT NOT NULL, published_url TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT PRIMARY KEY, data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY, comment TEXT NOT NULL UNIQUE, received REAL NOT NULL, run_id TEXT, outcome TEXT,
    repo TEXT, number INTEGER, link TEXT, answer INTEGER, answered INTEGER NOT NULL DEFAULT 0
);
"""
DELIVERIES_KEPT_S = 2 * 86400  # longer than any delivery stays fresh (TB_WEBHOOK_MAX_AGE_S is at most a day)


class StoreError(Exception):
    """The store cannot be used; the message says what to do."""


class RunStore(Protocol):
    def create(self, run_id: str, repo: str, prompt: str, mode: str) -> None: ...
    def append(self, *events: Event) -> None: ...
    def events(self, run_id: str, after: int = 0) -> list[Event]: ...
    def get(self, run_id: str) -> dict[str, Any] | None: ...
    def list(self, limit: int, before: float | None) -> list[dict[str, Any]]: ...
    def unfinished(self) -> list[dict[str, Any]]: ...
    def last_seq(self, run_id: str) -> int: ...
    def add_turn(self, run_id: str, seq: int, agent: str, agent_seq: int, turn: dict[str, Any]) -> None: ...
    def turns(self, run_id: str) -> list[dict[str, Any]]: ...
    def keep_work(self, run_id: str, work: dict[str, Any]) -> None: ...
    def kept_work(self, run_id: str) -> dict[str, Any] | None: ...
    def published(self, run_id: str, url: str) -> None: ...
    def checkpoint(self, run_id: str, work: dict[str, Any] | None) -> None: ...
    def checkpoint_of(self, run_id: str) -> dict[str, Any] | None: ...
    def claim_delivery(self, delivery: str, comment: str) -> dict[str, Any] | None: ...
    def settle_delivery(self, delivery: str, run_id: str | None, outcome: str) -> None: ...
    def forget_delivery(self, delivery: str) -> None: ...
    def answering(self, delivery: str, repo: str, number: int, link: str, answer: int | None) -> None: ...
    def answered(self, delivery: str) -> None: ...
    def unanswered(self) -> list[dict[str, Any]]: ...


class SQLiteRunStore:
    def __init__(self, path: Path, redact: Redactor | None = None):
        self.path = path
        self.redact = redact or Redactor()
        try:
            _private(path)
            # A short lock wait: the store runs on the event loop, and a lock held elsewhere must not stall it long.
            self.db = sqlite3.connect(path, isolation_level=None, timeout=0.5)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            if "error" not in {r["name"] for r in self.db.execute("PRAGMA table_info(runs)")}:
                self.db.execute("ALTER TABLE runs ADD COLUMN error TEXT")  # a store from before runs kept their error
            if (check := self.db.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            # A read-only file opens and reads fine: find out now, not at the first run.
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("ROLLBACK")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot use the run store {path}: {exc}. Check that it is a writable SQLite file "
                             "owned by this user, or move it aside (runs history starts afresh), or set TB_DATA_DIR "
                             "elsewhere") from None

    def create(self, run_id: str, repo: str, prompt: str, mode: str) -> None:
        self.db.execute("INSERT INTO runs (id, repo, prompt, mode, status, created) VALUES (?, ?, ?, ?, 'running', ?)",
                        (run_id, self.redact(repo), self.redact(prompt), mode, time.time()))

    def append(self, *events: Event) -> None:
        """Keep events, in one transaction; those that change a run's record update it in the same one."""
        with self.db:
            self.db.execute("BEGIN")
            for event in events:
                self._append(event)

    def _append(self, event: Event) -> None:
        event = self.redact.data(event)
        run_id = event["run_id"]
        self.db.execute("INSERT INTO events (run_id, seq, data) VALUES (?, ?, ?)",
                        (run_id, event["seq"], json.dumps(event, ensure_ascii=False)))
        kind = event["type"]
        if kind == "sandbox":
            self.db.execute("UPDATE runs SET sandbox_id = ? WHERE id = ?", (event.get("sandbox_id"), run_id))
        elif kind == "pull_request":
            self.db.execute("UPDATE runs SET pull_request_url = ? WHERE id = ?", (event.get("url"), run_id))
        elif kind == "error":
            error = {k: v for k, v in event.items() if k not in ("type", "run_id", "seq", "ts")}
            self.db.execute("UPDATE runs SET error = ? WHERE id = ?", (json.dumps(error, ensure_ascii=False), run_id))
        elif kind == "usage":
            usage = {k: v for k, v in event.items() if k not in ("type", "run_id", "seq", "ts")}
            self.db.execute("UPDATE runs SET usage = ? WHERE id = ?", (json.dumps(usage), run_id))
        elif kind == "completion":
            self.db.execute("UPDATE runs SET status = ?, finished = ? WHERE id = ?",
                            (event.get("status", "error"), event["ts"], run_id))

    def events(self, run_id: str, after: int = 0) -> list[Event]:
        rows = self.db.execute("SELECT data FROM events WHERE run_id = ? AND seq > ? ORDER BY seq", (run_id, after))
        return [json.loads(r["data"]) for r in rows]

    def get(self, run_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if not row:
            return None
        record = _record(row)
        if (kept := self.kept_work(run_id)) is not None:
            changeset = kept["changeset"]
            record["kept"] = {"reason": kept["reason"], "files": [f["path"] for f in changeset["files"]],
                              "deleted": changeset["deleted"], "published_url": kept["published_url"]}
        return record

    def list(self, limit: int, before: float | None) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM runs WHERE created < ? ORDER BY created DESC LIMIT ?",
                               (before if before is not None else float("inf"), limit))
        return [_record(r) for r in rows]

    def unfinished(self) -> list[dict[str, Any]]:
        return [_record(r) for r in self.db.execute("SELECT * FROM runs WHERE status = 'running'")]

    def last_seq(self, run_id: str) -> int:
        row = self.db.execute("SELECT MAX(seq) AS seq FROM events WHERE run_id = ?", (run_id,)).fetchone()
        return row["seq"] or 0

    def add_turn(self, run_id: str, seq: int, agent: str, agent_seq: int, turn: dict[str, Any]) -> None:
        """Keep one of the model's turns in a run: the `seq`-th, of the `agent_seq`-th agent, named `agent`."""
        self.db.execute("INSERT INTO turns (run_id, seq, agent, agent_seq, data) VALUES (?, ?, ?, ?, ?)",
                        (run_id, seq, agent, agent_seq, json.dumps(self.redact.data(turn), ensure_ascii=False)))

    def turns(self, run_id: str) -> list[dict[str, Any]]:
        """The model's turns in a run, in order, each with its `agent` and `agent_seq`."""
        rows = self.db.execute("SELECT agent, agent_seq, data FROM turns WHERE run_id = ? ORDER BY seq", (run_id,))
        return [{"agent": r["agent"], "agent_seq": r["agent_seq"], **json.loads(r["data"])} for r in rows]

    def keep_work(self, run_id: str, work: dict[str, Any]) -> None:
        """Keep the work of a run that stopped before it finished: its changeset and what publishing it needs."""
        self.db.execute("INSERT OR REPLACE INTO kept (run_id, data) VALUES (?, ?)", (run_id, self._work(work)))

    def kept_work(self, run_id: str) -> dict[str, Any] | None:
        """The work kept for a run, with `published_url` once published; None when none was kept."""
        row = self.db.execute("SELECT data, published_url FROM kept WHERE run_id = ?", (run_id,)).fetchone()
        return {**json.loads(row["data"]), "published_url": row["published_url"]} if row else None

    def published(self, run_id: str, url: str) -> None:
        """Record that the work kept for a run is now the pull request at `url`."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("UPDATE kept SET published_url = ? WHERE run_id = ?", (url, run_id))
            self.db.execute("UPDATE runs SET pull_request_url = ? WHERE id = ?", (url, run_id))

    def checkpoint(self, run_id: str, work: dict[str, Any] | None) -> None:
        """Keep the latest changes of a run in flight, for when the service stops before the run ends; None drops
        them."""
        if work is None:
            self.db.execute("DELETE FROM checkpoints WHERE run_id = ?", (run_id,))
            return
        self.db.execute("INSERT OR REPLACE INTO checkpoints (run_id, data) VALUES (?, ?)", (run_id, self._work(work)))

    def checkpoint_of(self, run_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT data FROM checkpoints WHERE run_id = ?", (run_id,)).fetchone()
        return json.loads(row["data"]) if row else None

    def claim_delivery(self, delivery: str, comment: str) -> dict[str, Any] | None:
        """Claim a webhook delivery for the comment it carries: None when it is the first of either, else what came
        of the first (`id`, `run_id`, `outcome`; both None while it is still being handled)."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM deliveries WHERE received < ?", (now - DELIVERIES_KEPT_S,))
            claimed = self.db.execute("INSERT OR IGNORE INTO deliveries (id, comment, received) VALUES (?, ?, ?)",
                                      (delivery, comment, now)).rowcount
            if claimed:
                return None
            row = self.db.execute("SELECT id, run_id, outcome FROM deliveries WHERE id = ? OR comment = ? "
                                  "ORDER BY received LIMIT 1", (delivery, comment)).fetchone()
            return dict(row)

    def settle_delivery(self, delivery: str, run_id: str | None, outcome: str) -> None:
        """Record what came of a claimed delivery: the run it started, or why none."""
        self.db.execute("UPDATE deliveries SET run_id = ?, outcome = ? WHERE id = ?",
                        (run_id, self.redact(outcome), delivery))

    def forget_delivery(self, delivery: str) -> None:
        """Drop the claim of a delivery that could not be handled now, so that a redelivery is."""
        self.db.execute("DELETE FROM deliveries WHERE id = ?", (delivery,))

    def answering(self, delivery: str, repo: str, number: int, link: str, answer: int | None) -> None:
        """Where the answer to a delivery's run is (`answer`, the comment's id; None: none could be posted)."""
        self.db.execute("UPDATE deliveries SET repo = ?, number = ?, link = ?, answer = ? WHERE id = ?",
                        (repo, number, link, answer, delivery))

    def answered(self, delivery: str) -> None:
        """The answer says how the delivery's run ended."""
        self.db.execute("UPDATE deliveries SET answered = 1 WHERE id = ?", (delivery,))

    def unanswered(self) -> list[dict[str, Any]]:
        """Deliveries whose run started but whose answer does not yet say how it ended: `id`, `run_id`, `repo`,
        `number`, `link`, `answer`."""
        rows = self.db.execute("SELECT id, run_id, repo, number, link, answer FROM deliveries WHERE run_id IS NOT "
                               "NULL AND repo IS NOT NULL AND answered = 0 ORDER BY received").fetchall()
        return [dict(row) for row in rows]

    def _work(self, work: dict[str, Any]) -> str:
        """A run's work as stored: its changeset as it is (the run refuses one that holds a secret), the rest
        redacted."""
        rest = self.redact.data({k: v for k, v in work.items() if k != "changeset"})
        return json.dumps({**rest, "changeset": work["changeset"]}, ensure_ascii=False)

    def close(self) -> None:
        self.db.close()


def _private(path: Path) -> None:
    """Create the store's folder 0700 and its file 0600 (SQLite gives the -wal and -shm files the database's mode);
    tighten the files a store made before that left readable."""
    if not path.parent.exists():
        path.parent.parent.mkdir(parents=True, exist_ok=True)
        path.parent.mkdir(mode=0o700, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists() and file.stat().st_mode & 0o077:
            file.chmod(0o600)


def _record(row: sqlite3.Row) -> dict[str, Any]:
    record = dict(row)
    record["usage"] = json.loads(record["usage"]) if record["usage"] else None
    record["error"] = json.loads(record["error"]) if record["error"] else None
    if record["finished"]:
        record["duration_s"] = round(record["finished"] - record["created"], 3)
    return record
