"""The sandbox server's speed targets, each measured against its baseline in the same run.

- `exec("true")` over MCP stdio within 1.5x of a bare bubblewrap spawn of `true` with the backend's own arguments;
- `read_file` of a small file under 1 ms median on the server side (the stdio round trip is printed beside it);
- `create_sandbox` of a local 1 000-file repository under 200 ms median (`git clone --no-hardlinks` beside it);
- `search`, for reference: ripgrep in the jail against ripgrep started on the host, as it ran before.

The cases of one benchmark run interleaved, in an order that rotates every round, so a noisy neighbour slows them
alike and the ratios stay meaningful on a busy two-core machine. """

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.server.mcpserver import MCPServer

from servers.sandbox import files
from servers.sandbox.clone import GIT_ENV
from servers.sandbox.host import HostSandbox
from servers.sandbox.manager import SandboxManager, Settings
from servers.sandbox.server import build_server

ROOT = Path(__file__).resolve().parents[1]
REPO_FILES = 1000
SMALL_FILE = "pkg00/mod000.py"
EXEC_ROUNDS = 100
READ_ROUNDS = 300
SEARCH_ROUNDS = 60
SEARCH_PATTERN = r"return 99\d\b"
CREATE_ROUNDS = 10
WARMUP_ROUNDS = 3
EXEC_TARGET_RATIO = 1.5
READ_TARGET_S = 0.001
CREATE_TARGET_S = 0.200
LABEL_WIDTH = 40


@dataclass
class Timings:
    samples: list[float]  # seconds

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p90(self) -> float:
        return statistics.quantiles(self.samples, n=10, method="inclusive")[-1]


@dataclass
class Result:
    label: str
    ok: bool


@dataclass
class Case:
    """One thing to time; `setup` and `teardown` run around it, untimed, every round."""

    run: Callable[[Any], Awaitable[Any]]
    setup: Callable[[], Awaitable[Any]] | None = None
    teardown: Callable[[Any], Awaitable[None]] | None = None


async def race(cases: dict[str, Case], rounds: int, warmup: int = WARMUP_ROUNDS) -> dict[str, Timings]:
    """Time every case once per round, starting each round one case further along; drop the warm-up rounds."""
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            case = cases[name]
            arg = await case.setup() if case.setup else None
            start = time.perf_counter()
            out = await case.run(arg)
            elapsed = time.perf_counter() - start
            if case.teardown:
                await case.teardown(out)
            if i >= warmup:
                samples[name].append(elapsed)
    return {name: Timings(s) for name, s in samples.items()}


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.3f} ms" if value < 1 else f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"


def figure(label: str, t: Timings) -> str:
    return f"{label:<{LABEL_WIDTH}} median {ms(t.median):>9}  p90 {ms(t.p90):>9}"


def headline(label: str, t: Timings, base_label: str, base: Timings, target: str, ok: bool) -> Result:
    print(f"{figure(label, t)} | {base_label} {ms(base.median)} -> ratio {t.median / base.median:.2f}x "
          f"({target}) {'OK' if ok else 'MISSED'}")
    return Result(label, ok)


async def spawn(argv: list[str], **kwargs: Any) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL, **kwargs)
    if await proc.wait() != 0:
        raise RuntimeError(f"{argv[0]} exited with {proc.returncode}")


async def call(client: Client | MCPServer, tool: str, **arguments: Any) -> Any:
    """A tool's structured result; a failed call ends the benchmark, since its timing would mean nothing."""
    result = await client.call_tool(tool, arguments)
    if result.is_error:
        raise RuntimeError(f"{tool} failed: {result.content[0].text if result.content else ''}")
    data = result.structured_content
    return data["result"] if isinstance(data, dict) and set(data) == {"result"} else data


def make_repo(path: Path, count: int = REPO_FILES) -> Path:
    """A committed repository of `count` small Python files spread over directories of 50."""
    env = GIT_ENV | {"GIT_AUTHOR_NAME": "Bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
                     "GIT_COMMITTER_NAME": "Bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}
    for i in range(count):
        f = path / f"pkg{i // 50:02}" / f"mod{i % 50:03}.py"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f'"""Module {i}."""\n\n\ndef value_{i}() -> int:\n    return {i}\n')
    # Packed at the end, as is any repository that was itself cloned or garbage-collected.
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "initial"], ["repack", "-adq"]):
        subprocess.run(["git", *args], cwd=path, env=env, check=True, capture_output=True)
    return path


@asynccontextmanager
async def stdio_server(root: Path) -> AsyncIterator[Client]:
    """The sandbox server as mcp.json starts it, with its logs kept off the benchmark's output."""
    params = StdioServerParameters(command=sys.executable, args=["-m", "servers.sandbox"], cwd=str(ROOT),
                                   env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
                                        "SANDBOX_BACKEND": "local", "SANDBOX_ROOT": str(root)})
    with tempfile.TemporaryFile("w+") as errlog:
        try:
            async with Client(stdio_client(params, errlog=errlog)) as client:
                yield client
        except BaseException:
            errlog.seek(0)
            print(f"the end of the stdio sandbox server's log:\n{errlog.read()[-3000:]}", file=sys.stderr)
            raise


def bare_bwrap_argv(sandbox: HostSandbox) -> list[str]:
    """The backend's own argv for `true`, up to and including bubblewrap's `--`, then `true` alone."""
    argv = sandbox.jail_argv(0, ".")[0]
    return argv[: argv.index("--") + 1] + ["true"]


