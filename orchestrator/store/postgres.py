"""The run store in PostgreSQL, shared by replicas (asyncpg: a pool, and one connection that LISTENs).

Its schema is versioned in `schema_migrations`, and migrated in one transaction under an advisory lock, so that
replicas started at once migrate it once. Leases, buckets and creation times come from the database's clock, which
every replica shares. A change others wait for is announced with pg_notify in the transaction that makes it, so
watchers hear of it at commit; a lost LISTEN connection is made again, and meanwhile watchers wake on their timeout.
Every wait is bounded: connecting (CONNECT_S), and each command (COMMAND_S). The URL's password never appears in a
message, a log line or a repr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, ContextManager
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit, urlunsplit

import asyncpg

from common.redact import Redactor

from ..events import Event
from . import (BUCKETS_KEPT_S, COMMANDS_KEPT_S, DELIVERIES_KEPT_S, Quota, Refused, StoreError, Sweeps, Watchers,
               gone, machine, over_cap, refill, run_changes, run_record, start_time, work_text)

log = logging.getLogger(__name__)

CONNECT_S = 10.0  # to connect, or to get a connection from the pool
COMMAND_S = 30.0  # any one command, a lock wait included
CLOSE_S = 5.0
POOL_SIZE = 10
PING_S = 30.0  # how often the LISTEN connection is checked, in case it died without a word
LISTEN_RETRY_MAX_S = 10.0  # the longest wait between attempts to listen again
CHANNEL = "tb"
MIGRATION_LOCK = 0x7462_6d69_6772_6174  # advisory lock ids: "tbmigrat", "tbadmit"
ADMIT_LOCK = 0x0074_6261_646d_6974
NOW = "extract(epoch from clock_timestamp())::float8"  # the database's clock, in seconds
ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)

# Each runs once, in the transaction that records its version.
MIGRATIONS = [
    """
    CREATE TABLE runs (
        id text PRIMARY KEY, repo text NOT NULL, prompt text NOT NULL, mode text NOT NULL, status text NOT NULL,
        created float8 NOT NULL, finished float8, pull_request_url text, usage text, sandbox_id text, error text,
        owner text, client text
    );
    CREATE INDEX runs_created ON runs (created DESC);
    CREATE INDEX runs_status ON runs (status, client);
    CREATE TABLE events (run_id text NOT NULL, seq integer NOT NULL, data text NOT NULL, PRIMARY KEY (run_id, seq));
    CREATE TABLE turns (
        run_id text NOT NULL, seq integer NOT NULL, agent text NOT NULL, agent_seq integer NOT NULL,
        data text NOT NULL, PRIMARY KEY (run_id, seq)
    );
    CREATE TABLE kept (run_id text PRIMARY KEY, data text NOT NULL, published_url text, publishing float8);
    CREATE TABLE checkpoints (run_id text PRIMARY KEY, data text NOT NULL);
    CREATE TABLE deliveries (
        id text PRIMARY KEY, comment text NOT NULL UNIQUE, received float8 NOT NULL, run_id text, outcome text,
        repo text, number bigint, link text, answer bigint, answered boolean NOT NULL DEFAULT false
    );
    CREATE INDEX deliveries_received ON deliveries (received);
    CREATE TABLE replicas (
        id text PRIMARY KEY, machine text NOT NULL, pid integer NOT NULL, started bigint NOT NULL,
        expires float8 NOT NULL
    );
    CREATE TABLE buckets (client text PRIMARY KEY, tokens float8 NOT NULL, updated float8 NOT NULL);
    CREATE TABLE commands (
        id bigserial PRIMARY KEY, run_id text NOT NULL, replica text, kind text NOT NULL, data text NOT NULL,
        sent float8 NOT NULL, taken float8, answer text
    );
    CREATE INDEX commands_waiting ON commands (replica) WHERE taken IS NULL;
    """,
]
TABLES = "runs, events, turns, kept, checkpoints, deliveries, replicas, buckets, commands"


class PostgresRunStore:
    poll_s = 2.0

    def __init__(self, url: str, redact: Redactor | None = None):
        self._url = url
        self.where = _without_password(url)
        self._secrets = _passwords(url)
        self.redact = redact or Redactor()
        self.replica = "r_" + secrets.token_hex(8)
        self.machine = machine()
        self.pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._listening: asyncio.Task[None] | None = None
        self._watchers = Watchers()
        self._sweeps = Sweeps()

    def __repr__(self) -> str:
        return f"PostgresRunStore({self.where!r})"

    async def open(self) -> None:
        """Connect, bring the schema up to date, check that this user may write, and start listening."""
        try:
            self.pool = await asyncpg.create_pool(self._url, min_size=1, max_size=POOL_SIZE, timeout=CONNECT_S,
                                                  command_timeout=COMMAND_S,
                                                  server_settings={"application_name": "tiny-backspace"})
            await self._migrate()
            self._listener = await self._listen()
        except (*ERRORS, ValueError) as exc:
            await self.close()
            raise self._failure(exc) from None
        except BaseException:
            await self.close()
            raise
        self._listening = asyncio.create_task(self._keep_listening(), name="run store listener")

    async def _migrate(self) -> None:
        async with self._transaction(failures=False) as conn:  # open() says what each failure means
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                               "version integer PRIMARY KEY, applied timestamptz NOT NULL DEFAULT now())")
            done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
            if done and max(done) > len(MIGRATIONS):
                raise StoreError(f"the run store at {self.where} was made by a newer Tiny Backspace (schema "
                                 f"{max(done)}, this one knows {len(MIGRATIONS)}): run that version, or set "
                                 "TB_DATABASE_URL to another database")
            for version, sql in enumerate(MIGRATIONS, 1):
                if version not in done:
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            # A user that may only read, or a server in recovery, fails here rather than at the first run.
            await conn.execute(f"LOCK TABLE {TABLES} IN ROW EXCLUSIVE MODE")

    def _failure(self, exc: BaseException) -> StoreError:
        """What an error met while opening means, and what to do about it."""
        what = f"{type(exc).__name__}: {exc}" if not str(exc) or isinstance(exc, OSError) else str(exc)
        if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
            message = (f"PostgreSQL at {self.where} refused the login ({what}): correct the user name or password in "
                       "TB_DATABASE_URL, or let that user in (the server's pg_hba.conf)")
        elif isinstance(exc, asyncpg.InvalidCatalogNameError):
            name = _database(self._url)
            message = (f"the database {name!r} does not exist at {self.where}: create the database (createdb {name}, "
                       f"or CREATE DATABASE {name}), or correct TB_DATABASE_URL")
        elif isinstance(exc, (asyncpg.InsufficientPrivilegeError, asyncpg.ReadOnlySQLTransactionError)):
            message = (f"cannot write the run store at {self.where} ({what}): let that user create and write tables "
                       "in the database (its owner may), or set TB_DATABASE_URL to a primary server, not a read-only "
                       "one")
        elif isinstance(exc, (OSError, TimeoutError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
                              asyncpg.ConnectionDoesNotExistError)):
            message = (f"cannot reach PostgreSQL at {self.where} ({what}): start PostgreSQL there, or correct the host "
                       "and port in TB_DATABASE_URL")
        elif isinstance(exc, ValueError):
            message = f"TB_DATABASE_URL is not a PostgreSQL URL asyncpg accepts ({what}): correct it"
        else:
            message = (f"cannot use the run store at {self.where} ({what}): check TB_DATABASE_URL, and the "
                       "PostgreSQL server's log")
        return StoreError(self._scrub(message))

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    @asynccontextmanager
    async def _connection(self, failures: bool = True) -> AsyncIterator[asyncpg.Connection]:
        """A connection of the pool; what fails with it is a `StoreError` saying so (unless `failures` is False:
        then as the driver raised it)."""
        if self.pool is None:
            raise StoreError("the run store is not open")
        try:
            async with self.pool.acquire(timeout=CONNECT_S) as conn:
                yield conn
        except ERRORS as exc:
            if not failures:
                raise
            raise StoreError(self._scrub(f"the run store at {self.where} failed ({type(exc).__name__}: {exc}): "
                                        "check that PostgreSQL is up and reachable, then retry")) from None

    @asynccontextmanager
    async def _transaction(self, failures: bool = True) -> AsyncIterator[asyncpg.Connection]:
        async with self._connection(failures) as conn, conn.transaction():
            yield conn

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self._connection() as conn:
            return await conn.fetch(query, *args)

    async def _fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self._connection() as conn:
            return await conn.fetchrow(query, *args)

    async def _execute(self, query: str, *args: Any) -> str:
        async with self._connection() as conn:
            return await conn.execute(query, *args)

    async def create(self, run_id: str, repo: str, prompt: str, mode: str, client: str = "") -> None:
        """Record a new run, running, owned by this replica."""
        async with self._connection() as conn:
            await self._insert(conn, run_id, repo, prompt, mode, client)

    async def _insert(self, conn: asyncpg.Connection, run_id: str, repo: str, prompt: str, mode: str,
                      client: str) -> None:
        await conn.execute("INSERT INTO runs (id, repo, prompt, mode, status, created, owner, client) "
                           f"VALUES ($1, $2, $3, $4, 'running', {NOW}, $5, $6)",
                           run_id, self.redact(repo), self.redact(prompt), mode, self.replica, client)

    async def admit(self, run_id: str, repo: str, prompt: str, mode: str, client: str,
                    quota: Quota) -> Refused | None:
        """Create the run if the quota allows, in one transaction: the client's runs in flight, then all runs in
        flight, then the client's rate (only a run admitted spends a token). A refusal by a cap reads only; the
        caps are counted again under a lock that admissions on every replica take in turn, so that they hold. None
        when admitted."""
        async with self._transaction() as conn:
            for locked in (False, True):
                if locked:
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", ADMIT_LOCK)
                mine, total = await conn.fetchrow("SELECT count(*) FILTER (WHERE client = $1), count(*) FROM runs "
                                                  "WHERE status = 'running'", client)
                if refused := over_cap(mine, total, quota):
                    return refused
            if self._sweeps.due("buckets"):
                await conn.execute(f"DELETE FROM buckets WHERE updated < {NOW} - $1", float(BUCKETS_KEPT_S))
            row = await conn.fetchrow(f"SELECT tokens, updated, {NOW} AS now FROM buckets WHERE client = $1", client)
            now = row["now"] if row else await conn.fetchval(f"SELECT {NOW}")
            tokens, wait = refill(*((row["tokens"], row["updated"]) if row else (quota.burst, now)), now,
                                  quota.burst, quota.per_minute)
            await conn.execute("INSERT INTO buckets (client, tokens, updated) VALUES ($1, $2, $3) ON CONFLICT (client) "
                               "DO UPDATE SET tokens = EXCLUDED.tokens, updated = EXCLUDED.updated",
                               client, tokens, now)
            if wait:
                return Refused("rate", wait)
            await self._insert(conn, run_id, repo, prompt, mode, client)
        return None

    async def append(self, *events: Event) -> None:
        """Keep events, in one transaction; those that change a run's record update it in the same one, and the
        watchers of each run touched hear of it at commit."""
        if not events:
            return
        kept = [self.redact.data(event) for event in events]
        keys = sorted({f"run:{event['run_id']}" for event in kept})
        async with self._transaction() as conn:
            await conn.executemany("INSERT INTO events (run_id, seq, data) VALUES ($1, $2, $3)",
                                   [(e["run_id"], e["seq"], json.dumps(e, ensure_ascii=False)) for e in kept])
            for event in kept:
                if changes := run_changes(event):
                    assignments = ", ".join(f"{column} = ${n}" for n, column in enumerate(changes, 2))
                    await conn.execute(f"UPDATE runs SET {assignments} WHERE id = $1", event["run_id"],
                                       *changes.values())
            for key in keys:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, key)
        self._watchers.notify(*keys)

    async def events(self, run_id: str, after: int = 0) -> list[Event]:
        rows = await self._fetch("SELECT data FROM events WHERE run_id = $1 AND seq > $2 ORDER BY seq", run_id, after)
        return [json.loads(r["data"]) for r in rows]

    async def get(self, run_id: str) -> dict[str, Any] | None:
        row = await self._fetchrow("SELECT * FROM runs WHERE id = $1", run_id)
        return run_record(row, await self.kept_work(run_id)) if row else None

    async def list(self, limit: int, before: float | None) -> list[dict[str, Any]]:
        rows = await self._fetch("SELECT * FROM runs WHERE $1::float8 IS NULL OR created < $1 "
                                 "ORDER BY created DESC LIMIT $2", before, limit)
        return [run_record(r) for r in rows]

    async def running(self) -> list[dict[str, Any]]:
        """The runs not yet ended, of every replica."""
        return [run_record(r) for r in await self._fetch("SELECT * FROM runs WHERE status = 'running'")]

    async def last_seq(self, run_id: str) -> int:
        async with self._connection() as conn:
            return await conn.fetchval("SELECT coalesce(max(seq), 0) FROM events WHERE run_id = $1", run_id)

    async def add_turn(self, run_id: str, seq: int, agent: str, agent_seq: int, turn: dict[str, Any]) -> None:
        """Keep one of the model's turns in a run: the `seq`-th, of the `agent_seq`-th agent, named `agent`."""
        await self._execute("INSERT INTO turns (run_id, seq, agent, agent_seq, data) VALUES ($1, $2, $3, $4, $5)",
                            run_id, seq, agent, agent_seq, json.dumps(self.redact.data(turn), ensure_ascii=False))

    async def turns(self, run_id: str) -> list[dict[str, Any]]:
        """The model's turns in a run, in order, each with its `agent` and `agent_seq`."""
        rows = await self._fetch("SELECT agent, agent_seq, data FROM turns WHERE run_id = $1 ORDER BY seq", run_id)
        return [{"agent": r["agent"], "agent_seq": r["agent_seq"], **json.loads(r["data"])} for r in rows]

    async def keep_work(self, run_id: str, work: dict[str, Any]) -> None:
        """Keep the work of a run that stopped before it finished: its changeset and what publishing it needs."""
        await self._execute("INSERT INTO kept (run_id, data) VALUES ($1, $2) ON CONFLICT (run_id) "
                            "DO UPDATE SET data = EXCLUDED.data, published_url = NULL",
                            run_id, work_text(self.redact, work))

    async def claim_publishing(self, run_id: str, hold_s: float) -> bool:
        """Claim the kept work of a run for publishing, for `hold_s` seconds at most; False when it is published, or
        being published by another replica (whose claim has not run out)."""
        return await self._execute(f"UPDATE kept SET publishing = {NOW} + $2 WHERE run_id = $1 AND published_url IS "
                                   f"NULL AND (publishing IS NULL OR publishing < {NOW})", run_id, hold_s) == "UPDATE 1"

    async def release_publishing(self, run_id: str) -> None:
        await self._execute("UPDATE kept SET publishing = NULL WHERE run_id = $1", run_id)

    async def kept_work(self, run_id: str) -> dict[str, Any] | None:
        """The work kept for a run, with `published_url` once published; None when none was kept."""
        row = await self._fetchrow("SELECT data, published_url FROM kept WHERE run_id = $1", run_id)
        return {**json.loads(row["data"]), "published_url": row["published_url"]} if row else None

    async def published(self, run_id: str, url: str) -> None:
        """Record that the work kept for a run is now the pull request at `url`."""
        async with self._transaction() as conn:
            await conn.execute("UPDATE kept SET published_url = $2 WHERE run_id = $1", run_id, url)
            await conn.execute("UPDATE runs SET pull_request_url = $2 WHERE id = $1", run_id, url)

    async def checkpoint(self, run_id: str, work: dict[str, Any] | None) -> None:
        """Keep the latest changes of a run in flight, for when the service stops before the run ends; None drops
        them."""
        if work is None:
            await self._execute("DELETE FROM checkpoints WHERE run_id = $1", run_id)
            return
        await self._execute("INSERT INTO checkpoints (run_id, data) VALUES ($1, $2) ON CONFLICT (run_id) "
                            "DO UPDATE SET data = EXCLUDED.data", run_id, work_text(self.redact, work))

    async def checkpoint_of(self, run_id: str) -> dict[str, Any] | None:
        row = await self._fetchrow("SELECT data FROM checkpoints WHERE run_id = $1", run_id)
        return json.loads(row["data"]) if row else None

    async def claim_delivery(self, delivery: str, comment: str) -> dict[str, Any] | None:
        """Claim a webhook delivery for the comment it carries: None when it is the first of either, else what came
        of the first (`id`, `run_id`, `outcome`; both None while it is still being handled)."""
        async with self._transaction() as conn:
            now = await conn.fetchval(f"SELECT {NOW}")
            await conn.execute("DELETE FROM deliveries WHERE received < $1", now - DELIVERIES_KEPT_S)
            while True:  # a claim forgotten between the two statements leaves the way free
                if await conn.execute("INSERT INTO deliveries (id, comment, received) VALUES ($1, $2, $3) "
                                      "ON CONFLICT DO NOTHING", delivery, comment, now) == "INSERT 0 1":
                    return None
                row = await conn.fetchrow("SELECT id, run_id, outcome FROM deliveries WHERE id = $1 OR comment = $2 "
                                          "ORDER BY received LIMIT 1", delivery, comment)
                if row:
                    return dict(row)

    async def settle_delivery(self, delivery: str, run_id: str | None, outcome: str) -> None:
        """Record what came of a claimed delivery: the run it started, or why none."""
        await self._execute("UPDATE deliveries SET run_id = $2, outcome = $3 WHERE id = $1",
                            delivery, run_id, self.redact(outcome))

    async def forget_delivery(self, delivery: str) -> None:
        """Drop the claim of a delivery that could not be handled now, so that a redelivery is."""
        await self._execute("DELETE FROM deliveries WHERE id = $1", delivery)

    async def answering(self, delivery: str, repo: str, number: int, link: str, answer: int | None) -> None:
        """Where the answer to a delivery's run is (`answer`, the comment's id; None: none could be posted)."""
        await self._execute("UPDATE deliveries SET repo = $2, number = $3, link = $4, answer = $5 WHERE id = $1",
                            delivery, repo, number, link, answer)

    async def answered(self, delivery: str) -> None:
        """The answer says how the delivery's run ended."""
        await self._execute("UPDATE deliveries SET answered = true WHERE id = $1", delivery)

    async def unanswered(self) -> list[dict[str, Any]]:
        """Deliveries whose run started but whose answer does not yet say how it ended: `id`, `run_id`, `repo`,
        `number`, `link`, `answer`."""
        rows = await self._fetch("SELECT id, run_id, repo, number, link, answer FROM deliveries WHERE run_id IS NOT "
                                 "NULL AND repo IS NOT NULL AND NOT answered ORDER BY received")
        return [dict(row) for row in rows]

    async def beat(self, lease_s: float) -> None:
        """Hold this replica's lease for `lease_s` more seconds, by the database's clock."""
        await self._execute("INSERT INTO replicas (id, machine, pid, started, expires) "
                            f"VALUES ($1, $2, $3, $4, {NOW} + $5) ON CONFLICT (id) DO UPDATE SET "
                            "machine = EXCLUDED.machine, pid = EXCLUDED.pid, started = EXCLUDED.started, "
                            "expires = EXCLUDED.expires",
                            self.replica, self.machine, os.getpid(), start_time() or 0, lease_s)

    async def leave(self) -> None:
        """Give up the lease: this replica stops, its runs ended."""
        await self._execute("DELETE FROM replicas WHERE id = $1", self.replica)

    async def adopt(self) -> list[dict[str, Any]]:
        """Take over the runs in flight of replicas that are gone (see `gone`) and forget those replicas: the records
        of the runs now this replica's. Each run is taken only from the owner it was seen with, so of two replicas
        adopting at once one gets it."""
        # The runs before the replicas: a replica's row is written before its first run, so no run is seen
        # without its replica's row.
        runs = await self._fetch("SELECT id, owner FROM runs WHERE status = 'running' AND owner IS DISTINCT FROM $1",
                                 self.replica)
        async with self._connection() as conn:
            replicas = {r["id"]: r for r in await conn.fetch("SELECT * FROM replicas WHERE id <> $1", self.replica)}
            now = await conn.fetchval(f"SELECT {NOW}")
            adopted = []
            for run in runs:
                if gone(replicas.get(run["owner"]), now, self.machine) and await conn.execute(
                        "UPDATE runs SET owner = $1 WHERE id = $2 AND owner IS NOT DISTINCT FROM $3 "
                        "AND status = 'running'", self.replica, run["id"], run["owner"]) == "UPDATE 1":
                    adopted.append(run["id"])
            for replica in replicas.values():
                if gone(replica, now, self.machine):
                    await conn.execute("DELETE FROM replicas WHERE id = $1 AND expires = $2",
                                       replica["id"], replica["expires"])
        return [record for run_id in adopted if (record := await self.get(run_id))]

    async def send(self, run_id: str, kind: str, data: dict[str, Any]) -> int:
        """Send a command to the replica that runs `run_id`: its id, for `reply_of`."""
        async with self._transaction() as conn:
            owner = await conn.fetchval("SELECT owner FROM runs WHERE id = $1", run_id)
            command = await conn.fetchval("INSERT INTO commands (run_id, replica, kind, data, sent) "
                                          f"VALUES ($1, $2, $3, $4, {NOW}) RETURNING id",
                                          run_id, owner, kind, json.dumps(data, ensure_ascii=False))
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"commands:{owner}")
        self._watchers.notify(f"commands:{owner}")
        return command

    async def received(self) -> list[dict[str, Any]]:
        """The commands sent to this replica since it last looked: `id`, `run_id`, `kind`, `data`."""
        async with self._transaction() as conn:
            if self._sweeps.due("commands"):
                await conn.execute(f"DELETE FROM commands WHERE sent < {NOW} - $1", float(COMMANDS_KEPT_S))
            rows = await conn.fetch(f"UPDATE commands SET taken = {NOW} WHERE replica = $1 AND taken IS NULL "
                                    "RETURNING id, run_id, kind, data", self.replica)
        return sorted(({**dict(row), "data": json.loads(row["data"])} for row in rows), key=lambda c: c["id"])

    async def reply(self, command_id: int, answer: dict[str, Any]) -> None:
        """Answer a command received; its sender hears of it at commit."""
        async with self._transaction() as conn:
            await conn.execute("UPDATE commands SET answer = $2 WHERE id = $1", command_id,
                               json.dumps(answer, ensure_ascii=False))
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"reply:{command_id}")
        self._watchers.notify(f"reply:{command_id}")

    async def reply_of(self, command_id: int) -> dict[str, Any] | None:
        """The answer to a command sent; None until it comes."""
        row = await self._fetchrow("SELECT answer FROM commands WHERE id = $1", command_id)
        return json.loads(row["answer"]) if row and row["answer"] else None

    def watch(self, key: str) -> ContextManager[asyncio.Event]:
        """An event set when a notification for `key` arrives (or this store made the change)."""
        return self._watchers.watch(key)

    async def _listen(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self._url, timeout=CONNECT_S, command_timeout=COMMAND_S,
                                     server_settings={"application_name": "tiny-backspace listener"})
        try:
            await conn.add_listener(CHANNEL, self._heard)
        except BaseException:
            conn.terminate()
            raise
        return conn

    def _heard(self, conn: object, pid: int, channel: str, key: str) -> None:
        self._watchers.notify(key)

    async def _keep_listening(self) -> None:
        """Listen again when the connection is lost, waiting longer after each failure; once back, wake every
        watcher, for what was announced meanwhile went unheard."""
        while self._listener is not None:
            await _until_lost(self._listener)
            self._listener.terminate()
            log.warning("the run store lost its LISTEN connection to %s; connecting again", self.where)
            delay = 0.5
            while True:
                try:
                    self._listener = await self._listen()
                    break
                except ERRORS as exc:
                    log.warning("cannot listen to the run store at %s (%s); trying again in %.1f s", self.where,
                                self._scrub(str(exc) or type(exc).__name__), delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, LISTEN_RETRY_MAX_S)
            self._watchers.notify_all()

    async def close(self) -> None:
        if self._listening is not None:
            self._listening.cancel()
            with suppress(asyncio.CancelledError):
                await self._listening
        listener, pool, self._listener, self.pool = self._listener, self.pool, None, None
        if listener is not None:
            await _quietly(listener.close, listener.terminate)
        if pool is not None:
            await _quietly(pool.close, pool.terminate)


