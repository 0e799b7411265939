"""Hostile clients against the real service over HTTP: a web page in another origin, a DNS-rebinding page, slow and
idle sockets by the hundred, malformed headers and bodies, a model that writes terminal escapes."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.fakes.messages_api import messages_api, text, tool_use, turn

from .conftest import API_KEY, ROOT, free_port, post_code, stack
from .test_cli import cli
from .test_run import BUGGY

pytestmark = pytest.mark.asyncio(loop_scope="session")
TOKEN = "tb-hostile-test-token-" + "z" * 24
ESCAPES = "\x1b]0;owned\x07sandbox_exec\x1b[2J\x9b31m\u202e"
NOTHING = [turn(text("Nothing to change."))]


async def call(method: str, url: str, **kwargs) -> tuple[int, dict, str]:
    """One request with whatever headers and body a hostile client chooses: (status, headers, text)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.request(method, url, **kwargs) as resp:
            return resp.status, dict(resp.headers), await resp.text()


async def until_closed(reader: asyncio.StreamReader) -> None:
    """Read until the other end closes (a reset too: it closed with our unread bytes in its buffer)."""
    try:
        while await reader.read(65536):
            pass
    except ConnectionResetError:
        pass


def run_body(repo: Path) -> str:
    return json.dumps({"repoUrl": str(repo), "prompt": "Delete everything", "mode": "single"})


async def runs_listed(url: str) -> list:
    return json.loads((await call("GET", url + "/runs"))[2])["runs"]


async def test_a_page_in_another_origin_cannot_start_a_run(pool, make_repo):
    repo = make_repo(BUGGY)
    async with stack(pool, NOTHING) as s:
        # A form or a no-cors fetch: text/plain needs no preflight, and the browser adds the page's Origin.
        cross = await call("POST", s.url + "/code", data=run_body(repo),
                           headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
        # An older browser, or a page that strips Origin: the body type alone must not be a simple one.
        plain = await call("POST", s.url + "/code", data=run_body(repo), headers={"Content-Type": "text/plain"})
        form = await call("POST", s.url + "/code", data={"repoUrl": str(repo), "prompt": "x"})
        # A sandboxed frame or a file:// page sends Origin: null, which is no one's.
        opaque = await call("POST", s.url + "/code", data=run_body(repo),
                            headers={"Content-Type": "application/json", "Origin": "null"})
        assert await runs_listed(s.url) == []
        own = await call("POST", s.url + "/code", data=run_body(repo),
                         headers={"Content-Type": "application/json", "Origin": s.url})
    for status, _, answer in (cross, opaque):
        assert status == 403 and "TB_ALLOWED_ORIGINS" in json.loads(answer)["error"]
    for status, _, answer in (plain, form):
        assert status == 415 and "Content-Type: application/json" in json.loads(answer)["error"]
    assert own[0] == 200 and '"status":"no_changes"' in own[2]


async def test_a_dns_rebinding_page_cannot_read_runs_or_events(pool, make_repo):
    async with stack(pool, NOTHING) as s:
        port = s.url.rsplit(":", 1)[1]
        _, events, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Go", "mode": "single"})
        run_id = events[0]["run_id"]
        # The attacker's name now resolves to 127.0.0.1; the browser sends it as Host, and no Origin (same origin).
        rebound = {"Host": f"evil.example:{port}"}
        answers = [await call(method, s.url + path, headers=rebound, **extra) for method, path, extra in [
            ("GET", "/runs", {}), ("GET", f"/runs/{run_id}", {}), ("GET", f"/runs/{run_id}/events", {}),
            ("GET", "/health", {}), ("POST", "/code", {"json": {"repoUrl": "/", "prompt": "x"}})]]
        loopback = [await call("GET", s.url + "/runs", headers={"Host": host})
                    for host in (f"localhost:{port}", f"[::1]:{port}", "127.0.0.1")]
    for status, _, answer in answers:
        assert status == 421 and "TB_ALLOWED_HOSTS" in json.loads(answer)["error"] and run_id not in answer
    assert [status for status, _, _ in loopback] == [200] * 3


async def test_names_and_origins_the_operator_allows_are_served(pool):
    async with stack(pool, [], allowed_hosts=("tb.internal",), allowed_origins=("https://tb.example.com",)) as s:
        by_name = await call("GET", s.url + "/runs", headers={"Host": "tb.internal:443"})
        # Behind a proxy that terminates TLS, the page's origin is not the service's own.
        proxied = await call("POST", s.url + "/runs/run_none/cancel",
                             headers={"Host": "tb.internal", "Origin": "https://tb.example.com"})
        other = await call("GET", s.url + "/runs", headers={"Host": "tb.internal.evil.example"})
    assert by_name[0] == 200 and proxied[0] == 404 and other[0] == 421


async def test_slow_and_idle_sockets_do_not_take_the_service_down(mcp_config, make_repo, tmp_path):
    data, log, port = tmp_path / "data", tmp_path / "service.log", free_port()
    data.mkdir()
    async with messages_api(NOTHING) as api:
        env = {"PATH": os.environ["PATH"], "HOME": str(data), "ANTHROPIC_API_KEY": API_KEY,
               "ANTHROPIC_BASE_URL": api.url, "TB_DATA_DIR": str(data), "TB_MODEL": "claude-sonnet-test",
               "TB_API_TOKEN": TOKEN, "TB_CLIENT_TIMEOUT_S": "10", "TB_SHUTDOWN_GRACE_S": "1"}
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "orchestrator", "--port", str(port), "--mcp-config", str(mcp_config),
                cwd=ROOT, env=env, stdout=out, stderr=out,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
        url, held = f"http://127.0.0.1:{port}", []
        try:
            async with asyncio.timeout(60), aiohttp.ClientSession() as http:
                while True:
                    try:
                        async with http.get(url + "/health") as resp:
                            if (await resp.json())["status"] == "healthy":
                                break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.1)
            # More sockets than the service has descriptors, none of them ever finishing a request: some say
            # nothing, some stop halfway through the head, some halfway through a body (no token: before auth).
            partial = [b"", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",
                       b"POST /code HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 1000\r\n\r\n{\"repoUrl\": "]
            async with asyncio.timeout(30):
                for i in range(400):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(partial[i % 3])
                    held.append((reader, writer))
            async with asyncio.timeout(5), aiohttp.ClientSession() as http:
                async with http.get(url + "/health") as resp:
                    assert resp.status == 200
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with asyncio.timeout(60), aiohttp.ClientSession(headers=headers) as http:
                body = {"repoUrl": str(make_repo(BUGGY)), "prompt": "Go", "mode": "single"}
                async with http.post(url + "/code", json=body) as resp:
                    assert resp.status == 200 and '"status":"no_changes"' in await resp.text()
            # Nothing is held for ever: every one of those sockets is closed by the service within its bound.
            async with asyncio.timeout(30):
                for reader, _ in held:
                    await until_closed(reader)
        finally:
            for _, writer in held:
                writer.close()
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(30):
                        await proc.wait()
                finally:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
    written = log.read_text(errors="replace")
    # Each request answered gets its access-log line; the dropped connections, one line a minute.
    assert "Traceback" not in written and written.count("dropped connections") in (1, 2), written[-3000:]
    assert len(written.splitlines()) < 400 + 50, written[-3000:]


