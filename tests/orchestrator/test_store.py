"""The run store's contract, on both backends (SQLite, and a real PostgreSQL): records, admission, leases and
adoption, commands between replicas, notifications, and migrations of stores made before."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from orchestrator.events import EventLog
from orchestrator.store import Quota, Refused, RunStore, SQLiteRunStore, StoreError, sqlite
from orchestrator.store import postgres
from orchestrator.store.postgres import PostgresRunStore
from tests.postgres import psql

ROOT = Path(__file__).resolve().parents[2]
PLENTY = Quota(max_runs=100, max_runs_per_client=100, burst=100, per_minute=60)
CHANGESET = {"files": [{"path": "calc.py", "content": "def add(a, b):\n    return a + b\n"}], "deleted": ["old.py"]}


@dataclass
class Backend:
    kind: str
    target: str  # the SQLite file, or the PostgreSQL URL

    def make(self) -> RunStore:
        if self.kind == "sqlite":
            return SQLiteRunStore(Path(self.target))
        return PostgresRunStore(self.target)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", str(tmp_path / "data" / "runs.sqlite3"))
    return Backend("postgres", request.getfixturevalue("database_url"))


@pytest.fixture
async def stores(backend: Backend) -> AsyncIterator[Callable[[], Awaitable[RunStore]]]:
    """Opens stores on one database, as replicas would; all are closed after the test."""
    opened: list[RunStore] = []

    async def open_one() -> RunStore:
        store = backend.make()
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


@pytest.fixture
async def store(stores: Callable[[], Awaitable[RunStore]]) -> RunStore:
    return await stores()


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 20.0) -> Any:
    """What `check` returns once it is truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not (result := await check()):
        assert time.monotonic() < deadline, f"still {result!r} after {within} s"
        await asyncio.sleep(0.05)
    return result


async def test_events_come_back_in_order_and_update_the_run_record(store):
    secret = "ghp_" + "S" * 36
    await store.create("run_a", "/srv/repo", f"Fix it with {secret}", "single", client="10.0.0.1")
    log = EventLog("run_a")
    await store.append(log("run", repo="/srv/repo"), log("sandbox", sandbox_id="sbx_1"))
    running = await store.running()
    await store.append(log("usage", input_tokens=10), log("error", reason="limit", message=f"no {secret}"),
                       log("pull_request", url="https://github.com/o/r/pull/1"), log("completion", status="success"))
    record = await store.get("run_a")
    assert [e["type"] for e in await store.events("run_a")] == ["run", "sandbox", "usage", "error", "pull_request",
                                                                "completion"]
    assert [e["seq"] for e in await store.events("run_a", after=4)] == [5, 6]
    assert await store.last_seq("run_a") == 6 and await store.last_seq("run_none") == 0
    assert [r["id"] for r in running] == ["run_a"] and await store.running() == []
    assert record["status"] == "success" and record["sandbox_id"] == "sbx_1"
    assert record["pull_request_url"] == "https://github.com/o/r/pull/1" and record["usage"] == {"input_tokens": 10}
    assert record["error"] == {"reason": "limit", "message": "no [redacted]"}
    assert record["prompt"] == "Fix it with [redacted]" and record["replica"] == store.replica
    assert "client" not in record and abs(record["duration_s"]) < 60
    assert await store.get("run_none") is None


async def test_runs_are_listed_newest_first_in_pages(store):
    for run_id in ("run_1", "run_2", "run_3"):
        await store.create(run_id, "/srv/repo", "Fix it", "team")
    page = await store.list(2, None)
    rest = await store.list(10, page[-1]["created"])
    assert [r["id"] for r in page + rest] == ["run_3", "run_2", "run_1"]
    assert page[0]["status"] == "running" and "duration_s" not in page[0] and page[0]["replica"] == store.replica


