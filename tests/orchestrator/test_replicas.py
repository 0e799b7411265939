"""Two replicas of the service, each `python -m orchestrator` with MCP servers of its own, on one PostgreSQL
database: a run started on one is followed, limited, steered and cancelled from the other; a replica killed mid-run
has its run marked interrupted by the other, and its sandbox removed; one paused past its lease gives its run up.
And the service when PostgreSQL cannot be reached, at start-up and later."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator.store.postgres import PostgresRunStore
from tests.conftest import remove_sandbox_root, unique_marker
from tests.fakes.messages_api import messages_api, text, tool_use, turn
from tests.postgres import psql

from .conftest import API_KEY, ROOT, free_port, post_code, serve, stack
from .test_failures import _processes
from .test_run import BUGGY

pytestmark = pytest.mark.asyncio(loop_scope="session")
LEASE_S = 3  # short, so that a replica that is gone is noticed within a second (a third of it)


@dataclass
class Replica:
    url: str
    proc: asyncio.subprocess.Process
    id: str


@asynccontextmanager
async def replica(database_url: str, api_url: str, mcp_json: Path) -> AsyncIterator[Replica]:
    """One replica, as an operator starts it: its own data folder, port and MCP servers; the shared database."""
    data, port = Path(tempfile.mkdtemp(prefix="tb-test-replica-")), free_port()
    env = {"PATH": os.environ["PATH"], "HOME": str(data), "ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": api_url,
           "TB_DATA_DIR": str(data), "TB_DATABASE_URL": database_url, "TB_LEASE_S": str(LEASE_S),
           "TB_MODEL": "claude-sonnet-test", "TB_SHUTDOWN_GRACE_S": "1", "TB_MAX_RUNS": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator", "--port", str(port), "--mcp-config", str(mcp_json), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(60), aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(f"{url}/health") as resp:
                        health = await resp.json()
                        if health["status"] == "healthy":
                            break
                except aiohttp.ClientConnectionError:
                    if proc.returncode is not None:
                        raise AssertionError((await proc.stderr.read()).decode()[-3000:]) from None
                    await asyncio.sleep(0.1)
        yield Replica(url, proc, health["replica"])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@asynccontextmanager
async def two_replicas(database_url: str, script: list) -> AsyncIterator[tuple[Replica, Replica, Path]]:
    """Two replicas on one database and one scripted model; their sandboxes under one root (one machine's)."""
    root = Path(tempfile.mkdtemp(prefix="tb-test-replicas-"))
    root.chmod(0o711)
    config = json.loads((ROOT / "mcp.json").read_text())
    config["mcpServers"]["sandbox"]["env"]["SANDBOX_ROOT"] = str(root)
    for server in config["mcpServers"].values():
        server["command"] = sys.executable
    mcp_json = root.parent / f"{root.name}.json"
    mcp_json.write_text(json.dumps(config))
    try:
        async with messages_api(script) as api, AsyncExitStack() as stack:
            first, second = await asyncio.gather(stack.enter_async_context(replica(database_url, api.url, mcp_json)),
                                                 stack.enter_async_context(replica(database_url, api.url, mcp_json)))
            yield first, second, root
    finally:
        mcp_json.unlink()
        await asyncio.to_thread(remove_sandbox_root, root)


class Stream:
    """A run's event stream, read as it comes, in a task of its own."""

    def __init__(self, http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any):
        self.events: list[dict[str, Any]] = []
        self.status = 0
        self.arrived = asyncio.Event()
        self.task = asyncio.create_task(self._read(http, method, url, kwargs))

    async def _read(self, http: aiohttp.ClientSession, method: str, url: str, kwargs: dict[str, Any]) -> None:
        async with http.request(method, url, **kwargs) as resp:
            self.status = resp.status
            async for line in resp.content:
                if line.startswith(b"data: "):
                    self.events.append(json.loads(line[6:]))
                    self.arrived.set()

    async def until(self, found: Any) -> dict[str, Any]:
        """The first event `found` accepts, waiting (bounded) for it."""
        async with asyncio.timeout(60):
            while True:
                for event in self.events:
                    if found(event):
                        return event
                if self.task.done():
                    self.task.result()
                    raise AssertionError(f"the stream ended without it: {self.events[-3:]}")
                self.arrived.clear()
                await self.arrived.wait()

    async def end(self) -> list[dict[str, Any]]:
        async with asyncio.timeout(60):
            await self.task
        return self.events


def sleeping(marker: str, then: list | None = None) -> list:
    """The script of a run whose command sleeps (tagged with `marker`) until it is stopped; `then`, the turns of a
    run after it."""
    return [turn(tool_use("sandbox_exec", {"command": f"sleep {marker}"})), *(then or [])]


async def start_sleeping(http: aiohttp.ClientSession, url: str, repo: Path, marker: str) -> tuple[Stream, str]:
    """POST /code to the service at `url` for a run of `sleeping`, followed until its command runs; the stream and
    the run's id."""
    started = Stream(http, "POST", f"{url}/code", json={"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"})
    run_id = (await started.until(lambda e: e["type"] == "run"))["run_id"]
    await running(marker)
    return started, run_id


def children(pid: int) -> list[int]:
    """The processes `pid` started (its MCP servers)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and f"PPid:\t{pid}\n" in Path(f"/proc/{entry}/status").read_text():
                found.append(int(entry))
        except OSError:
            pass
    return found


def environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


async def running(marker: str) -> None:
    """Until the run's command runs in its sandbox."""
    async with asyncio.timeout(60):
        while not _processes(marker):
            await asyncio.sleep(0.05)


async def test_a_run_on_one_replica_is_followed_limited_steered_and_cancelled_from_the_other(database_url,
                                                                                             make_repo):
    marker, repo = unique_marker(), make_repo(BUGGY)
    body = {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"}
    async with two_replicas(database_url, sleeping(marker)) as (a, b, _), aiohttp.ClientSession() as http:
        started, run_id = await start_sleeping(http, a.url, repo, marker)
        async with http.get(f"{b.url}/runs/{run_id}") as resp:
            record = await resp.json()
        servers = [environ(pid) for pid in children(a.proc.pid)]
        async with http.post(f"{b.url}/code", json=body) as resp:  # TB_MAX_RUNS=1 holds across replicas
            over_cap = resp.status, await resp.json()
        seen = len(started.events)
        followed = Stream(http, "GET", f"{b.url}/runs/{run_id}/events", headers={"Last-Event-ID": "2"})
        await followed.until(lambda e: e["seq"] == seen)  # it caught up with what the first replica streamed
        async with http.post(f"{b.url}/runs/{run_id}/messages", json={"text": "Keep the API as it is"}) as resp:
            steered = resp.status, await resp.json()
        async with http.post(f"{b.url}/runs/{run_id}/cancel", json={"changes": "discard"}) as resp:
            cancelled = resp.status, await resp.json()
        origin, other = await started.end(), await followed.end()
    assert record["status"] == "running" and record["replica"] == a.id != b.id
    assert len(servers) == 2 and not any(b"TB_DATABASE_URL" in env or database_url.encode() in env for env in servers)
    assert over_cap[0] == 503 and "TB_MAX_RUNS" in over_cap[1]["error"]
    assert steered[0] == 202, steered  # the replica running it took the message
    assert cancelled[0] == 200 and cancelled[1]["status"] == "cancelled"
    # Followed from the other replica: every event after the second, once each, as the first replica streamed it.
    assert other == origin[2:] and [e["seq"] for e in other] == list(range(3, len(origin) + 1))
    assert origin[-1] == {**origin[-1], "type": "completion", "status": "cancelled"}
    assert not _processes(marker)


async def test_a_replica_killed_mid_run_has_its_run_marked_interrupted_by_the_other_and_its_sandbox_removed(
        database_url, make_repo):
    marker, repo = unique_marker(), make_repo(BUGGY)
    body = {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"}
    script = sleeping(marker, then=[turn(text("Nothing to change."))])
    async with two_replicas(database_url, script) as (a, b, root), aiohttp.ClientSession() as http:
        started, run_id = await start_sleeping(http, a.url, repo, marker)
        assert list(root.glob("*/sbx-*"))  # its sandbox, on this machine
        followed = Stream(http, "GET", f"{b.url}/runs/{run_id}/events")
        await followed.until(lambda e: e["type"] == "tool_call")
        a.proc.send_signal(signal.SIGKILL)
        await a.proc.wait()
        with pytest.raises(aiohttp.ClientPayloadError):  # its own stream broke off with it
            await started.end()
        events = await followed.end()  # the other replica noticed, and ended the run
        async with http.get(f"{b.url}/runs/{run_id}") as resp:
            record = await resp.json()
        async with asyncio.timeout(30):
            while _processes(marker) or list(root.glob("*/sbx-*")):
                await asyncio.sleep(0.05)
        async with http.post(f"{b.url}/code", json=body) as resp:  # its run no longer counts against the cap
            after = resp.status
            await resp.read()
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-2]["type"] == "error" and events[-2]["reason"] == "interrupted"
    assert events[-1]["type"] == "completion" and events[-1]["status"] == "interrupted"
    assert record["status"] == "interrupted" and record["replica"] == b.id
    assert after == 200


async def test_a_replica_paused_past_its_lease_gives_up_the_run_another_took_over_and_goes_on(database_url,
                                                                                             make_repo):
    marker, repo = unique_marker(), make_repo(BUGGY)
    body = {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single"}
    script = sleeping(marker, then=[turn(text("Nothing to change."))])
    async with two_replicas(database_url, script) as (a, b, _), aiohttp.ClientSession() as http:
        started, run_id = await start_sleeping(http, a.url, repo, marker)
        a.proc.send_signal(signal.SIGSTOP)  # a pause longer than its lease: the other replica takes the run over
        try:
            followed = Stream(http, "GET", f"{b.url}/runs/{run_id}/events")
            taken = await followed.end()
        finally:
            a.proc.send_signal(signal.SIGCONT)
        # Back, it finds the run is no longer its own: it stops it there, and stores nothing more of it.
        ended = await started.end()
        async with asyncio.timeout(30):
            while _processes(marker):
                await asyncio.sleep(0.05)
        again = Stream(http, "POST", f"{a.url}/code", json=body)  # and its next run is stored as ever
        second = (await again.until(lambda e: e["type"] == "run"))["run_id"]
        await again.end()
        async with http.get(f"{b.url}/runs/{run_id}/events") as resp:
            stored = (await resp.text()).count('"type":"completion"'), resp.status
        async with http.get(f"{b.url}/runs/{second}") as resp:
            record = await resp.json()
    assert taken[-1]["type"] == "completion" and taken[-1]["status"] == "interrupted"
    assert ended[-1]["type"] == "completion" and ended[-1]["status"] == "cancelled"
    assert stored == (1, 200)  # the other replica's completion only
    assert record["status"] == "no_changes" and record["replica"] == a.id


async def test_a_database_that_cannot_be_reached_is_one_line_at_start_up_without_its_password(tmp_path):
    password = "Sekret-pw-5150"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TB_DATA_DIR": str(tmp_path),
           "ANTHROPIC_API_KEY": API_KEY, "TB_DATABASE_URL": f"postgresql://tb:{password}@127.0.0.1:1/tb"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator", "--port", str(free_port()), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: cannot reach PostgreSQL at "), err.decode()
    assert "postgresql://tb@127.0.0.1:1/tb" in lines[-1] and "TB_DATABASE_URL" in lines[-1]
    assert password not in (out + err).decode()


async def test_a_run_store_that_goes_away_is_a_503_saying_so_and_the_service_goes_on_once_it_is_back(
        pool, postgres_url, database_url, make_repo):
    name = database_url.split("@/")[1].split("?")[0]
    body = {"repoUrl": str(make_repo(BUGGY)), "prompt": "Check add()", "mode": "single"}
    store = PostgresRunStore(database_url)
    await store.open()
    async with stack(pool, [turn(text("Nothing to change."))]) as s, serve(s.services, store) as url:
        psql(postgres_url, f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        psql(postgres_url, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        try:
            down = await post_code(url, body)
            async with aiohttp.ClientSession() as http, http.get(f"{url}/health") as resp:
                health = await resp.json()
        finally:
            psql(postgres_url, f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        up = await post_code(url, body)
    assert down[0] == 503 and "check that PostgreSQL is up" in down[1]["error"], down
    assert health["status"] == "degraded" and "the run store cannot be used now" in health["reasons"]["store"]
    assert postgres_url.split("?host=")[1] not in json.dumps(health)  # where the database is: for the log only
    assert up[0] == 200 and up[1][-1]["status"] == "no_changes"


async def test_a_replica_cut_off_from_the_database_stops_its_runs_and_marks_them_once_it_is_back(
        pool, postgres_url, database_url, make_repo):
    name = database_url.split("@/")[1].split("?")[0]
    marker = unique_marker()
    store = PostgresRunStore(database_url)
    await store.open()
    async with stack(pool, sleeping(marker), lease_s=1.5) as s, serve(s.services, store) as url, \
            aiohttp.ClientSession() as http:
        started, run_id = await start_sleeping(http, url, make_repo(BUGGY), marker)
        psql(postgres_url, f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        psql(postgres_url, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        try:
            ended = await started.end()  # within two thirds of its lease, it stopped the run: another may take it
            gone = not _processes(marker)
        finally:
            psql(postgres_url, f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        async with asyncio.timeout(30):  # back, it marks the run it stopped, as any replica would
            while (record := await store.get(run_id))["status"] == "running":
                await asyncio.sleep(0.05)
    assert ended[-1]["type"] == "completion" and ended[-1]["status"] == "cancelled" and gone
    assert record["status"] == "interrupted" and record["error"]["reason"] == "interrupted"
