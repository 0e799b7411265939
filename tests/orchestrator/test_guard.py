"""What stands in front of the endpoints: authentication, rate limits, caps on runs in flight, input rules."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import pytest

from common.redact import Redactor, StreamRedactor
from tests.fakes.messages_api import text, tool_use, turn

from .conftest import ROOT, post_code, stack
from .test_run import BUGGY

pytestmark = pytest.mark.asyncio(loop_scope="session")
TOKEN = "tb-test-token-" + "x" * 40


async def request(method: str, url: str, **kwargs) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, **kwargs) as resp:
            return resp.status, dict(resp.headers), await resp.json()


async def test_every_endpoint_but_health_needs_the_bearer_token_when_one_is_set(pool, make_repo):
    async with stack(pool, [turn(text("Nothing to do."))], api_token=TOKEN) as s:
        body = {"repoUrl": str(make_repo(BUGGY)), "prompt": "Go", "mode": "single"}
        for method, path in [("POST", "/code"), ("GET", "/runs"), ("GET", "/runs/run_x"),
                             ("GET", "/runs/run_x/events"), ("POST", "/runs/run_x/cancel")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                status, resp_headers, answer = await request(method, s.url + path, json=body, headers=headers)
                assert status == 401 and "TB_API_TOKEN" in answer["error"], (method, path, headers)
                assert resp_headers["WWW-Authenticate"].startswith("Bearer")
        assert (await request("GET", s.url + "/health"))[0] == 200
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            async with http.post(s.url + "/code", json=body) as resp:
                assert resp.status == 200 and '"status":"no_changes"' in await resp.text()


async def test_a_client_starting_runs_too_fast_gets_429_with_retry_after(pool, make_repo):
    repo = make_repo(BUGGY)
    async with stack(pool, [turn(text("Nothing."))] * 2, rate_burst=2, rate_per_minute=1) as s:
        body = {"repoUrl": str(repo), "prompt": "Go", "mode": "single"}
        assert (await post_code(s.url, body))[0] == 200
        assert (await post_code(s.url, body))[0] == 200
        status, headers, answer = await request("POST", s.url + "/code", json=body)
    assert status == 429 and int(headers["Retry-After"]) >= 1 and "retry in" in answer["error"]


async def test_runs_in_flight_are_capped_per_client_and_in_all(pool, make_repo):
    body = {"repoUrl": str(make_repo(BUGGY)), "prompt": "Go", "mode": "single"}
    script = [turn(tool_use("sandbox_exec", {"command": "sleep 60"}))]
    answers = []
    for cap in ({"max_runs_per_client": 1}, {"max_runs": 1}):
        async with stack(pool, script, **cap) as s:
            async with aiohttp.ClientSession() as http:
                async with http.post(s.url + "/code", json=body) as first:
                    async with asyncio.timeout(30):
                        while b'"state":"complete"' not in await first.content.readline():
                            pass
                    answers.append(await request("POST", s.url + "/code", json=body))
                    run_id = (await request("GET", s.url + "/runs"))[2]["runs"][0]["id"]
                    await http.post(f"{s.url}/runs/{run_id}/cancel")
    (status, headers, answer), (status2, headers2, answer2) = answers
    assert status == 429 and "TB_MAX_RUNS_PER_CLIENT" in answer["error"] and "Retry-After" in headers
    assert status2 == 503 and "TB_MAX_RUNS" in answer2["error"] and "Retry-After" in headers2


@pytest.mark.parametrize("repo_url, message", [
    ("https://user:secret@github.com/o/r", "credentials"),
    ("http://github.com/o/r", "https://HOST/owner/name"),
    ("https://github.com.evil.example/o/r", "https://HOST/owner/name"),
    ("https://github.com/o/r/../../x", "https://HOST/owner/name"),
    ("https://ghe.example.com/o/r", "https://HOST/owner/name"),
    ("https://github.com:99999/o/r", "https://HOST/owner/name"),
])
async def test_repository_urls_outside_the_allowlist_are_refused(pool, repo_url, message):
    async with stack(pool, []) as s:
        code, answer, raw = await post_code(s.url, {"repoUrl": repo_url, "prompt": "x"})
    assert code == 400 and message in answer["error"] and "secret" not in raw


async def test_local_paths_are_refused_off_loopback_unless_under_a_configured_root(pool, make_repo):
    from orchestrator.intake import validate

    async with stack(pool, []) as s:
        repo = make_repo(BUGGY)
        refused = validate({"repoUrl": str(repo), "prompt": "x"}, s.services, loopback=False)
        assert refused.status == 403 and "TB_LOCAL_ROOTS" in refused.text
        s.services.settings = s.services.settings.__class__(**{**vars(s.services.settings),
                                                               "local_roots": (repo.parent,)})
        assert validate({"repoUrl": str(repo), "prompt": "x"}, s.services, loopback=False).repo_url == str(repo)


async def test_the_service_refuses_to_listen_off_loopback_without_a_token():
    out = subprocess.run([sys.executable, "-m", "orchestrator", "--host", "0.0.0.0", "--port", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode != 0 and "TB_API_TOKEN" in out.stderr


async def test_a_port_that_is_no_port_is_one_line_saying_so_and_exit_code_2():
    out = subprocess.run([sys.executable, "-m", "orchestrator", "--port", "99999"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and "Traceback" not in out.stderr and "give a number from 1 to 65535" in out.stderr


async def test_redaction_covers_named_secrets_token_shapes_and_bearer_values():
    redact = Redactor(["my-own-secret-value"])
    text_in = ("a my-own-secret-value b gho_" + "a" * 30 + " c ghs_" + "b" * 30 + " d github_pat_" + "c" * 40
               + " e Authorization: Bearer abcdefghijklmnopqrstuvwx f")
    out = redact(text_in)
    assert out == "a [redacted] b [redacted] c [redacted] d [redacted] e Authorization: Bearer [redacted] f"


async def test_a_secret_split_across_streamed_pieces_is_still_redacted():
    stream = StreamRedactor(Redactor(["my-own-secret-value"]))
    pieces = ["the key is my-own", "-secret-", "value and ghp_", "Z" * 20, "Z" * 16, " done; Bearer abcd",
              "efghijklmnop0123456789 end"]
    out = "".join(stream.feed(p) for p in pieces) + stream.flush()
    assert out == "the key is [redacted] and [redacted] done; Bearer [redacted] end"
