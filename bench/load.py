"""A bounded load test of the service: loopback only, scripted model, and it stops by itself within 150 s.

- 50 runs at once, the service's cap (TB_MAX_RUNS=50), each a short single-agent run (read_file and an exec that
  sleeps in its sandbox, then an answer), so all 50 are in flight together; every one must complete;
- while they are, 200 more `POST /code`: each must be refused with 503 at once (p99 under 100 ms);
- then a rate-limited service (TB_RATE_BURST=5, TB_RATE_PER_MINUTE=1) gets 100 requests: the first 5 run to their
  end, the other 95 are refused with 429, as quickly;
- then the first two again on two replicas sharing one PostgreSQL database (a cluster started for it; the replicas
  share this process and the MCP servers), runs and requests spread over both: the cap holds across them, every
  admitted run completes, each is followed to the same end from the replica that does not run it, and the figures
  are printed beside the single replica's on SQLite;
- memory stays bounded: this process (the service, and beside it the fake API and the clients) and both MCP servers
  are sampled before the load, at its peak and after it;
- nothing leaks: no sandbox folder, no process running as a sandbox uid, no process carrying the runs' sleep marker,
  no MCP server left once the pool is closed.

The exec also starts a detached background sleep, which outlives its command unless the sandbox kills it, so the
process-leak count means something. The fake Messages API must see exactly the model calls of the admitted runs:
a refused request that had started a run would leave it short of steps and fail the benchmark.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import secrets
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic

from orchestrator.config import Settings
from orchestrator.model import AnthropicModel
from orchestrator.runs import RunManager
from servers.sandbox.manager import Settings as SandboxSettings
from tests import postgres
from tests.fakes.messages_api import Turn, messages_api, text, tool_use, turn

from . import orchestrator as bench_orchestrator
from .orchestrator import API_KEY, Bench, mcp_servers, replica, request
from .sandbox import LABEL_WIDTH, SMALL_FILE, Result, make_repo, ms, sandbox_root

CAP = 50  # TB_MAX_RUNS: runs in flight in all
OVER_CAP = 200  # requests sent while the 50 are in flight
RATE_BURST, RATE_REQUESTS = 5, 100  # the rate-limited phase: a burst of 5, then 429s
SENDERS = 10  # refused requests in flight at once: a burst, without timing the client's own queue
DETACHED_S = 60  # the background sleep each exec leaves: it outlives the run unless the sandbox kills it
HOLD_S = 3  # each loaded run's exec sleeps this long in its sandbox, so that the 50 overlap
REFUSAL_TARGET_S = 0.100  # "quickly": p99 of a refusal, under load
# This process holds the service, the fake API and 50 clients; its growth after the load, over a baseline taken
# after one warm-up run, may be 2 MB per admitted run (2 * CAP + RATE_BURST, so 210 MB): the events, transcripts and
# SQLite pages of a short run are a few hundred kB, so a run kept in memory after it ended shows up well within it.
ORCHESTRATOR_BOUND_KB = 2048 * (2 * CAP + RATE_BURST)
SERVER_BOUND_KB = 100 * 1024  # each MCP server's growth after the load (50 sandboxes at once, then none)
DEADLINE_S = 150
LEAK_GRACE_S = 5.0  # for the clean-up under way when the load ends (only after a failure: it is done by then)
TURNS = 2  # model calls per run: read_file + exec, then the answer
LOAD = re.compile(r"Request:\nload (\d+)")


@dataclass
class LoadModel:
    """`load N`: read a file and run a command that sleeps N.marker seconds (N=0: under a second) beside a detached
    background sleep; then answer. Answered from the request itself, so concurrent runs never take each other's
    steps."""

    marker: str  # digits, unique to this benchmark: in the argv of every sleep it starts

    def command(self, seconds: int) -> str:
        return f"(sleep {DETACHED_S}.{self.marker} &); sleep {seconds}.{self.marker}"

    def __call__(self, body: dict[str, Any]) -> Turn:
        messages = body["messages"]
        brief = messages[0]["content"]
        seconds = int(LOAD.search(brief if isinstance(brief, str) else brief[0]["text"]).group(1))
        if len(messages) == 1:
            return turn(text("Reading the module, then running the check."),
                        tool_use("sandbox_read_file", {"path": SMALL_FILE}),
                        tool_use("sandbox_exec", {"command": self.command(seconds)}))
        return turn(text("Checked; nothing to change."))


@asynccontextmanager
async def load_service(b: Bench, model: LoadModel, runs: int, limits: dict[str, str], replicas: int = 1
                       ) -> AsyncIterator[list[tuple[str, RunManager]]]:
    """The service as `python -m orchestrator` runs it with these admission limits (and TB_DATABASE_URL, for
    replicas that share it), over exactly `runs` runs' model calls; each replica's URL and runs. Replicas here share
    this process and its MCP servers (bench.orchestrator.service fixes its limits, so this one sets its own)."""
    async with messages_api([model] * (TURNS * runs)) as api, AsyncExitStack() as stack:
        settings = Settings.from_env({"TB_MODEL": "claude-sonnet-bench", "TB_DATA_DIR": tempfile.mkdtemp(dir=b.scratch),
                                      **limits})
        client = anthropic.AsyncAnthropic(base_url=api.url, api_key=API_KEY)
        stack.push_async_callback(client.close)
        model_client = AnthropicModel(client, settings.model, settings.limits.max_output_tokens)
        yield [await stack.enter_async_context(replica(settings, b.pool, model_client)) for _ in range(replicas)]


def ending(raw: str) -> str:
    """How a run's event stream ended: its completion status, or what came instead."""
    last = json.loads(raw.rsplit("data: ", 1)[-1])
    return last.get("status", "?") if last.get("type") == "completion" else f"no completion ({last.get('type')})"


