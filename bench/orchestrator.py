"""The orchestrator's speed targets, each measured against its baseline in the same run.

- the first byte of `POST /code`'s event stream within 20 ms (a one-byte aiohttp handler in this process beside it);
- the orchestration of one tool call, the agent loop plus the MCP hop, under 2 ms median (the tool's own
  server-side time beside it);
- 20 concurrent runs all complete within 2x of one run's time x 20 / 2 cores.

All is real but the model: both MCP servers over stdio as mcp.json starts them, the service on loopback, the
`anthropic` SDK against the scripted Messages API of tests/fakes. The script answers each request from the request
itself (the prompt says what to do, the transcript how far along it is), so concurrent runs never take each other's
steps, and a replayed request gets the answer the run got.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
from aiohttp import web
from mcp import Client

from orchestrator.app import build_app
from orchestrator.config import Settings
from orchestrator.mcp_pool import ToolPool, load_config
from orchestrator.model import AnthropicModel
from orchestrator.run import Services
from orchestrator.runs import RunManager
from orchestrator.store import open_store
from servers.sandbox.manager import Settings as SandboxSettings
from servers.sandbox.server import build_server
from tests.fakes.messages_api import MessagesAPI, Turn, messages_api, text, tool_use, turn

from .sandbox import SMALL_FILE, WARMUP_ROUNDS, Case, Result, Timings, call, headline, make_repo, ms, race, \
    sandbox_root

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "sk-ant-api03-" + "B" * 48
FIRST_BYTE_ROUNDS, FIRST_BYTE_TARGET_S = 30, 0.020
CALLS, OVERHEAD_ROUNDS, OVERHEAD_TARGET_S = 50, 8, 0.002
CONCURRENT, CONCURRENT_ROUNDS, CONCURRENT_TARGET_RATIO = 20, 3, 2.0
CORES = 2  # the machine: its bound is one run's time x 20 / 2
REQUEST = re.compile(r"Request:\n(read (\d+)|work)")
WORK = [turn(text("Reading the module and counting its functions."),
             tool_use("sandbox_read_file", {"path": SMALL_FILE}),
             tool_use("sandbox_exec", {"command": f"grep -c def {SMALL_FILE}"})),
        turn(tool_use("sandbox_edit_file", {"path": SMALL_FILE, "old_text": "return 0",
                                            "new_text": "return 0  # checked"})),
        turn(text("Marked the function as checked."))]


@dataclass
class ScriptedModel:
    """`read N` reads a small file N times, one call a turn; `work` reads, runs, edits and stops (the PR follows)."""

    arrivals: list[float] = field(default_factory=list)  # when each request reached the fake, in order

    def __call__(self, body: dict[str, Any]) -> Turn:
        self.arrivals.append(time.perf_counter())
        messages = body["messages"]
        brief = messages[0]["content"]
        _, reads = REQUEST.search(brief if isinstance(brief, str) else brief[0]["text"]).groups()
        done = (len(messages) - 1) // 2  # each finished turn added an assistant message and its tool results
        if reads is None:
            return WORK[done]
        return turn(tool_use("sandbox_read_file", {"path": SMALL_FILE})) if done < int(reads) else turn(text("Done."))


@dataclass
class Bench:
    """What every benchmark shares: the MCP servers, one HTTP client, the repository and a scratch folder."""

    pool: ToolPool
    http: aiohttp.ClientSession
    repo: Path
    scratch: Path


@dataclass
class Service:
    url: str
    api: MessagesAPI
    client: anthropic.AsyncAnthropic
    model: ScriptedModel


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def replica(settings: Settings, pool: ToolPool, model: Any) -> AsyncIterator[tuple[str, RunManager]]:
    """The service as `python -m orchestrator` runs it: its run store (TB_DATABASE_URL, else SQLite under
    TB_DATA_DIR), its lease taken, its app on a loopback port."""
    store = await open_store(settings)
    runs = RunManager(Services(settings, pool, model), store)
    try:
        await runs.begin()
        async with serve(build_app(runs)) as url:
            yield url, runs
    finally:
        await runs.shutdown(0)
        await store.close()


@asynccontextmanager
async def service(b: Bench, model_calls: int) -> AsyncIterator[Service]:
    """The service as `python -m orchestrator` runs it, over a script of exactly `model_calls` answers."""
    scripted = ScriptedModel()
    async with messages_api([scripted] * model_calls) as api:
        # Configured as an operator would; admission limits are lifted, since one client here starts them all.
        settings = Settings.from_env({"TB_MODEL": "claude-sonnet-bench", "TB_DATA_DIR": tempfile.mkdtemp(dir=b.scratch),
                                      "TB_MAX_RUNS": str(CONCURRENT), "TB_MAX_RUNS_PER_CLIENT": str(CONCURRENT),
                                      "TB_RATE_PER_MINUTE": "1e9", "TB_RATE_BURST": str(10**9)})
        client = anthropic.AsyncAnthropic(base_url=api.url, api_key=API_KEY)
        model = AnthropicModel(client, settings.model, settings.limits.max_output_tokens)
        async with replica(settings, b.pool, model) as (url, _):
            yield Service(url, api, client, scripted)


def completion(raw: str, status: str) -> None:
    """Fail the benchmark on a run that ended otherwise than `status`: its timing would mean nothing."""
    last = json.loads(raw.rsplit("data: ", 1)[-1])
    if last.get("type") != "completion" or last.get("status") != status:
        raise RuntimeError(f"a run ended with {last}, not {status!r}")


def request(b: Bench, prompt: str) -> dict[str, str]:
    # One agent: the targets are about the loop and its hops, which the team's roles only repeat.
    return {"repoUrl": str(b.repo), "prompt": prompt, "mode": "single"}


async def run(b: Bench, s: Service, prompt: str, status: str) -> None:
    """One whole run, read to its end as a client reads it."""
    async with b.http.post(s.url + "/code", json=request(b, prompt)) as resp:
        completion(await resp.text(), status)


async def replay(client: anthropic.AsyncAnthropic, bodies: list[dict[str, Any]]) -> None:
    """The model's share of a run: its requests sent again through the SDK alone, each stream read to its end."""
    for body in bodies:
        async with client.messages.stream(**{k: v for k, v in body.items() if k != "stream"}) as stream:
            async for _ in stream:
                pass
            await stream.get_final_message()


