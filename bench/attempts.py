"""What several attempts cost: one team run with N = 1, 2 and 4 attempts on a small Python repository, against a
scripted model that takes 1.5 s to answer each call, so that the model's latency dominates as it does for real.

- the run's wall-clock time (POST /code to the end of its event stream): N = 4 under 1.5x that of N = 1;
- for reference, the peak memory (VmHWM) of the service's process (which also holds the scripted model and the
  client) and of the sandbox server's process, each with its increase over its own peak once started.

Each N runs in a fresh process of its own (`python -m bench.attempts N`), with MCP servers of its own, so that a
high-water mark is that run's and no other's. All is real but the model: both MCP servers over stdio as mcp.json
starts them, the service on loopback, the `anthropic` SDK against the scripted Messages API of tests/fakes.

The script is a router that answers each request from the request itself (which agent asks, and how far along it
is), whatever order the attempts' calls arrive in: the planner reads calc.py and submits a plan whose verification
is `python3 -m unittest -q`; each coder writes the fix, runs the tests and summarises; with several attempts the
reviewer chooses attempt 1 and approves, and with one the reviewer approves. Both ways the run makes six model
calls one after another (2 + 3 + 1), 9 s of model time; the attempts add the forked sandboxes, the concurrent
coders and each attempt's own run of the verification.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anthropic

from orchestrator.config import Settings
from orchestrator.model import AnthropicModel
from servers.sandbox.clone import GIT_ENV
from tests.fakes.messages_api import Turn, messages_api, text, tool_use, turn

from .load import status_of
from .orchestrator import API_KEY, ROOT, mcp_servers, replica
from .sandbox import Result, sandbox_root

ATTEMPTS = (1, 2, 4)
LATENCY_S = 1.5  # the model's time to answer each call
SEQUENTIAL_CALLS = 6  # planner 2, coder 3, reviewer 1: the model calls of a run, one after another
TARGET_RATIO = 1.5  # N = 4 against N = 1, wall-clock
CHILD_TIMEOUT_S = 90
BUGGY = {"calc.py": "def add(a, b):\n    return a - b\n",
         "test_calc.py": "import unittest\nfrom calc import add\n\n\nclass T(unittest.TestCase):\n"
                         "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n"}
FIXED = "def add(a, b):\n    return a + b\n"
VERIFY = "python3 -m unittest -q"
PLAN = {"summary": "add() subtracts; make it add.",
        "changes": [{"file": "calc.py", "what": "return a + b", "why": "add must add"}], "verification": VERIFY}
ATTEMPT = re.compile(r"You are attempt (\d+) of (\d+)")


class Router:
    """Each agent's scripted turns, chosen from the request alone: which agent asks (its system prompt) and how
    many turns it has finished (its history), so concurrent coders never take each other's steps."""

    SCRIPTS = {
        "planner": [turn(text("Reading."), tool_use("sandbox_read_file", {"path": "calc.py"})),
                    turn(tool_use("submit_plan", PLAN))],
        "coder": [turn(tool_use("sandbox_write_file", {"path": "calc.py", "content": FIXED})),
                  turn(tool_use("sandbox_exec", {"command": VERIFY})),
                  turn(text("Changed add() to return a + b; the tests pass."))],
        "chooser": [turn(tool_use("submit_choice", {"attempt": 1, "reason": "its tests pass", "verdict": "approve",
                                                    "findings": []}))],
        "reviewer": [turn(tool_use("submit_review", {"verdict": "approve", "findings": [],
                                                     "tests_run": [{"command": VERIFY, "result": "OK"}]}))],
    }

    @staticmethod
    def agent(body: dict[str, Any]) -> str:
        system = body["system"][0]["text"] if isinstance(body["system"], list) else body["system"]
        if "You are the planner" in system:
            return "planner"
        if "several coders worked on the same plan" in system:
            return "chooser"
        if "You are the coder" in system:
            found = ATTEMPT.search(json.dumps(body["messages"][0]))
            return f"coder{found[1]}" if found else "coder"
        return "reviewer"

    def __call__(self, body: dict[str, Any]) -> Turn:
        name = self.agent(body)
        done = (len(body["messages"]) - 1) // 2  # each finished turn added an assistant message and its results
        return self.SCRIPTS[name.rstrip("0123456789")][done]

    @staticmethod
    def steps(attempts: int) -> int:
        return 2 + 3 * attempts + 1


def make_repo(path: Path) -> Path:
    env = GIT_ENV | {"GIT_AUTHOR_NAME": "Bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
                     "GIT_COMMITTER_NAME": "Bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}
    path.mkdir()
    for name, content in BUGGY.items():
        (path / name).write_text(content)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "initial"]):
        subprocess.run(["git", *args], cwd=path, env=env, check=True, capture_output=True)
    return path


def hwm_kb(pid: int | str = "self") -> int:
    """The process's peak resident memory so far (VmHWM), in kB."""
    return int(status_of(pid).get("VmHWM", "0 kB").split()[0])


def sandbox_server_pid() -> int:
    """Our sandbox server: the child of this process started as `python -m servers.sandbox`."""
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        if status_of(pid).get("PPid") == str(os.getpid()):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"servers.sandbox" in argv:
                return int(pid)
    raise RuntimeError("no sandbox server among this process's children")