async def admitted(b: Bench, url: str, prompt: str) -> aiohttp.ClientResponse:
    resp = await b.http.post(url + "/code", json=request(b, prompt))
    if resp.status != 200:
        body = await resp.text()
        resp.release()
        raise RuntimeError(f"a run within the limits was refused: {resp.status} {body}")
    return resp


async def to_the_end(resp: aiohttp.ClientResponse) -> tuple[str, float]:
    start = time.perf_counter()
    async with resp:
        raw = await resp.text()
    return ending(raw), time.perf_counter() - start


async def refusals(b: Bench, urls: list[str], count: int) -> tuple[list[float], Counter[int]]:
    """`count` requests to the replicas at `urls` in turn, SENDERS at a time; each one's time from sending to its
    whole answer, and the statuses."""
    gate = asyncio.Semaphore(SENDERS)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()

    async def one(url: str) -> None:
        async with gate:
            start = time.perf_counter()
            # Cancelled on disconnect: a request let through by mistake must not go on to call the model.
            async with b.http.post(url + "/code", json={**request(b, "load 0"), "on_disconnect": "cancel"}) as resp:
                if resp.status == 200:
                    resp.close()
                else:
                    await resp.read()
                latencies.append(time.perf_counter() - start)
                statuses[resp.status] += 1

    await asyncio.gather(*(one(urls[i % len(urls)]) for i in range(count)))
    return latencies, statuses


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[-1]


def line(label: str, figures: str, target: str, ok: bool) -> Result:
    print(f"{label:<{LABEL_WIDTH}} {figures} | {target} {'OK' if ok else 'MISSED'}")
    return Result(label, ok)


# --- processes, memory and leaks, from /proc ---

def status_of(pid: int | str) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: v.strip() for k, _, v in (row.partition(":") for row in f)}
    except OSError:
        return {}


def rss_kb(pid: int | str = "self") -> int:
    return int(status_of(pid).get("VmRSS", "0 kB").split()[0])


def cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def pids() -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit()]


def mcp_pids() -> dict[str, int]:
    """Our own MCP servers: children of this process started as `python -m servers.<name>`."""
    found = {}
    for pid in pids():
        if status_of(pid).get("PPid") == str(os.getpid()):
            for name in ("sandbox", "github"):
                if f"servers.{name}".encode() in cmdline(pid).split(b"\0"):
                    found[name] = int(pid)
    return found


def sandbox_uid_pids(uid_base: int) -> list[int]:
    """Live processes whose real uid is a sandbox's (the server gives each sandbox a uid from uid_base up)."""
    out = []
    for pid in pids():
        st = status_of(pid)
        if "Uid" in st and int(st["Uid"].split()[0]) >= uid_base and not st.get("State", "").startswith("Z"):
            out.append(int(pid))
    return out


def marked_pids(marker: str) -> list[int]:
    return [int(p) for p in pids() if int(p) != os.getpid() and marker.encode() in cmdline(p)]