async def _until_lost(conn: asyncpg.Connection) -> None:
    """Return once the connection is closed, or stops answering."""
    lost = asyncio.Event()
    conn.add_termination_listener(lambda _: lost.set())
    while not conn.is_closed():
        try:
            await asyncio.wait_for(lost.wait(), PING_S)
            return
        except TimeoutError:
            try:
                await conn.fetchval("SELECT 1", timeout=CONNECT_S)
            except ERRORS:
                return


async def _quietly(close: Callable[[], Any], terminate: Callable[[], None]) -> None:
    """Close within CLOSE_S, or cut it off."""
    try:
        await asyncio.wait_for(close(), CLOSE_S)
    except ERRORS:
        terminate()


def _without_password(url: str) -> str:
    """The URL to show: no password, in its user part or its query."""
    parts = urlsplit(url)
    user, at, hosts = parts.netloc.rpartition("@")
    netloc = f"{user.partition(':')[0]}@{hosts}" if at else hosts
    query = "&".join(p for p in parts.query.split("&") if p and not p.lower().startswith("password="))
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _passwords(url: str) -> list[str]:
    """The URL's passwords, in the forms a message could hold, longest first (of four characters or more: a shorter
    one cannot be told from chance, and masking it would garble the message)."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    found = [user.partition(":")[2]] + [v for k, _, v in (p.partition("=") for p in parts.query.split("&"))
                                        if k.lower() == "password"]
    found = [p for raw in found for p in (raw, unquote(raw), unquote_plus(raw)) if len(p) >= 4]
    return sorted(set(found), key=len, reverse=True)


def _database(url: str) -> str:
    """The database the URL names (asyncpg's default: the user's name)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    name = unquote(parts.path.lstrip("/")) or query.get("dbname") or query.get("database")
    user = unquote(parts.netloc.rpartition("@")[0].partition(":")[0]) or query.get("user")
    return name or user or os.environ.get("PGDATABASE") or os.environ.get("USER", "postgres")


__all__ = ["PostgresRunStore"]