@asynccontextmanager
async def service(data_dir: Path, router: Router, attempts: int, pool: Any) -> AsyncIterator[str]:
    """The service as `python -m orchestrator` runs it, over a script of exactly the run's model calls."""
    async with messages_api([router] * Router.steps(attempts), latency_s=LATENCY_S) as api:
        settings = Settings.from_env({"TB_MODEL": "claude-sonnet-bench", "TB_DATA_DIR": str(data_dir)})
        client = anthropic.AsyncAnthropic(base_url=api.url, api_key=API_KEY)
        try:
            async with replica(settings, pool, AnthropicModel(client, settings.model,
                                                              settings.limits.max_output_tokens)) as (url, _):
                yield url
        finally:
            await client.close()


def check(events: list[dict[str, Any]], attempts: int) -> None:
    """Fail the benchmark on a run that did otherwise than scripted: its timing would mean nothing."""
    last = events[-1] if events else {}
    if last.get("type") != "completion" or last.get("status") != "success":
        errors = [e for e in events if e["type"] == "error"]
        raise RuntimeError(f"the run ended with {last}, not a success; its errors: {errors}")
    coders = sum(e["type"] == "agent" and e["agent"] == "coder" and e["state"] == "start" for e in events)
    chosen = [e["attempt"] for e in events if e["type"] == "attempt_chosen"]
    if coders != attempts or chosen != ([1] if attempts > 1 else []):
        raise RuntimeError(f"expected {attempts} coder(s), and attempt 1 chosen when several: got {coders} coder(s),"
                           f" chosen {chosen}")


async def one(attempts: int) -> dict[str, Any]:
    """One team run with `attempts` attempts, in this process: its wall-clock time and the peak memories."""
    logging.disable(logging.INFO)
    root, scratch = sandbox_root(None), sandbox_root(None)
    try:
        repo = make_repo(scratch / "repo")
        async with mcp_servers(root, scratch) as pool, aiohttp.ClientSession() as http:
            server = sandbox_server_pid()
            async with service(Path(tempfile.mkdtemp(dir=scratch)), Router(), attempts, pool) as url:
                start = {"service": hwm_kb(), "sandbox": hwm_kb(server)}
                began = time.perf_counter()
                async with http.post(url + "/code", json={"repoUrl": str(repo), "prompt": "Fix add(); its test "
                                                          "fails.", "attempts": attempts}) as resp:
                    raw = await resp.text()
                seconds = time.perf_counter() - began
                peak = {"service": hwm_kb(), "sandbox": hwm_kb(server)}
                check([json.loads(line.removeprefix("data: ")) for line in raw.split("\n")
                       if line.startswith("data: ")], attempts)
    finally:
        for path in (root, scratch):
            shutil.rmtree(path, ignore_errors=True)
    return {"attempts": attempts, "seconds": seconds, "start": start, "peak": peak}


async def fresh(attempts: int) -> dict[str, Any]:
    """`one(attempts)` in a fresh process, so that its high-water marks are that run's alone."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.attempts", str(attempts), cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), CHILD_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"the run with {attempts} attempt(s) took over {CHILD_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"the run with {attempts} attempt(s) failed (exit {proc.returncode}); see above")
    return json.loads(out.decode().strip().splitlines()[-1])


def mb(kb: int) -> str:
    return f"{kb / 1024:.0f} MB"


async def main() -> list[Result]:
    started = time.perf_counter()
    print(f"\nattempts benchmarks: one team run each with N = {', '.join(map(str, ATTEMPTS))} attempts, real MCP "
          f"servers over stdio, scripted model answering in {LATENCY_S:g} s a call ({SEQUENTIAL_CALLS} calls one "
          f"after another: {SEQUENTIAL_CALLS * LATENCY_S:g} s); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; each N in a fresh process, one run")
    runs = {n: await fresh(n) for n in ATTEMPTS}
    base = runs[ATTEMPTS[0]]
    print(f"{'N':>2}  {'wall-clock':>10} {'x N=1':>6}   {'service peak (+ run)':>21} {'x N=1':>6}   "
          f"{'sandbox server peak (+ run)':>28} {'x N=1':>6}")
    for n, r in runs.items():
        grown = {k: r["peak"][k] - r["start"][k] for k in ("service", "sandbox")}
        print(f"{n:>2}  {r['seconds']:>8.2f} s {r['seconds'] / base['seconds']:>5.2f}x   "
              f"{mb(r['peak']['service']):>11} (+{mb(grown['service']):>6}) "
              f"{r['peak']['service'] / base['peak']['service']:>5.2f}x   "
              f"{mb(r['peak']['sandbox']):>18} (+{mb(grown['sandbox']):>6}) "
              f"{r['peak']['sandbox'] / base['peak']['sandbox']:>5.2f}x")
    ratio = runs[ATTEMPTS[-1]]["seconds"] / base["seconds"]
    ok = ratio < TARGET_RATIO
    print(f"N = {ATTEMPTS[-1]} against N = 1, wall-clock: ratio {ratio:.2f}x (target < {TARGET_RATIO:g}x) "
          f"{'OK' if ok else 'MISSED'}; memory for reference (VmHWM; + run: over the process's peak once started)")
    print(f"(total {time.perf_counter() - started:.0f} s)")
    return [Result(f"attempts: N = {ATTEMPTS[-1]} under {TARGET_RATIO:g}x the wall-clock of N = 1", ok)]


if __name__ == "__main__":
    print(json.dumps(asyncio.run(one(int(sys.argv[1])))))