@dataclass
class Memory:
    """RSS in kB of this process and each MCP server: at a moment, and the highest seen by the sampler."""

    servers: dict[str, int]
    marker: str
    peak: dict[str, int] = field(default_factory=dict)
    detached: int = 0  # the most background sleeps seen alive at once: proof the leak count can see them

    def now(self) -> dict[str, int]:
        return {"orchestrator": rss_kb(), **{name: rss_kb(pid) for name, pid in self.servers.items()}}

    async def sample(self, every_s: float = 0.05) -> None:
        background = f"sleep\0{DETACHED_S}.{self.marker}".encode()
        for i in itertools.count():
            for name, kb in self.now().items():
                self.peak[name] = max(self.peak.get(name, 0), kb)
            if i % 4 == 0:
                self.detached = max(self.detached, sum(cmdline(p).startswith(background) for p in pids()))
            await asyncio.sleep(every_s)


def mb(kb: int) -> str:
    return f"{kb / 1024:.1f} MB"


# --- the phases ---

async def phase_cap(b: Bench, model: LoadModel, results: list[Result], store: str = "",
                    replicas: int = 1) -> dict[str, str]:
    """CAP runs at once, spread over the replicas, then OVER_CAP more refused; the figures, for the comparison."""
    limits = {"TB_MAX_RUNS": str(CAP), "TB_MAX_RUNS_PER_CLIENT": str(CAP + OVER_CAP + 1),
              "TB_RATE_BURST": "1000", "TB_RATE_PER_MINUTE": "60", **({"TB_DATABASE_URL": store} if store else {})}
    where = f" on {replicas} replicas, PostgreSQL" if store else ""
    async with load_service(b, model, CAP, limits, replicas) as services:
        urls = [url for url, _ in services]
        started = time.perf_counter()
        responses = await asyncio.gather(*(admitted(b, urls[i % replicas], f"load {HOLD_S}") for i in range(CAP)))
        admitted_s = time.perf_counter() - started
        latencies, statuses = await refusals(b, urls, OVER_CAP)
        held = sum(len(manager.live) for _, manager in services)  # all still in flight after the last refusal
        # With replicas, each run is also followed from a replica that does not run it (the store's notifications).
        elsewhere = ([asyncio.create_task(follow_elsewhere(b, services, run_id)) for run_id in in_flight(services)]
                     if replicas > 1 else [])
        endings = await asyncio.gather(*(to_the_end(r) for r in responses))
        total_s = time.perf_counter() - started
        # Reported here, before the fake Messages API checks at its exit that it served exactly these runs.
        outcomes = Counter(status for status, _ in endings)
        complete = outcomes["no_changes"] + outcomes["success"]
        durations = [seconds for _, seconds in endings]
        print(f"  {CAP} runs admitted{where} in {ms(admitted_s)}; {held} still in flight after the {OVER_CAP} "
              f"refusals; all ended within {total_s:.1f} s (each holds its sandbox {HOLD_S} s): {dict(outcomes)}")
        figures = {"runs": f"{complete}/{CAP}, after admission median {ms(statistics.median(durations))}  max "
                           f"{ms(max(durations))}",
                   "refusals": f"median {ms(statistics.median(latencies)):>9}  p99 {ms(p99(latencies)):>9}  "
                               f"{dict(statuses)}"}
        results.append(line(f"{CAP} concurrent runs complete{where}", figures["runs"],
                            "all success or no_changes, all in flight at once", complete == CAP and held == CAP))
        results.append(line(f"{OVER_CAP} over TB_MAX_RUNS refused{where}", figures["refusals"],
                            f"all 503, p99 < {ms(REFUSAL_TARGET_S)}",
                            statuses == Counter({503: OVER_CAP}) and p99(latencies) < REFUSAL_TARGET_S))
        if elsewhere:
            seen = Counter(await asyncio.gather(*elsewhere))
            results.append(line(f"{CAP} runs followed from the other replica", f"{dict(seen)}",
                                "each to the end it had where it ran", seen == outcomes))
        return figures


def in_flight(services: list[tuple[str, RunManager]]) -> list[str]:
    """The runs in flight on every replica."""
    return [run_id for _, manager in services for run_id in manager.live]


