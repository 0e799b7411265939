"""The setup phase's speed, on the local backend through the in-process MCP server, with a sample Python project
(`requirements.txt`: tinydep, pytest) installed from a package index on loopback (tests/fakes).

- a cold setup (a venv and pip through the egress proxy, the cache emptied before each one), for reference, against
  a create of the same repository with `setup=""` (no environment at all);
- a create whose environment comes from the cache: ready in under 1 s, and under 2x the `setup=""` create;
- for reference, `python -m pytest -q` as the first and as a later command of a cached-environment sandbox, beside
  the same environment's pytest run on the host; and `exec("true")` with the environment against without one.

Every round creates what it times and destroys it afterwards, untimed. The cases interleave, as in `bench.sandbox`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mcp import Client

from servers.sandbox import volume
from servers.sandbox.manager import Settings
from servers.sandbox.server import build_server
from tests.fakes.package_index import PackageIndex
from tests.fakes.projects import python_project

from .sandbox import Case, Result, call, figure, headline, ms, race, sandbox_root, spawn

COLD_ROUNDS = 3
CACHED_ROUNDS = 15
EXEC_ROUNDS = 10
TRUE_ROUNDS = 40
CACHED_TARGET_S = 1.0
CACHED_TARGET_RATIO = 2.0
PYTEST = "python -m pytest -q"
NO_ENV = 'create, setup=""'


async def create(client: Client, repo: Path, **arguments: Any) -> dict[str, Any]:
    return await call(client, "create_sandbox", repo_url=str(repo), **arguments)


async def destroy(client: Client, info: dict[str, Any]) -> None:
    await call(client, "destroy_sandbox", sandbox_id=info["sandbox_id"])


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def expect(info: dict[str, Any], cached: bool) -> dict[str, Any]:
    """`info`, once its environment is what the case is about: a timing of anything else would mean nothing."""
    env = info["environment"] or {}
    if env.get("status") != "ready" or env.get("cached") != cached:
        raise RuntimeError(f"expected a {'cached' if cached else 'fresh'} ready environment, got {env}")
    return info


async def empty_cache(root: Path) -> None:
    """Remove every prepared environment (none is in use between rounds), so the next create sets up anew."""
    envs = root / "envs"
    await volume.unmount_under(envs)
    await asyncio.to_thread(shutil.rmtree, envs, True)


async def bench_cold(client: Client, repo: Path, root: Path) -> Result:
    async def cold(_: object) -> dict[str, Any]:
        return expect(await create(client, repo), cached=False)

    t = await race({
        "cold": Case(cold, setup=lambda: empty_cache(root), teardown=lambda info: destroy(client, info)),
        "none": Case(lambda _: create(client, repo, setup=""), teardown=lambda info: destroy(client, info)),
    }, COLD_ROUNDS, warmup=0)
    return headline("create, cold setup (cache emptied)", t["cold"], NO_ENV, t["none"],
                    f"for reference; {COLD_ROUNDS} rounds", True)


async def bench_cached(client: Client, repo: Path) -> list[Result]:
    durations: list[float] = []  # what the server says preparing took: finding, locking and mounting it

    async def cached(_: object) -> dict[str, Any]:
        info = expect(await create(client, repo), cached=True)
        durations.append(info["environment"]["duration_s"])
        return info

    # Fails early if the cache is not what the rounds assume.
    await destroy(client, expect(await create(client, repo), cached=True))
    t = await race({
        "cached": Case(cached, teardown=lambda info: destroy(client, info)),
        "none": Case(lambda _: create(client, repo, setup=""), teardown=lambda info: destroy(client, info)),
    }, CACHED_ROUNDS)
    under, ratio = t["cached"].median < CACHED_TARGET_S, t["cached"].median / t["none"].median
    within = ratio < CACHED_TARGET_RATIO
    print(f"{figure('create, environment from the cache', t['cached'])} | {NO_ENV} {ms(t['none'].median)} -> "
          f"ratio {ratio:.2f}x (target < {CACHED_TARGET_S:g} s {verdict(under)}; target < "
          f"{CACHED_TARGET_RATIO:g}x {verdict(within)})")
    print(f"{'  of which environment.duration_s':<40} median {ms(statistics.median(durations)):>9}")
    return [Result("cached create under 1 s", under), Result("cached create under 2x no environment", within)]


async def bench_exec(client: Client, repo: Path, root: Path) -> list[Result]:
    warm, bare = expect(await create(client, repo), cached=True), await create(client, repo, setup="")
    # The same environment, run straight on the host from where the cache keeps it: the jail's start is the rest.
    prepared = next((root / "envs").glob("*.json")).with_suffix("")
    host = [str(prepared / "python" / "bin" / "python"), *PYTEST.split()[1:]]

    async def pytest(info: dict[str, Any]) -> dict[str, Any]:
        result = await call(client, "exec", sandbox_id=info["sandbox_id"], command=PYTEST)
        if result["exit_code"] != 0 or "passed" not in result["stdout"]:
            raise RuntimeError(f"{PYTEST} failed in a cached environment: {result}")
        return info

    async def fresh() -> dict[str, Any]:
        return expect(await create(client, repo), cached=True)

    t = await race({
        "first": Case(pytest, setup=fresh, teardown=lambda info: destroy(client, info)),
        "again": Case(lambda _: pytest(warm)),
        "host": Case(lambda _: spawn(host, cwd=repo, env={"PATH": "/usr/bin:/bin"})),
    }, EXEC_ROUNDS)
    # Apart from the pytest runs, whose aftermath would slow whichever case came next.
    u = await race({
        "env": Case(lambda _: call(client, "exec", sandbox_id=warm["sandbox_id"], command="true")),
        "bare": Case(lambda _: call(client, "exec", sandbox_id=bare["sandbox_id"], command="true")),
    }, TRUE_ROUNDS)
    for info in (warm, bare):
        await destroy(client, info)
    base = "pytest on the host, same /env"
    return [headline(f"{PYTEST}, first command", t["first"], base, t["host"], "for reference", True),
            headline(f"{PYTEST}, a later command", t["again"], base, t["host"], "for reference", True),
            headline("exec true, environment from the cache", u["env"], "no environment", u["bare"],
                     "for reference", True)]


async def main() -> list[Result]:
    logging.disable(logging.INFO)
    root = sandbox_root(None)
    source = Path(tempfile.mkdtemp(prefix="tb-bench-env-repo-"))
    images = volume.unavailable() is None and volume.fs_type(root) != "tmpfs"
    print(f"environment benchmarks: bubblewrap backend, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}, cache {'in loop-mounted images' if images else 'in plain folders'}; "
          "medians and p90s of interleaved rounds")
    started, saved = time.perf_counter(), os.environ.get("PIP_INDEX_URL")
    try:
        with PackageIndex() as index:
            repo = python_project(source / "calc", index)
            os.environ["PIP_INDEX_URL"] = index.simple_url  # given to the setup alone, as SANDBOX_SETUP_ENV says
            server = build_server(Settings(backend="local", root=root, setup_allow=index.host_port,
                                           setup_env=("PIP_INDEX_URL",)))
            async with Client(server) as client:
                await destroy(client, await create(client, repo, setup=""))  # the server's first-use costs
                results = [await bench_cold(client, repo, root), *await bench_cached(client, repo),
                           *await bench_exec(client, repo, root)]
    finally:
        if saved is None:
            os.environ.pop("PIP_INDEX_URL", None)
        else:
            os.environ["PIP_INDEX_URL"] = saved
        await volume.unmount_under(root)
        for path in (root, source):
            shutil.rmtree(path, ignore_errors=True)
    print(f"(total {time.perf_counter() - started:.0f} s)")
    return results