async def bench_first_byte(b: Bench) -> Result:
    async def one_byte(_: web.Request) -> web.Response:
        return web.Response(body=b"x")

    async def first_byte(request: Any) -> tuple[aiohttp.ClientResponse, bytes]:
        resp = await request
        return resp, await resp.content.readany()

    async def rest_of_run(out: tuple[aiohttp.ClientResponse, bytes]) -> None:
        completion((out[1] + await out[0].read()).decode(), "no_changes")

    tiny = web.Application()
    tiny.router.add_get("/", one_byte)
    async with service(b, FIRST_BYTE_ROUNDS + WARMUP_ROUNDS) as s, serve(tiny) as base:
        t = await race({
            "sse": Case(lambda _: first_byte(b.http.post(s.url + "/code", json=request(b, "read 0"))),
                        teardown=rest_of_run),
            "tiny": Case(lambda _: first_byte(b.http.get(base)), teardown=lambda out: out[0].read()),
        }, FIRST_BYTE_ROUNDS)
    return headline("POST /code to first SSE byte", t["sse"], "one-byte aiohttp GET", t["tiny"],
                    "target < 20 ms", t["sse"].median < FIRST_BYTE_TARGET_S)


async def gaps_during(s: Service, work: Awaitable[None], into: list[list[float]]) -> None:
    """Keep the times between consecutive model requests while `work` runs."""
    start = len(s.model.arrivals)
    await work
    arrivals = s.model.arrivals[start:]
    into.append([later - earlier for earlier, later in zip(arrivals, arrivals[1:])])


async def bench_tool_overhead(b: Bench) -> Result:
    """Turn by turn: a run's gap between model requests holds the model's answer, one tool call and all the
    orchestrator does around it; the gap at the same turn (same history, same size) in a replay of its requests
    through the SDK alone holds the model's share. Their difference less the tool's server-side time is the call's
    orchestration."""
    async with service(b, (CALLS + 1) * (1 + 2 * (OVERHEAD_ROUNDS + WARMUP_ROUNDS))) as s:
        await run(b, s, f"read {CALLS}", "no_changes")
        recorded = list(s.api.requests)
        gaps: dict[str, list[list[float]]] = {"run": [], "replay": []}
        # The tool's own time on a server of our own, whose sandboxes live under a root of their own.
        server = build_server(SandboxSettings(backend="local", root=sandbox_root(str(b.scratch))))
        shared = (await b.pool.call("sandbox", "create_sandbox", {"repo_url": str(b.repo)}, 60)).structured_content
        read = {"sandbox_id": shared["sandbox_id"], "path": SMALL_FILE}
        async with Client(server) as inproc:
            own = {**read, "sandbox_id": (await call(inproc, "create_sandbox", repo_url=str(b.repo)))["sandbox_id"]}

            async def repeat(tool_call: Callable[[], Awaitable[Any]]) -> None:
                for _ in range(CALLS):
                    await tool_call()

            t = await race({
                "run": Case(lambda _: gaps_during(s, run(b, s, f"read {CALLS}", "no_changes"), gaps["run"])),
                "replay": Case(lambda _: gaps_during(s, replay(s.client, recorded), gaps["replay"])),
                "tool": Case(lambda _: repeat(lambda: call(server, "read_file", **own))),
                "hop": Case(lambda _: repeat(lambda: b.pool.call("sandbox", "read_file", read, 60))),
            }, OVERHEAD_ROUNDS)
        await b.pool.call("sandbox", "destroy_sandbox", {"sandbox_id": shared["sandbox_id"]}, 60)
    tool = Timings([x / CALLS for x in t["tool"].samples])
    run_gaps, replay_gaps = ([g for one in gaps[k][WARMUP_ROUNDS:] for g in one] for k in ("run", "replay"))
    per_call = Timings([r - m - tool.median for r, m in zip(run_gaps, replay_gaps)])
    hop = t["hop"].median / CALLS - tool.median
    print(f"  per tool call = a run's gap between model requests ({ms(statistics.median(run_gaps))} median) - the "
          f"same turn's in a replay of its requests\n  through the SDK alone ({ms(statistics.median(replay_gaps))})"
          f" - read_file's server side ({ms(tool.median)}); {CALLS} turns x {OVERHEAD_ROUNDS} rounds. Whole runs "
          f"{ms(t['run'].median)},\n  replays {ms(t['replay'].median)}. Of it the MCP stdio hop alone (pool.call "
          f"read_file {ms(t['hop'].median / CALLS)} less the server side) {ms(hop)};\n  the rest, "
          f"{ms(per_call.median - hop)}, is the loop, its events and their store.")
    return headline("orchestration per tool call", per_call, "read_file server side", tool, "target < 2 ms",
                    per_call.median < OVERHEAD_TARGET_S)