async def follow_elsewhere(b: Bench, services: list[tuple[str, RunManager]], run_id: str) -> str:
    """How a run ends, read from a replica that does not run it."""
    url = next(url for url, manager in services if run_id not in manager.live)
    async with b.http.get(f"{url}/runs/{run_id}/events") as resp:
        return ending(await resp.text())


async def phase_replicas(b: Bench, model: LoadModel, results: list[Result], single: dict[str, str]) -> None:
    """The cap phase again on two replicas sharing one PostgreSQL database (a cluster of its own, started here), its
    figures beside the single replica's on SQLite: the cap holds across both, every admitted run completes."""
    try:
        with postgres.cluster() as base:
            store = postgres.new_database(base)
            figures = await phase_cap(b, model, results, store, replicas=2)
    except RuntimeError as exc:  # no PostgreSQL here: say so, as a missed target
        results.append(line("2 replicas on PostgreSQL", str(exc)[:100], "a cluster to run on", False))
        return
    for name, label in (("runs", "runs complete"), ("refusals", "refused over the cap")):
        print(f"  {label:<22} 1 replica, SQLite: {single[name]}\n  {'':<22} 2 replicas, PostgreSQL: {figures[name]}")


async def phase_rate(b: Bench, model: LoadModel, results: list[Result]) -> None:
    limits = {"TB_MAX_RUNS": str(CAP), "TB_MAX_RUNS_PER_CLIENT": str(CAP),
              "TB_RATE_BURST": str(RATE_BURST), "TB_RATE_PER_MINUTE": "1"}
    async with load_service(b, model, RATE_BURST, limits) as [(url, _)]:
        responses = [await admitted(b, url, "load 0") for _ in range(RATE_BURST)]
        latencies, statuses = await refusals(b, [url], RATE_REQUESTS - RATE_BURST)
        endings = await asyncio.gather(*(to_the_end(r) for r in responses))
        complete = sum(status in ("success", "no_changes") for status, _ in endings)
        results.append(line(f"{RATE_REQUESTS} at TB_RATE_BURST={RATE_BURST}",
                            f"median {ms(statistics.median(latencies)):>9}  p99 {ms(p99(latencies)):>9}  "
                            f"{complete} ran, {dict(statuses)}",
                            f"{RATE_BURST} complete, the rest 429 with p99 < {ms(REFUSAL_TARGET_S)}",
                            complete == RATE_BURST and statuses == Counter({429: RATE_REQUESTS - RATE_BURST})
                            and p99(latencies) < REFUSAL_TARGET_S))


@contextmanager
def sandbox_server_env(extra: dict[str, str]) -> Iterator[None]:
    """bench.orchestrator.mcp_servers with these variables added to the sandbox server's environment: 50 runs at
    once need SANDBOX_MAX above its default of 32, as an operator raising TB_MAX_RUNS to 50 would set it, and volumes
    that fit the disk 50 times."""
    real = bench_orchestrator.load_config

    def load_config(*args: Any, **kwargs: Any) -> list[Any]:
        specs = real(*args, **kwargs)
        for spec in specs:
            if spec.name == "sandbox":
                spec.target.env.update(extra)
        return specs

    bench_orchestrator.load_config = load_config
    try:
        yield
    finally:
        bench_orchestrator.load_config = real


@dataclass
class Load:
    root: Path
    scratch: Path
    model: LoadModel
    uid_base: int
    earlier: set[int]  # processes already running as a sandbox uid before the load: not ours
    servers: dict[str, int] = field(default_factory=dict)  # name -> pid of our MCP servers
    results: list[Result] = field(default_factory=list)  # kept as they come, so a failure keeps those before it