async def bench_exec(stdio: Client, manager: SandboxManager, repo: Path) -> Result:
    sandbox_id = (await call(stdio, "create_sandbox", repo_url=str(repo)))["sandbox_id"]
    local = manager.get((await manager.create(str(repo), None)).sandbox_id)
    assert isinstance(local, HostSandbox)
    # The baseline starts bubblewrap as the backend does (as the sandbox's user, with its environment and session),
    # but outside any control group, so the ratio includes what joining the sandbox's group costs.
    prefix = local.spawn_prefix()
    bare = prefix[len(local.cgroup.join_argv()) if local.cgroup else 0:] + bare_bwrap_argv(local)
    t = await race({
        "mcp": Case(lambda _: call(stdio, "exec", sandbox_id=sandbox_id, command="true")),
        "bare": Case(lambda _: spawn(bare, env=local.env, start_new_session=True)),
    }, EXEC_ROUNDS)
    ratio = t["mcp"].median / t["bare"].median
    return headline("exec true via MCP stdio", t["mcp"], "bare bwrap true", t["bare"],
                    f"target <= {EXEC_TARGET_RATIO}x", ratio <= EXEC_TARGET_RATIO)


async def bench_read_file(stdio: Client, repo: Path, root: Path) -> list[Result]:
    server = build_server(Settings(backend="local", root=root))
    async with Client(server) as inproc:
        stdio_id, inproc_id = [(await call(c, "create_sandbox", repo_url=str(repo)))["sandbox_id"]
                               for c in (stdio, inproc)]
        args = {"path": SMALL_FILE}
        t = await race({
            "server": Case(lambda _: server.call_tool("read_file", {"sandbox_id": inproc_id, **args})),
            "inproc": Case(lambda _: call(inproc, "read_file", sandbox_id=inproc_id, **args)),
            "stdio": Case(lambda _: call(stdio, "read_file", sandbox_id=stdio_id, **args)),
            "direct": Case(lambda _: _read_direct(repo)),
        }, READ_ROUNDS)
    base = "files.read_text"
    return [
        headline("read_file, server side", t["server"], base, t["direct"], "target < 1 ms",
                 t["server"].median < READ_TARGET_S),
        headline("read_file via MCP client in process", t["inproc"], base, t["direct"], "for reference", True),
        headline("read_file via MCP stdio (round trip)", t["stdio"], base, t["direct"], "for reference", True),
    ]


async def bench_search(stdio: Client, repo: Path) -> Result:
    sandbox_id = (await call(stdio, "create_sandbox", repo_url=str(repo)))["sandbox_id"]
    rg = ["rg", "--no-config", "--hidden", "--line-number", "--null", "-e", SEARCH_PATTERN, "--", "."]
    t = await race({
        "mcp": Case(lambda _: call(stdio, "search", sandbox_id=sandbox_id, pattern=SEARCH_PATTERN)),
        "host": Case(lambda _: spawn(rg, cwd=repo)),
    }, SEARCH_ROUNDS)
    return headline("search via MCP stdio, in the jail", t["mcp"], "rg on the host", t["host"],
                    "for reference: the jail's start is the difference", True)


async def bench_create(stdio: Client, repo: Path, roots: dict[str, Path]) -> list[Result]:
    results = []
    for where, root in roots.items():
        scratch = Path(tempfile.mkdtemp(dir=root))

        async def git_clone(_: object) -> Path:
            dest = scratch / f"clone-{time.perf_counter_ns()}"
            await spawn(["git", "clone", "--quiet", "--no-hardlinks", "--", str(repo), str(dest)], env=GIT_ENV)
            return dest

        async def remove(dest: Path) -> None:
            await asyncio.to_thread(shutil.rmtree, dest)

        async with stdio_server(root) as client:
            async def destroy(sandbox_id: str) -> None:
                await call(client, "destroy_sandbox", sandbox_id=sandbox_id)

            t = await race({
                "mcp": Case(lambda _: _created(client, repo), teardown=destroy),
                "git": Case(git_clone, teardown=remove),
            }, CREATE_ROUNDS)
        shutil.rmtree(scratch, ignore_errors=True)
        results.append(headline(f"create_sandbox 1000 files ({where})", t["mcp"], "git clone --no-hardlinks",
                                t["git"], "target < 200 ms", t["mcp"].median < CREATE_TARGET_S))
    return results


async def _read_direct(repo: Path) -> str:
    return files.read_text(repo, SMALL_FILE, 1, 2000)


async def _created(client: Client, repo: Path) -> str:
    return (await call(client, "create_sandbox", repo_url=str(repo)))["sandbox_id"]


def sandbox_root(parent: str | None) -> Path:
    root = Path(tempfile.mkdtemp(prefix="tb-bench-", dir=parent))
    root.chmod(0o711)
    return root


async def main() -> list[Result]:
    logging.disable(logging.INFO)
    disk = sandbox_root(None)
    roots = {"disk": disk}
    if Path("/dev/shm").is_dir():
        roots["tmpfs"] = sandbox_root("/dev/shm")
    source = Path(tempfile.mkdtemp(prefix="tb-bench-repo-"))
    started = time.perf_counter()
    print(f"sandbox benchmarks: bubblewrap backend, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; medians and p90s of interleaved rounds")
    try:
        repo = make_repo(source)
        manager = SandboxManager(Settings(backend="local", root=disk))
        async with stdio_server(disk) as stdio:
            results = [await bench_exec(stdio, manager, repo), *await bench_read_file(stdio, repo, disk),
                       await bench_search(stdio, repo)]
        await manager.destroy_all()
        results += await bench_create(stdio, repo, roots)
    finally:
        for path in (source, *roots.values()):
            shutil.rmtree(path, ignore_errors=True)
    print(f"(total {time.perf_counter() - started:.0f} s)")
    return results