async def test_work_checkpoints_and_turns_are_kept(store):
    secret = "ghp_" + "K" * 36
    await store.create("run_k", "/srv/repo", "Fix it", "single")
    await store.checkpoint("run_k", {"repo": "/srv/repo", "note": secret, "changeset": CHANGESET})
    checkpoint = await store.checkpoint_of("run_k")
    await store.checkpoint("run_k", None)
    await store.keep_work("run_k", {"reason": "limit", "repo": "/srv/repo", "changeset": CHANGESET})
    kept = await store.kept_work("run_k")
    await store.published("run_k", "https://github.com/o/r/pull/2")
    record = await store.get("run_k")
    await store.add_turn("run_k", 2, "coder", 2, {"role": "assistant", "content": "second"})
    await store.add_turn("run_k", 1, "planner", 1, {"role": "assistant", "content": f"first {secret}"})
    assert checkpoint == {"repo": "/srv/repo", "note": "[redacted]", "changeset": CHANGESET}
    assert await store.checkpoint_of("run_k") is None
    assert kept == {"reason": "limit", "repo": "/srv/repo", "changeset": CHANGESET, "published_url": None}
    assert record["kept"] == {"reason": "limit", "files": ["calc.py"], "deleted": ["old.py"],
                              "published_url": "https://github.com/o/r/pull/2"}
    assert record["pull_request_url"] == "https://github.com/o/r/pull/2"
    assert await store.turns("run_k") == [
        {"agent": "planner", "agent_seq": 1, "role": "assistant", "content": "first [redacted]"},
        {"agent": "coder", "agent_seq": 2, "role": "assistant", "content": "second"}]


async def test_kept_work_is_published_by_one_replica_at_a_time(stores):
    one, two = await stores(), await stores()
    await one.create("run_k", "/srv/repo", "Fix it", "single")
    nothing = await one.claim_publishing("run_k", 60)  # nothing kept yet
    await one.keep_work("run_k", {"reason": "limit", "repo": "/srv/repo", "changeset": CHANGESET})
    claims = [await one.claim_publishing("run_k", 60), await two.claim_publishing("run_k", 60)]
    await one.keep_work("run_k", {"reason": "limit", "repo": "/srv/repo", "changeset": CHANGESET, "commit": "c0"})
    still = await two.claim_publishing("run_k", 60)  # keeping its commit midway keeps the claim
    await one.release_publishing("run_k")
    after = await two.claim_publishing("run_k", -1)  # a claim that ran out, as one of a replica that died
    taken_over = await one.claim_publishing("run_k", 60)
    await one.published("run_k", "https://github.com/o/r/pull/3")
    await one.release_publishing("run_k")
    assert nothing is False and claims == [True, False] and still is False
    assert after is True and taken_over is True
    assert await two.claim_publishing("run_k", 60) is False  # published


async def test_a_delivery_is_claimed_once_for_its_comment(store):
    first = await store.claim_delivery("d1", "issue_comment:o/r:7")
    again = await store.claim_delivery("d1", "issue_comment:o/r:7")
    await store.settle_delivery("d1", "run_d", "started")
    other = await store.claim_delivery("d2", "issue_comment:o/r:7")
    await store.answering("d1", "o/r", 3, "https://github.com/o/r/issues/3", 2**40)
    waiting = await store.unanswered()
    await store.answered("d1")
    await store.claim_delivery("d3", "issue_comment:o/r:8")
    await store.forget_delivery("d3")
    assert first is None and again == {"id": "d1", "run_id": None, "outcome": None}
    assert other == {"id": "d1", "run_id": "run_d", "outcome": "started"}
    assert waiting == [{"id": "d1", "run_id": "run_d", "repo": "o/r", "number": 3,
                        "link": "https://github.com/o/r/issues/3", "answer": 2**40}]
    assert await store.unanswered() == [] and await store.claim_delivery("d3", "issue_comment:o/r:8") is None


async def test_deliveries_of_one_comment_claimed_at_once_by_two_replicas_start_one_run(stores):
    one, two = await stores(), await stores()  # GitHub delivering to each replica, or redelivering meanwhile
    claims = await asyncio.gather(*((one, two)[n % 2].claim_delivery(f"d{n}", "issue_comment:o/r:9")
                                    for n in range(12)))
    first = [n for n, claim in enumerate(claims) if claim is None]
    assert len(first) == 1
    assert all(claim == {"id": f"d{first[0]}", "run_id": None, "outcome": None} for claim in claims if claim)