async def load(run: Load) -> None:
    repo = make_repo(run.scratch / "repo", 20)
    async with AsyncExitStack() as stack:
        # Each sandbox reserves its volume (SANDBOX_DISK_MIB) on the disk: 50 at the default 2 GiB need 100 GiB free;
        # these short runs write a few kB.
        with sandbox_server_env({"SANDBOX_MAX": str(CAP + RATE_BURST), "SANDBOX_DISK_MIB": "256"}):
            pool = await stack.enter_async_context(mcp_servers(run.root, run.scratch))
        http = await stack.enter_async_context(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        b = Bench(pool, http, repo, run.scratch)
        run.servers.update(mcp_pids())
        memory = Memory(dict(run.servers), run.model.marker)
        async with load_service(b, run.model, 1, {}) as [(url, _)]:  # warm-up: imports, connections, the store
            status, _ = await to_the_end(await admitted(b, url, "load 0"))
            if status != "no_changes":
                raise RuntimeError(f"the warm-up run ended {status}")
        before = memory.now()
        sampler = asyncio.create_task(memory.sample())
        try:
            single = await phase_cap(b, run.model, run.results)
            await phase_rate(b, run.model, run.results)
            await phase_replicas(b, run.model, run.results, single)
        finally:
            sampler.cancel()
        after = memory.now()
        print("  RSS            " + "   ".join(f"{name}: before {mb(before[name])}, peak {mb(memory.peak[name])}, "
                                               f"after {mb(after[name])}" for name in before))
        print(f"  up to {memory.detached} detached background sleeps were alive at once during the load")
        grown = {name: after[name] - before[name] for name in before}
        bounded = grown["orchestrator"] < ORCHESTRATOR_BOUND_KB and \
            all(kb < SERVER_BOUND_KB for name, kb in grown.items() if name != "orchestrator")
        run.results.append(line("memory bounded", "growth " + ", ".join(f"{name} {mb(kb)}"
                                                                        for name, kb in grown.items()),
                                f"orchestrator < {mb(ORCHESTRATOR_BOUND_KB)}, each server < {mb(SERVER_BOUND_KB)}",
                                bounded))


async def leaks(run: Load) -> Result:
    """What the load left behind, once it has had LEAK_GRACE_S to go. Processes that ran as a sandbox uid before
    it began are someone else's (another test on this machine): they are counted apart, not held against it."""
    waited = time.perf_counter()
    while True:
        folders = list(run.root.glob("*/sbx-*"))
        as_sandbox = set(sandbox_uid_pids(run.uid_base)) if os.geteuid() == 0 else set()
        new = as_sandbox - run.earlier
        marked = marked_pids(run.model.marker)
        alive = [pid for pid in run.servers.values() if status_of(pid).get("State", "Z").startswith(("R", "S", "D"))]
        if not (folders or new or marked or alive) or time.perf_counter() - waited > LEAK_GRACE_S:
            break
        await asyncio.sleep(0.1)
    print(f"  after the load (+{time.perf_counter() - waited:.1f} s): {len(folders)} sandbox folders, {len(new)} new "
          f"processes as a sandbox uid (>= {run.uid_base}{'' if os.geteuid() == 0 else ': not root, none used'}; "
          f"{len(as_sandbox & run.earlier)} others', there before), {len(marked)} carrying the sleep marker, "
          f"{len(alive)} MCP servers left of {len(run.servers)}")
    return line("no sandbox or process leaks", f"{len(folders)} folders, {len(new | set(marked))} processes, "
                f"{len(alive)} servers", f"all 0 within {LEAK_GRACE_S:g} s", not (folders or new or marked or alive))


async def main() -> list[Result]:
    uid_base = SandboxSettings.from_env({}).uid_base
    # A marker that ends in 1, so that sleep's argument keeps every digit of it.
    run = Load(sandbox_root(None), sandbox_root(None), LoadModel(f"{secrets.randbelow(10**8):08d}1"), uid_base,
               set(sandbox_uid_pids(uid_base)))
    started = time.perf_counter()
    print(f"\nload: {CAP} concurrent runs, {OVER_CAP} requests over TB_MAX_RUNS, {RATE_REQUESTS} at a rate limit; "
          f"real MCP servers over stdio, scripted model, loopback; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}")
    timed_out = False
    try:
        async with asyncio.timeout(DEADLINE_S):
            await load(run)
    except TimeoutError:
        timed_out = True
        print(f"  the load was still running after {DEADLINE_S} s: stopped")
    except Exception as exc:  # noqa: BLE001 - a failed load is a missed target; the leak count still runs
        message = " ".join(part.strip()[:100] for part in str(exc).splitlines()[:3])
        run.results.append(line("load bench ran through", f"{type(exc).__name__}: {message}", "no failure", False))
    try:
        run.results.append(await leaks(run))
    finally:
        for path in (run.root, run.scratch):
            shutil.rmtree(path, ignore_errors=True)
    elapsed = time.perf_counter() - started
    run.results.append(line("load bench stops by itself", f"{elapsed:.0f} s", f"within {DEADLINE_S} s",
                            not timed_out and elapsed < DEADLINE_S))
    return run.results
