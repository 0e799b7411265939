"""The run store in SQLite: one file under the data directory, for the replicas of one machine.

SQLite in WAL mode. Calls run on the event loop: events arrive in batches (see runs.py), a commit in WAL mode with
`synchronous=NORMAL` needs no fsync, and a lock held by another process is waited for at most half a second. What is
kept passes the redaction step first, and only the service's user can read it: the data directory is 0700 when the
store creates it, the database and its -wal and -shm files 0600. SQLite tells no one of a change: while anything
watches, the store looks every `poll_s` whether another connection wrote, and then wakes every watcher.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.redact import Redactor

from ..events import Event
from . import (BUCKETS_KEPT_S, COMMANDS_KEPT_S, DELIVERIES_KEPT_S, Quota, Refused, StoreError, Sweeps, Watchers,
               gone, machine, over_cap, refill, run_changes, run_record, start_time, work_text)


def _keep_errors(db: sqlite3.Connection) -> None:
    if "error" not in {r["name"] for r in db.execute("PRAGMA table_info(runs)")}:
        db.execute("ALTER TABLE runs ADD COLUMN error TEXT")  # a store from before runs kept their error


# Each step runs once, in a transaction with its version (PRAGMA user_version); a store made before versions were
# kept (user_version 0) holds the tables of step 1, with or without step 2's column.
MIGRATIONS: list[tuple[str, ...] | Callable[[sqlite3.Connection], None]] = [
    (
        """CREATE TABLE IF NOT EXISTS runs (
            id TEXT PRIMARY KEY, repo TEXT NOT NULL, prompt TEXT NOT NULL, mode TEXT NOT NULL, status TEXT NOT NULL,
            created REAL NOT NULL, finished REAL, pull_request_url TEXT, usage TEXT, sandbox_id TEXT
        )""",
        "CREATE INDEX IF NOT EXISTS runs_created ON runs (created DESC)",
        """CREATE TABLE IF NOT EXISTS events (
            run_id TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (run_id, seq)
        ) WITHOUT ROWID""",
        """CREATE TABLE IF NOT EXISTS turns (
            run_id TEXT NOT NULL, seq INTEGER NOT NULL, agent TEXT NOT NULL, agent_seq INTEGER NOT NULL,
            data TEXT NOT NULL, PRIMARY KEY (run_id, seq)
        ) WITHOUT ROWID""",
        "CREATE TABLE IF NOT EXISTS kept (run_id TEXT PRIMARY KEY, data TEXT NOT NULL, published_url TEXT)",
        "CREATE TABLE IF NOT EXISTS checkpoints (run_id TEXT PRIMARY KEY, data TEXT NOT NULL)",
        """CREATE TABLE IF NOT EXISTS deliveries (
            id TEXT PRIMARY KEY, comment TEXT NOT NULL UNIQUE, received REAL NOT NULL, run_id TEXT, outcome TEXT,
            repo TEXT, number INTEGER, link TEXT, answer INTEGER, answered INTEGER NOT NULL DEFAULT 0
        )""",
    ),
    _keep_errors,
    (
        "ALTER TABLE runs ADD COLUMN owner TEXT",  # the replica that runs it; NULL in a store from before replicas
        "ALTER TABLE runs ADD COLUMN client TEXT",
        "CREATE INDEX runs_status ON runs (status, client)",
        """CREATE TABLE replicas (
            id TEXT PRIMARY KEY, machine TEXT NOT NULL, pid INTEGER NOT NULL, started INTEGER NOT NULL,
            expires REAL NOT NULL
        )""",
        "CREATE TABLE buckets (client TEXT PRIMARY KEY, tokens REAL NOT NULL, updated REAL NOT NULL)",
        """CREATE TABLE commands (
            id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, replica TEXT, kind TEXT NOT NULL,
            data TEXT NOT NULL, sent REAL NOT NULL, taken REAL, answer TEXT
        )""",
        "CREATE INDEX commands_waiting ON commands (replica) WHERE taken IS NULL",
        "ALTER TABLE kept ADD COLUMN publishing REAL",  # until when a replica publishes it
    ),
]


class SQLiteRunStore:
    poll_s = 0.25

    def __init__(self, path: Path, redact: Redactor | None = None):
        self.path = path
        self.redact = redact or Redactor()
        self.replica = "r_" + secrets.token_hex(8)
        self.machine = machine()
        self._watchers = Watchers()
        self._poller: asyncio.Task[None] | None = None
        self._sweeps = Sweeps()

    async def open(self) -> None:
        """Open the file (made if missing), bring its tables up to date, and check that it can be written."""
        try:
            _private(self.path)
            # A short lock wait: the store runs on the event loop, and a lock held elsewhere must not stall it long.
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=0.5)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
            if (check := self.db.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            # A read-only file opens and reads fine: find out now, not at the first run.
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("ROLLBACK")
            self.db = _Checked(self.db, self.path)
        except (sqlite3.Error, OSError, StoreError) as exc:
            if hasattr(self, "db"):
                self.db.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot use the run store {self.path}: {exc}. Check that it is a writable SQLite file "
                             "owned by this user, or move it aside (runs history starts afresh), or set TB_DATA_DIR "
                             "elsewhere") from None

    def _migrate(self) -> None:
        if (version := self.db.execute("PRAGMA user_version").fetchone()[0]) > len(MIGRATIONS):
            raise StoreError(f"the run store {self.path} was made by a newer Tiny Backspace (schema {version}, this "
                             f"one knows {len(MIGRATIONS)}): run that version, or set TB_DATA_DIR elsewhere")
        for version, step in enumerate(MIGRATIONS, 1):
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")  # another process may be migrating too: look again once locked
                if self.db.execute("PRAGMA user_version").fetchone()[0] >= version:
                    continue
                if callable(step):
                    step(self.db)
                else:
                    for statement in step:
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {version}")

    async def create(self, run_id: str, repo: str, prompt: str, mode: str, client: str = "") -> None:
        """Record a new run, running, owned by this replica."""
        self._insert(run_id, repo, prompt, mode, client)

    def _insert(self, run_id: str, repo: str, prompt: str, mode: str, client: str) -> None:
        self.db.execute("INSERT INTO runs (id, repo, prompt, mode, status, created, owner, client) "
                        "VALUES (?, ?, ?, ?, 'running', ?, ?, ?)",
                        (run_id, self.redact(repo), self.redact(prompt), mode, time.time(), self.replica, client))

    async def admit(self, run_id: str, repo: str, prompt: str, mode: str, client: str,
                    quota: Quota) -> Refused | None:
        """Create the run if the quota allows, in one transaction: the client's runs in flight, then all runs in
        flight, then the client's rate (only a run admitted spends a token). None when admitted."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            mine, total = self.db.execute("SELECT COUNT(*) FILTER (WHERE client = ?), COUNT(*) FROM runs "
                                          "WHERE status = 'running'", (client,)).fetchone()
            if refused := over_cap(mine, total, quota):
                return refused
            if self._sweeps.due("buckets"):
                self.db.execute("DELETE FROM buckets WHERE updated < ?", (now - BUCKETS_KEPT_S,))
            row = self.db.execute("SELECT tokens, updated FROM buckets WHERE client = ?", (client,)).fetchone()
            tokens, wait = refill(*(row or (quota.burst, now)), now, quota.burst, quota.per_minute)
            self.db.execute("INSERT OR REPLACE INTO buckets (client, tokens, updated) VALUES (?, ?, ?)",
                            (client, tokens, now))
            if wait:
                return Refused("rate", wait)
            self._insert(run_id, repo, prompt, mode, client)
        return None

    async def append(self, *events: Event) -> None:
        """Keep events, in one transaction; those that change a run's record update it in the same one."""
        with self.db:
            self.db.execute("BEGIN")
            for event in events:
                self._append(event)
        self._watchers.notify(*{f"run:{event['run_id']}" for event in events})

    def _append(self, event: Event) -> None:
        event = self.redact.data(event)
        run_id = event["run_id"]
        self.db.execute("INSERT INTO events (run_id, seq, data) VALUES (?, ?, ?)",
                        (run_id, event["seq"], json.dumps(event, ensure_ascii=False)))
        if changes := run_changes(event):
            assignments = ", ".join(f"{column} = ?" for column in changes)
            self.db.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*changes.values(), run_id))

    async def events(self, run_id: str, after: int = 0) -> list[Event]:
        rows = self.db.execute("SELECT data FROM events WHERE run_id = ? AND seq > ? ORDER BY seq", (run_id, after))
        return [json.loads(r["data"]) for r in rows]

    async def get(self, run_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return run_record(row, await self.kept_work(run_id)) if row else None

    async def list(self, limit: int, before: float | None) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM runs WHERE created < ? ORDER BY created DESC LIMIT ?",
                               (before if before is not None else float("inf"), limit))
        return [run_record(r) for r in rows]

    async def running(self) -> list[dict[str, Any]]:
        """The runs not yet ended, of every replica."""
        return [run_record(r) for r in self.db.execute("SELECT * FROM runs WHERE status = 'running'")]

    async def last_seq(self, run_id: str) -> int:
        row = self.db.execute("SELECT MAX(seq) AS seq FROM events WHERE run_id = ?", (run_id,)).fetchone()
        return row["seq"] or 0

    async def add_turn(self, run_id: str, seq: int, agent: str, agent_seq: int, turn: dict[str, Any]) -> None:
        """Keep one of the model's turns in a run: the `seq`-th, of the `agent_seq`-th agent, named `agent`."""
        self.db.execute("INSERT INTO turns (run_id, seq, agent, agent_seq, data) VALUES (?, ?, ?, ?, ?)",
                        (run_id, seq, agent, agent_seq, json.dumps(self.redact.data(turn), ensure_ascii=False)))

    async def turns(self, run_id: str) -> list[dict[str, Any]]:
        """The model's turns in a run, in order, each with its `agent` and `agent_seq`."""
        rows = self.db.execute("SELECT agent, agent_seq, data FROM turns WHERE run_id = ? ORDER BY seq", (run_id,))
        return [{"agent": r["agent"], "agent_seq": r["agent_seq"], **json.loads(r["data"])} for r in rows]

    async def keep_work(self, run_id: str, work: dict[str, Any]) -> None:
        """Keep the work of a run that stopped before it finished: its changeset and what publishing it needs."""
        self.db.execute("INSERT INTO kept (run_id, data) VALUES (?, ?) ON CONFLICT (run_id) "
                        "DO UPDATE SET data = excluded.data, published_url = NULL",
                        (run_id, work_text(self.redact, work)))

    async def claim_publishing(self, run_id: str, hold_s: float) -> bool:
        """Claim the kept work of a run for publishing, for `hold_s` seconds at most; False when it is published, or
        being published by another (whose claim has not run out)."""
        now = time.time()
        return self.db.execute("UPDATE kept SET publishing = ? WHERE run_id = ? AND published_url IS NULL AND "
                               "(publishing IS NULL OR publishing < ?)", (now + hold_s, run_id, now)).rowcount == 1

    async def release_publishing(self, run_id: str) -> None:
        self.db.execute("UPDATE kept SET publishing = NULL WHERE run_id = ?", (run_id,))

    async def kept_work(self, run_id: str) -> dict[str, Any] | None:
        """The work kept for a run, with `published_url` once published; None when none was kept."""
        row = self.db.execute("SELECT data, published_url FROM kept WHERE run_id = ?", (run_id,)).fetchone()
        return {**json.loads(row["data"]), "published_url": row["published_url"]} if row else None

    async def published(self, run_id: str, url: str) -> None:
        """Record that the work kept for a run is now the pull request at `url`."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("UPDATE kept SET published_url = ? WHERE run_id = ?", (url, run_id))
            self.db.execute("UPDATE runs SET pull_request_url = ? WHERE id = ?", (url, run_id))

    async def checkpoint(self, run_id: str, work: dict[str, Any] | None) -> None:
        """Keep the latest changes of a run in flight, for when the service stops before the run ends; None drops
        them."""
        if work is None:
            self.db.execute("DELETE FROM checkpoints WHERE run_id = ?", (run_id,))
            return
        self.db.execute("INSERT OR REPLACE INTO checkpoints (run_id, data) VALUES (?, ?)",
                        (run_id, work_text(self.redact, work)))

    async def checkpoint_of(self, run_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT data FROM checkpoints WHERE run_id = ?", (run_id,)).fetchone()
        return json.loads(row["data"]) if row else None

    async def claim_delivery(self, delivery: str, comment: str) -> dict[str, Any] | None:
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

    async def settle_delivery(self, delivery: str, run_id: str | None, outcome: str) -> None:
        """Record what came of a claimed delivery: the run it started, or why none."""
        self.db.execute("UPDATE deliveries SET run_id = ?, outcome = ? WHERE id = ?",
                        (run_id, self.redact(outcome), delivery))

    async def forget_delivery(self, delivery: str) -> None:
        """Drop the claim of a delivery that could not be handled now, so that a redelivery is."""
        self.db.execute("DELETE FROM deliveries WHERE id = ?", (delivery,))

    async def answering(self, delivery: str, repo: str, number: int, link: str, answer: int | None) -> None:
        """Where the answer to a delivery's run is (`answer`, the comment's id; None: none could be posted)."""
        self.db.execute("UPDATE deliveries SET repo = ?, number = ?, link = ?, answer = ? WHERE id = ?",
                        (repo, number, link, answer, delivery))

    async def answered(self, delivery: str) -> None:
        """The answer says how the delivery's run ended."""
        self.db.execute("UPDATE deliveries SET answered = 1 WHERE id = ?", (delivery,))

    async def unanswered(self) -> list[dict[str, Any]]:
        """Deliveries whose run started but whose answer does not yet say how it ended: `id`, `run_id`, `repo`,
        `number`, `link`, `answer`."""
        rows = self.db.execute("SELECT id, run_id, repo, number, link, answer FROM deliveries WHERE run_id IS NOT "
                               "NULL AND repo IS NOT NULL AND answered = 0 ORDER BY received").fetchall()
        return [dict(row) for row in rows]

    async def beat(self, lease_s: float) -> None:
        """Hold this replica's lease for `lease_s` more seconds."""
        self.db.execute("INSERT INTO replicas (id, machine, pid, started, expires) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (id) DO UPDATE SET expires = excluded.expires",
                        (self.replica, self.machine, os.getpid(), start_time() or 0, time.time() + lease_s))

    async def leave(self) -> None:
        """Give up the lease: this replica stops, its runs ended."""
        self.db.execute("DELETE FROM replicas WHERE id = ?", (self.replica,))

    async def adopt(self) -> list[dict[str, Any]]:
        """Take over the runs in flight of replicas that are gone (see `gone`) and forget those replicas: the records
        of the runs now this replica's."""
        # The runs before the replicas: a replica's row is written before its first run, so no run is seen
        # without its replica's row.
        runs = self.db.execute("SELECT id, owner FROM runs WHERE status = 'running' AND owner IS NOT ?",
                               (self.replica,)).fetchall()
        now = time.time()
        replicas = {r["id"]: r for r in self.db.execute("SELECT * FROM replicas WHERE id != ?", (self.replica,))}
        adopted = [run["id"] for run in runs if gone(replicas.get(run["owner"]), now, self.machine)
                   and self.db.execute("UPDATE runs SET owner = ? WHERE id = ? AND owner IS ? AND status = 'running'",
                                       (self.replica, run["id"], run["owner"])).rowcount]
        for replica in replicas.values():
            if gone(replica, now, self.machine):
                self.db.execute("DELETE FROM replicas WHERE id = ? AND expires = ?",
                                (replica["id"], replica["expires"]))
        return [record for run_id in adopted if (record := await self.get(run_id))]

    async def send(self, run_id: str, kind: str, data: dict[str, Any]) -> int:
        """Send a command to the replica that runs `run_id`: its id, for `reply_of`."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT owner FROM runs WHERE id = ?", (run_id,)).fetchone()
            owner = row["owner"] if row else None
            command = self.db.execute("INSERT INTO commands (run_id, replica, kind, data, sent) VALUES (?, ?, ?, ?, ?)",
                                      (run_id, owner, kind, json.dumps(data, ensure_ascii=False), time.time()))
        self._watchers.notify(f"commands:{owner}")
        return command.lastrowid or 0

    async def received(self) -> list[dict[str, Any]]:
        """The commands sent to this replica since it last looked: `id`, `run_id`, `kind`, `data`."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if self._sweeps.due("commands"):
                self.db.execute("DELETE FROM commands WHERE sent < ?", (now - COMMANDS_KEPT_S,))
            rows = self.db.execute("SELECT id, run_id, kind, data FROM commands WHERE replica = ? AND taken IS NULL "
                                   "ORDER BY id", (self.replica,)).fetchall()
            self.db.execute("UPDATE commands SET taken = ? WHERE replica = ? AND taken IS NULL", (now, self.replica))
        return [{**dict(row), "data": json.loads(row["data"])} for row in rows]

    async def reply(self, command_id: int, answer: dict[str, Any]) -> None:
        """Answer a command received."""
        self.db.execute("UPDATE commands SET answer = ? WHERE id = ?", (json.dumps(answer, ensure_ascii=False),
                                                                         command_id))
        self._watchers.notify(f"reply:{command_id}")

    async def reply_of(self, command_id: int) -> dict[str, Any] | None:
        """The answer to a command sent; None until it comes."""
        row = self.db.execute("SELECT answer FROM commands WHERE id = ?", (command_id,)).fetchone()
        return json.loads(row["answer"]) if row and row["answer"] else None

    @contextmanager
    def watch(self, key: str) -> Iterator[asyncio.Event]:
        """An event set when `key` may have changed: by this store at once, by any other within `poll_s`."""
        with self._watchers.watch(key) as event:
            if self._poller is None or self._poller.done():
                self._poller = asyncio.get_running_loop().create_task(self._poll(self._data_version()))
            yield event

    async def _poll(self, seen: int) -> None:
        """Wake every watcher when another connection wrote (after `seen`), for as long as anything watches."""
        try:
            while self._watchers:
                await asyncio.sleep(self.poll_s)
                if (version := self._data_version()) != seen:
                    seen = version
                    self._watchers.notify_all()
        except sqlite3.Error:  # closed: watchers wake on their timeout
            return

    def _data_version(self) -> int:
        return self.db.execute("PRAGMA data_version").fetchone()[0]  # changes when another connection commits

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if hasattr(self, "db"):
            self.db.close()


class _Checked:
    """The store's connection, whose failures once open (a disk full, a lock held elsewhere too long) are a
    `StoreError` saying what to do."""

    def __init__(self, db: sqlite3.Connection, path: Path):
        self._db, self._path = db, path

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, parameters)
        except sqlite3.Error as exc:
            raise self._failed(exc) from None

    def __enter__(self) -> sqlite3.Connection:
        return self._db.__enter__()

    def __exit__(self, *exc: Any) -> Any:  # the commit, or the rollback
        try:
            return self._db.__exit__(*exc)
        except sqlite3.Error as failed:
            raise self._failed(failed) from None

    def _failed(self, exc: sqlite3.Error) -> StoreError:
        return StoreError(f"the run store {self._path} failed ({exc}): check the disk's free space and that no "
                          "other program holds the file, then retry")

    def __getattr__(self, name: str) -> Any:  # close, backup
        return getattr(self._db, name)


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