async def test_admission_refuses_by_the_client_cap_then_the_total_then_the_rate_spent_by_runs_admitted(store):
    quota = Quota(max_runs=3, max_runs_per_client=2, burst=3, per_minute=0.6)  # a token per 100 s

    async def admit(run_id: str, client: str) -> Refused | None:
        return await store.admit(run_id, "/srv/repo", "Fix it", "single", client, quota)

    a = [await admit(f"run_a{n}", "a") for n in range(3)]
    b = [await admit("run_b1", "b"), await admit("run_b2", "b")]
    await store.append(EventLog("run_a0")("completion", status="success"))
    again = [await admit("run_a3", "a"), await admit("run_a4", "a")]  # a's third token: refusals spent none
    await store.append(EventLog("run_a1")("completion", status="success"))
    spent = await admit("run_a5", "a")
    assert a == [None, None, Refused("client", 10.0)]
    assert b == [None, Refused("total", 10.0)]
    assert again == [None, Refused("client", 10.0)]
    assert spent.reason == "rate" and 90 < spent.wait_s <= 100
    assert sorted(r["id"] for r in await store.running()) == ["run_a3", "run_b1"]
    record = await store.get("run_b1")
    assert record["replica"] == store.replica and record["status"] == "running" and "client" not in record


async def test_a_client_spreading_its_runs_over_replicas_meets_one_rate_limit(stores):
    one, two = await stores(), await stores()
    quota = Quota(max_runs=100, max_runs_per_client=100, burst=3, per_minute=0.6)
    answers = [await (one, two)[n % 2].admit(f"run_{n}", "/srv/repo", "Fix it", "single", "mallory", quota)
               for n in range(5)]
    assert answers[:3] == [None, None, None] and [a.reason for a in answers[3:]] == ["rate", "rate"]


async def test_admissions_at_once_from_two_replicas_never_exceed_the_cap(stores):
    one, two = await stores(), await stores()
    quota = Quota(max_runs=5, max_runs_per_client=5, burst=100, per_minute=60)
    answers = await asyncio.gather(*(
        (one, two)[n % 2].admit(f"run_{n}", "/srv/repo", "Fix it", "single", f"client{n % 3}", quota)
        for n in range(20)))
    assert answers.count(None) == 5 and all(a is None or a.reason == "total" for a in answers)
    assert len(await one.running()) == 5


CHILD = """
import asyncio, sys
from pathlib import Path

async def main(kind, target, where, lease):
    if kind == "sqlite":
        from orchestrator.store import SQLiteRunStore
        store = SQLiteRunStore(Path(target))
    else:
        from orchestrator.store.postgres import PostgresRunStore
        store = PostgresRunStore(target)
    await store.open()
    store.machine = where or store.machine
    await store.beat(float(lease))
    await store.create("run_child", "/srv/repo", "Fix it", "single")
    print(store.replica, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main(*sys.argv[1:]))
"""


async def killed_replica(backend: Backend, where: str, lease_s: float) -> str:
    """Start a replica in a child process that takes a lease and starts a run, then SIGKILL it: its replica id."""
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, backend.kind, backend.target, where,
                                                 str(lease_s), cwd=ROOT, stdin=asyncio.subprocess.PIPE,
                                                 stdout=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(60):
            replica = (await child.stdout.readline()).decode().strip()
    finally:
        child.kill()
        await child.wait()
    assert replica.startswith("r_"), "the child replica did not start"
    return replica


async def test_the_runs_of_a_killed_replica_on_this_machine_are_adopted_at_once(store, backend):
    await store.beat(600)
    await store.create("run_mine", "/srv/repo", "Fix it", "single")
    dead = await killed_replica(backend, "", lease_s=600)
    adopted = await store.adopt()
    assert [r["id"] for r in adopted] == ["run_child"] and adopted[0]["replica"] == store.replica
    assert dead != store.replica and await store.adopt() == []
    assert {r["id"]: r["replica"] for r in await store.running()} == {"run_mine": store.replica,
                                                                      "run_child": store.replica}