async def test_a_body_that_never_arrives_gets_408(pool):
    async with stack(pool, [], client_timeout_s=1) as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(s.url.rsplit(":", 1)[1]))
        writer.write(b"POST /code HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"repoUrl\": ")
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
    assert head.startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize("last_event_id", ["9" * 20, "9" * 5000, "-1", "1e9"])
async def test_a_last_event_id_that_is_no_event_number_gets_400(pool, make_repo, last_event_id):
    async with stack(pool, NOTHING) as s:
        _, events, _ = await post_code(s.url, {"repoUrl": str(make_repo(BUGGY)), "prompt": "Go", "mode": "single"})
        path = f"/runs/{events[0]['run_id']}/events"
        by_header = await call("GET", s.url + path, headers={"Last-Event-ID": last_event_id})
        by_query = await call("GET", s.url + path, params={"after": last_event_id})
    for status, _, answer in (by_header, by_query):
        assert status == 400 and "Last-Event-ID" in json.loads(answer)["error"]


async def test_deeply_nested_json_gets_400(pool):
    async with stack(pool, []) as s:
        for body in ("[" * 100_000 + "]" * 100_000, '{"repoUrl": ' + "[" * 100_000):
            status, _, answer = await call("POST", s.url + "/code", data=body,
                                           headers={"Content-Type": "application/json"})
            assert status == 400 and "repoUrl" in json.loads(answer)["error"]


@pytest.mark.parametrize("repo_url", ["octo/..", "octo/.", "https://github.com/octo/..", "https://github.com/o/."])
async def test_dot_and_dot_dot_are_no_repository_names(pool, repo_url):
    async with stack(pool, []) as s:
        status, _, answer = await call("POST", s.url + "/code", json={"repoUrl": repo_url, "prompt": "x"})
    assert status == 400 and "repoUrl" in json.loads(answer)["error"]


async def test_more_loopback_addresses_do_not_buy_more_runs(pool, make_repo):
    body = {"repoUrl": str(make_repo(BUGGY)), "prompt": "Go", "mode": "single"}
    answers = []
    for token in (None, TOKEN):
        async with stack(pool, NOTHING, rate_burst=1, rate_per_minute=1, api_token=token) as s:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
                connector = aiohttp.TCPConnector(local_addr=(source, 0))
                async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
                    async with http.post(s.url + "/code", json=body) as resp:
                        answers.append((resp.status, await resp.text()))
    assert [status for status, _ in answers] == [200, 429, 429] * 2
    assert "from loopback" in answers[1][1] and "from token sha256:" in answers[4][1]
    assert all(TOKEN not in answer and TOKEN[:12] not in answer for _, answer in answers)


async def test_the_cli_prints_no_terminal_escapes_the_model_chose(pool, make_repo):
    repo = make_repo(BUGGY)
    script = [turn(text("Look\x9b2J here."), tool_use(ESCAPES, {"command": "true"})), turn(text("Done."))]
    args = ["--mode", "single", "--repo", str(repo), "Fix add()"]
    async with stack(pool, script) as s:
        plain = await cli("--service", s.url, *args)
    async with stack(pool, script) as s:
        as_json = await cli("--service", s.url, "--json", *args)
    assert plain[0] == 1 and "owned" in plain[1] and "sandbox_exec" in plain[1]
    for output in (plain[1], plain[2], as_json[1]):
        assert not {"\x1b", "\x07", "\x9b", "\u202e"} & set(output), repr(output[:2000])
    names = [e["name"] for e in map(json.loads, as_json[1].splitlines()) if e["type"] == "tool_call"]
    assert names and set(names) == {ESCAPES}  # --json stays exact: the escapes are JSON-escaped, not lost