async def bench_concurrency(b: Bench) -> Result:
    async with service(b, len(WORK) * (1 + CONCURRENT) * (CONCURRENT_ROUNDS + 1)) as s:
        async def many(_: object) -> None:
            await asyncio.gather(*(run(b, s, "work", "success") for _ in range(CONCURRENT)))

        t = await race({"one": Case(lambda _: run(b, s, "work", "success")), "many": Case(many)},
                       CONCURRENT_ROUNDS, warmup=1)
    print(f"  one run (read_file + exec, edit_file, answer; then branch, commit, pull request): "
          f"median {ms(t['one'].median)}")
    bound = Timings([x * CONCURRENT / CORES for x in t["one"].samples])
    return headline(f"{CONCURRENT} concurrent runs, all complete", t["many"], f"one x {CONCURRENT} / {CORES}",
                    bound, f"target <= {CONCURRENT_TARGET_RATIO:g}x",
                    t["many"].median / bound.median <= CONCURRENT_TARGET_RATIO)


@asynccontextmanager
async def mcp_servers(root: Path, folder: Path) -> AsyncIterator[ToolPool]:
    """Both servers of the repository's mcp.json, with this python, a sandbox root of our own and no pause between
    writes; their logs are kept off our output, and their tail is shown when the benchmark fails."""
    config = json.loads((ROOT / "mcp.json").read_text())
    for entry in config["mcpServers"].values():
        entry["command"] = sys.executable
        entry.setdefault("env", {})
    config["mcpServers"]["sandbox"]["env"].update({"SANDBOX_ROOT": str(root), "SANDBOX_BACKEND": "local"})
    config["mcpServers"]["github"]["env"]["GITHUB_WRITE_INTERVAL_S"] = "0"
    (folder / "mcp.json").write_text(json.dumps(config))
    pool = ToolPool(load_config(folder / "mcp.json", env={"PATH": os.environ["PATH"]}))
    with tempfile.TemporaryFile("w+") as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)  # the servers inherit our stderr as theirs
        try:
            await pool.start(wait_s=60)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        try:
            if any(c.state != "up" for c in pool.connections.values()):
                raise RuntimeError(f"the MCP servers did not start: {pool.health()}")
            yield pool
        except BaseException:
            log.seek(0)
            print(f"the end of the MCP servers' log:\n{log.read()[-3000:]}", file=sys.stderr)
            raise
        finally:
            await pool.close()


async def main() -> list[Result]:
    root = sandbox_root(None)
    scratch = sandbox_root(None)  # traversable, as a sandbox root under it must be
    started = time.perf_counter()
    print(f"\norchestrator benchmarks: real MCP servers over stdio, scripted model; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; medians and p90s of interleaved rounds")
    try:
        (scratch / "repo").mkdir()
        repo = make_repo(scratch / "repo", 20)
        async with mcp_servers(root, scratch) as pool, aiohttp.ClientSession() as http:
            b = Bench(pool, http, repo, scratch)
            results = [await bench_first_byte(b), await bench_tool_overhead(b), await bench_concurrency(b)]
    finally:
        for path in (root, scratch):
            shutil.rmtree(path, ignore_errors=True)
    print(f"(total {time.perf_counter() - started:.0f} s)")
    return results