async def test_a_live_replica_keeps_its_runs(stores):
    one, two = await stores(), await stores()
    await one.beat(600)
    await two.beat(600)
    await one.create("run_one", "/srv/repo", "Fix it", "single")
    assert await two.adopt() == []
    await one.leave()  # gone without its runs ended: they are another's to end
    assert [r["id"] for r in await two.adopt()] == ["run_one"]


async def test_a_replica_of_another_machine_is_adopted_only_once_its_lease_ran_out(store, backend):
    lease_s = 3.0
    before = time.monotonic()
    await killed_replica(backend, "another-boot/4026531836", lease_s)
    assert await store.adopt() == []  # its pid means nothing here: only its lease tells
    adopted = await eventually(store.adopt)
    assert time.monotonic() - before >= lease_s
    assert [r["id"] for r in adopted] == ["run_child"] and adopted[0]["replica"] == store.replica


async def test_commands_reach_the_replica_that_runs_the_run_and_its_reply_comes_back(stores):
    runner, asker = await stores(), await stores()
    await runner.create("run_c", "/srv/repo", "Fix it", "single")
    with runner.watch(f"commands:{runner.replica}") as sent:
        command = await asker.send("run_c", "message", {"text": "use tabs"})
        async with asyncio.timeout(10):
            await sent.wait()
    received = await runner.received()
    with asker.watch(f"reply:{command}") as answered:
        unanswered = await asker.reply_of(command)
        await runner.reply(command, {"delivered": True})
        async with asyncio.timeout(10):
            await answered.wait()
    assert received == [{"id": command, "run_id": "run_c", "kind": "message", "data": {"text": "use tabs"}}]
    assert await runner.received() == [] and await asker.received() == []
    assert unanswered is None and await asker.reply_of(command) == {"delivered": True}


async def test_a_watcher_wakes_on_another_replicas_events_and_on_its_own(stores):
    reader, writer = await stores(), await stores()
    await writer.create("run_w", "/srv/repo", "Fix it", "single")
    log = EventLog("run_w")
    with reader.watch("run:run_w") as changed, reader.watch("run:other") as unrelated:
        await writer.append(log("run", repo="/srv/repo"))
        async with asyncio.timeout(10):
            await changed.wait()
        changed.clear()
        await reader.append(log("sandbox", sandbox_id="sbx_w"))
        assert changed.is_set()  # its own change, at once
    assert [e["type"] for e in await reader.events("run_w")] == ["run", "sandbox"]
    if isinstance(reader, PostgresRunStore):  # SQLite, which cannot tell what changed, wakes every watcher
        assert not unrelated.is_set()


async def test_a_replica_hears_again_once_its_listen_connection_was_cut(database_url):
    reader, writer = PostgresRunStore(database_url), PostgresRunStore(database_url)
    await reader.open()
    await writer.open()
    admin = await asyncpg.connect(database_url)
    query = ("SELECT pid FROM pg_stat_activity WHERE application_name = 'tiny-backspace listener' AND "
             "datname = current_database() AND query LIKE 'LISTEN%'")
    try:
        old = {r["pid"] for r in await admin.fetch(query)}
        with reader.watch("run:run_l") as changed:
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY($1)",
                                list(old))
            await eventually(lambda: admin.fetchval(query.replace("SELECT pid", "SELECT count(*)")
                                                    + " AND NOT (pid = ANY($1))", list(old)))
            log = EventLog("run_l")
            for _ in range(3):  # its one wake-up on reconnecting would answer one of these at most
                changed.clear()
                await writer.append(log("run", repo="/srv/repo"))
                async with asyncio.timeout(10):
                    await changed.wait()
    finally:
        await admin.close()
        await reader.close()
        await writer.close()


