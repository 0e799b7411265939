"""Durable runs: a run outlives its connection; readers resume, several follow one run, runs can be cancelled and
survive a restart of the service as `interrupted`."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from orchestrator.app import build_app
from orchestrator.events import EventLog
from orchestrator.runs import RunManager
from orchestrator.store import SQLiteRunStore, StoreError
from tests.conftest import unique_marker
from tests.fakes.messages_api import text, tool_use, turn

from .conftest import free_port, of_type, parse_sse, post_code, serve, stack
from .test_failures import _processes, sandboxes
from .test_nothing_lost import Following, running
from .test_run import BUGGY, fix_script

CANCEL_MARK = unique_marker()
pytestmark = pytest.mark.asyncio(loop_scope="session")


def body(repo, **extra) -> dict:
    return {"repoUrl": str(repo), "prompt": "Fix add()", "mode": "single", **extra}


async def read_until(resp: aiohttp.ClientResponse, stop: str) -> list[dict]:
    """Events of an open stream up to and including the first whose JSON contains `stop`."""
    raw, block = "", ""
    async with asyncio.timeout(30):
        async for line in resp.content:
            block += line.decode()
            if line == b"\n":
                raw, block = raw + block, ""
                if stop in raw.rsplit("data: ", 1)[-1]:
                    break
    return parse_sse(raw)


async def get_json(url: str) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            return {"status": resp.status, **await resp.json()}


async def events_after(url: str, run_id: str, last: int) -> list[dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/runs/{run_id}/events", headers={"Last-Event-ID": str(last)}) as resp:
            return parse_sse(await resp.text())


async def test_a_reader_that_reconnects_with_last_event_id_misses_nothing_and_sees_nothing_twice(pool, make_repo):
    async with stack(pool, fix_script()) as s:
        async with aiohttp.ClientSession() as http:
            async with http.post(s.url + "/code", json=body(make_repo(BUGGY))) as resp:
                first = await read_until(resp, '"type":"tool_result"')
        run = first[0]
        assert run["events_url"] == f"/runs/{run['run_id']}/events"
        rest = await events_after(s.url, run["run_id"], first[-1]["seq"])
        record = await get_json(f"{s.url}/runs/{run['run_id']}")
    seqs = [e["seq"] for e in first + rest]
    assert seqs == list(range(1, len(seqs) + 1))
    assert rest[-1]["type"] == "completion" and rest[-1]["status"] == "success"
    assert record["status"] == "success" and record["pull_request_url"] == of_type(rest, "pull_request")[0]["url"]
    assert record["usage"]["input_tokens"] > 0 and record["duration_s"] > 0


async def test_two_readers_of_one_run_see_the_same_events(pool, make_repo):
    async with stack(pool, fix_script()) as s:
        async with aiohttp.ClientSession() as http:
            async with http.post(s.url + "/code", json=body(make_repo(BUGGY))) as resp:
                head = await read_until(resp, '"type":"sandbox"')
                second = asyncio.create_task(events_after(s.url, head[0]["run_id"], 0))
                first = parse_sse((await resp.text()))
        other = await second
    assert head + first == other
    assert other[-1]["type"] == "completion"


async def test_cancel_during_a_tool_call_stops_the_run_and_removes_its_sandbox(pool, make_repo, sandbox_root):
    script = [turn(tool_use("sandbox_exec", {"command": f"sleep {CANCEL_MARK}"}))]
    async with stack(pool, script) as s:
        async with aiohttp.ClientSession() as http:
            async with http.post(s.url + "/code", json=body(make_repo(BUGGY))) as resp:
                head = await read_until(resp, '"state":"complete"')
                run_id = head[0]["run_id"]
                async with asyncio.timeout(30):
                    while not _processes(CANCEL_MARK):
                        await asyncio.sleep(0.05)
                async with asyncio.timeout(15):
                    async with http.post(f"{s.url}/runs/{run_id}/cancel") as cancelled:
                        assert cancelled.status == 200
                    tail = parse_sse(await resp.text())
            async with http.post(f"{s.url}/runs/{run_id}/cancel") as again:
                assert again.status == 409
        record = await get_json(f"{s.url}/runs/{run_id}")
    assert tail[-1] == {**tail[-1], "type": "completion", "status": "cancelled"}
    assert record["status"] == "cancelled"
    assert sandboxes(sandbox_root) == [] and not _processes(CANCEL_MARK)


async def test_a_client_that_goes_away_does_not_stop_its_run(pool, make_repo):
    async with stack(pool, fix_script()) as s:
        async with aiohttp.ClientSession() as http:
            async with http.post(s.url + "/code", json=body(make_repo(BUGGY))) as resp:
                head = await read_until(resp, '"type":"sandbox"')
        rest = await events_after(s.url, head[0]["run_id"], head[-1]["seq"])
    assert rest[-1]["status"] == "success"


async def test_runs_are_listed_newest_first_in_pages(pool, make_repo):
    repo = make_repo(BUGGY)
    script = [turn(text("Nothing to do."))] * 3
    async with stack(pool, script) as s:
        ids = [(await post_code(s.url, body(repo)))[1][0]["run_id"] for _ in range(3)]
        page = await get_json(f"{s.url}/runs?limit=2")
        rest = await get_json(s.url + page["next"])
        missing = await get_json(f"{s.url}/runs/run_nope")
        bad = await get_json(f"{s.url}/runs?limit=x")
    assert [r["id"] for r in page["runs"] + rest["runs"]] == ids[::-1]
    assert page["runs"][0]["status"] == "no_changes" and page["runs"][0]["prompt"] == "Fix add()"
    assert missing["status"] == 404 and bad["status"] == 400


async def test_a_restart_marks_the_runs_in_flight_as_interrupted(pool):
    path = Path(tempfile.mkdtemp()) / "runs.sqlite3"
    store = SQLiteRunStore(path)
    await store.open()
    await store.create("run_old", "/srv/repo", "Fix it", "team")
    events = EventLog("run_old")
    await store.append(events("run", repo="/srv/repo"))
    await store.append(events("sandbox", sandbox_id="sbx_gone"))
    await store.close()
    async with stack(pool, []) as s:
        reopened = SQLiteRunStore(path)
        await reopened.open()
        manager = RunManager(s.services, reopened)
        assert await manager.recover() == ["run_old"]
        async with serve(s.services, reopened) as url:
            replay = await events_after(url, "run_old", 0)
            record = await get_json(f"{url}/runs/run_old")
    assert [e["type"] for e in replay] == ["run", "sandbox", "error", "completion"]
    assert replay[2]["reason"] == "interrupted" and replay[3]["status"] == "interrupted"
    assert record["status"] == "interrupted"


async def test_a_corrupt_store_is_a_clear_start_up_error(tmp_path):
    corrupt = tmp_path / "corrupt.sqlite3"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="writable SQLite file"):
        await SQLiteRunStore(corrupt).open()


async def test_a_read_only_store_is_a_clear_start_up_error(tmp_path):
    folder = tmp_path / "data"
    made = SQLiteRunStore(folder / "runs.sqlite3")
    await made.open()
    await made.close()
    # Root writes through permission bits; the immutable attribute stops even root.
    made = subprocess.run(["chattr", "+i", str(folder / "runs.sqlite3"), str(folder)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a read-only file here: {made.stderr.decode().strip()}")
    try:
        with pytest.raises(StoreError, match="TB_DATA_DIR"):
            await SQLiteRunStore(folder / "runs.sqlite3").open()
    finally:
        subprocess.run(["chattr", "-i", str(folder / "runs.sqlite3"), str(folder)], check=True)


async def test_the_run_records_are_redacted_like_the_stream(pool, make_repo):
    secret = "ghp_" + "R" * 36
    async with stack(pool, [turn(text("Nothing to do."))]) as s:
        _, events, raw = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": f"use {secret}",
                                                 "mode": "single"})
        one = await get_json(f"{s.url}/runs/{events[0]['run_id']}")
        page = await get_json(f"{s.url}/runs")
        bad = await get_json(f"{s.url}/runs/{events[0]['run_id']}/events?after=%C2%B2")
    assert one["prompt"] == "use [redacted]" and secret not in json.dumps(page) and secret not in raw
    assert bad["status"] == 400


async def test_a_draining_service_refuses_new_runs_and_says_so_while_its_runs_finish(pool, make_repo, tmp_path):
    marker = unique_marker()
    script = [turn(tool_use("sandbox_exec", {"command": f"sleep 1.{marker}"})), turn(text("Checked; nothing to do."))]
    body = {"repoUrl": str(make_repo(BUGGY)), "prompt": "Check add()", "mode": "single"}
    async with stack(pool, script) as s:
        store = SQLiteRunStore(tmp_path / "runs.sqlite3")
        await store.open()
        runs = RunManager(s.services, store)
        await runs.begin()
        runner = web.AppRunner(build_app(runs), handler_cancellation=True)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}"
        try:
            follow = Following(url, body)
            await follow.until(running(marker))
            draining = asyncio.create_task(runs.shutdown(60))  # as SIGTERM does, with a grace of a minute
            async with asyncio.timeout(10):
                while not runs.draining:
                    await asyncio.sleep(0)
            refused = await post_code(url, body)
            async with aiohttp.ClientSession() as http, http.get(f"{url}/health") as resp:
                health = resp.status, await resp.json()
            async with asyncio.timeout(60):
                await draining
            events = await follow.end()
        finally:
            await runner.cleanup()
            await store.close()
    assert refused[0] == 503 and "shutting down" in refused[1]["error"]
    assert health[0] == 503 and health[1]["status"] == "draining"
    assert events[-1]["type"] == "completion" and events[-1]["status"] == "no_changes"  # it finished, not cut off


async def test_the_sandboxes_a_gone_replica_left_are_removed_those_of_its_attempts_too(pool, make_repo, tmp_path):
    repo = make_repo(BUGGY)
    made = [await pool.call("sandbox", "create_sandbox", {"repo_url": str(repo)}, 60) for _ in range(2)]
    ids = [m.structured_content["sandbox_id"] for m in made]
    path = tmp_path / "runs.sqlite3"
    dead = SQLiteRunStore(path)  # what a replica that died mid-run left: a run with two attempts' sandboxes
    await dead.open()
    await dead.create("run_left", str(repo), "Fix it", "team")
    events = EventLog("run_left")
    await dead.append(events("run", repo=str(repo)), events("sandbox", sandbox_id=ids[0]),
                      events("status", stage="attempts", message="2 coders at once", sandbox_ids=ids))
    await dead.close()
    store = SQLiteRunStore(path)
    await store.open()
    async with stack(pool, []) as s:
        assert await RunManager(s.services, store).recover() == ["run_left"]
        async with asyncio.timeout(30):
            while not all([(await pool.call("sandbox", "exec", {"sandbox_id": i, "command": "true"}, 60)).is_error
                           for i in ids]):
                await asyncio.sleep(0.05)
    await store.close()


async def test_a_run_store_another_program_holds_is_a_503_saying_so_and_reads_go_on(pool, make_repo, tmp_path):
    path = tmp_path / "runs.sqlite3"
    store = SQLiteRunStore(path)
    await store.open()
    body = {"repoUrl": str(make_repo(BUGGY)), "prompt": "Check add()", "mode": "single"}
    async with stack(pool, [turn(text("Nothing to change."))]) as s, serve(s.services, store) as url:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another program writing, for longer than the store waits
        try:
            held = await post_code(url, body)
            async with aiohttp.ClientSession() as http, http.get(f"{url}/runs") as resp:
                listed = resp.status
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        freed = await post_code(url, body)
    assert held[0] == 503 and "database is locked" in held[1]["error"] and "no other program holds" in held[1]["error"]
    assert listed == 200 and freed[0] == 200 and freed[1][-1]["status"] == "no_changes"