async def test_replicas_that_open_a_fresh_database_at_once_migrate_it_once(database_url):
    opened = [PostgresRunStore(database_url) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in opened))
        versions = psql(database_url, "SELECT version, count(*) FROM schema_migrations GROUP BY version ORDER BY 1")
    finally:
        for s in opened:
            await s.close()
    assert versions.splitlines() == [f"{n}|1" for n in range(1, len(postgres.MIGRATIONS) + 1)]


SCHEMA_BEFORE_VERSIONS = """
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


@pytest.mark.parametrize("schema", [SCHEMA_BEFORE_VERSIONS, SCHEMA_BEFORE_VERSIONS.replace(", error TEXT", "")],
                         ids=["before versions", "before errors were kept"])
async def test_an_sqlite_store_made_before_is_migrated_with_its_runs(tmp_path, schema):
    path = tmp_path / "runs.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(schema)
        db.execute("INSERT INTO runs (id, repo, prompt, mode, status, created) "
                   "VALUES ('run_old', '/srv/repo', 'Fix it', 'team', 'running', 1.0)")
        db.execute("""INSERT INTO events VALUES ('run_old', 1, '{"type": "run", "run_id": "run_old", "seq": 1}')""")
    store = SQLiteRunStore(path)
    await store.open()
    try:
        record = await store.get("run_old")
        await store.append(EventLog("run_new")("error", reason="limit"))
        adopted = await store.adopt()
        admitted = await store.admit("run_new", "/srv/repo", "Fix it", "single", "a", PLENTY)
    finally:
        await store.close()
    assert record["status"] == "running" and record["replica"] is None and record["error"] is None
    assert [r["id"] for r in adopted] == ["run_old"] and adopted[0]["replica"] == store.replica
    assert admitted is None
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(sqlite.MIGRATIONS)


async def test_an_sqlite_store_of_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "runs.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer Tiny Backspace"):
        await SQLiteRunStore(path).open()


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def refusal(url: str) -> tuple[StoreError, str]:
    """The error opening a store at `url`, and the store's repr."""
    store = PostgresRunStore(url)
    with pytest.raises(StoreError) as caught:
        async with asyncio.timeout(60):
            await store.open()
    return caught.value, repr(store)


async def test_a_postgres_store_that_cannot_be_used_says_what_to_do_without_the_password(postgres_url,
                                                                                         database_url):
    role = f"tb_{time.monotonic_ns()}"
    psql(postgres_url, f"CREATE ROLE {role} LOGIN PASSWORD 'right-pw-9f3'")
    socket_dir = database_url.partition("?host=")[2]
    database = database_url.partition("@/")[2].partition("?")[0]
    cases = {
        "correct the user name or password": f"postgresql://{role}:Wr0ng-pw-7%40x@/{database}?host={socket_dir}",
        "create and write tables": f"postgresql://{role}:right-pw-9f3@/{database}?host={socket_dir}",
        "create the database": f"postgresql://postgres:S3cret-pw-1@/no_such_db?host={socket_dir}",
        "start PostgreSQL": f"postgresql://u:S3cret-pw-2@127.0.0.1:{unused_port()}/db",
    }
    for hint, url in cases.items():
        error, shown = await refusal(url)
        assert hint in str(error) and "TB_DATABASE_URL" in str(error), error
        for password in ("Wr0ng-pw-7", "Wr0ng-pw-7@x", "right-pw-9f3", "S3cret-pw"):
            assert password not in str(error) and password not in repr(error) and password not in shown


async def test_a_postgres_server_that_never_answers_is_given_up_on_in_time(monkeypatch):
    monkeypatch.setattr(postgres, "CONNECT_S", 0.5)
    with socket.socket() as silent:  # accepts connections (the kernel does) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        error, _ = await refusal(f"postgresql://u:S3cret-pw-3@127.0.0.1:{silent.getsockname()[1]}/db")
    assert "start PostgreSQL" in str(error) and "S3cret-pw-3" not in str(error)
    assert time.monotonic() - started < 10
