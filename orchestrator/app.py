"""HTTP and Server-Sent Events only: `POST /code` streams a run, `GET /health` reports the MCP servers."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from .events import PING, sse
from .redact import Redactor
from .run import RunRequest, Services, execute, new_run_id

GITHUB_REPO = re.compile(r"^(?:https://github\.com/)?([A-Za-z0-9-]{1,39})/([A-Za-z0-9._-]{1,100}?)(?:\.git)?/?$")
SERVICES = web.AppKey("services", Services)
LOOPBACK = web.AppKey("loopback", bool)
MAX_BODY = 256 * 1024


def bad_request(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


def validate(body: Any, services: Services, loopback: bool) -> RunRequest | web.Response:
    """The run a request asks for, or the 4xx response that says what is wrong with it."""
    if not isinstance(body, dict):
        return bad_request('the body must be a JSON object: {"repoUrl": "...", "prompt": "..."}')
    repo, prompt = body.get("repoUrl"), body.get("prompt")
    if not isinstance(repo, str) or not repo.strip():
        return bad_request("repoUrl must be a non-empty string: a GitHub repository URL or a local repository path")
    if not isinstance(prompt, str) or not prompt.strip():
        return bad_request("prompt must be a non-empty string saying what to change")
    limit = services.settings.max_prompt_chars
    if len(prompt) > limit:
        return bad_request(f"prompt is {len(prompt)} characters, over the limit of {limit} (TB_MAX_PROMPT_CHARS)",
                           413)
    mode = body.get("mode", "team")
    if mode not in ("team", "single"):
        return bad_request('mode must be "team" (planner, coder, reviewer) or "single" (one agent)')
    repo = repo.strip()
    if GITHUB_REPO.match(repo):
        return RunRequest(repo_url=repo, prompt=prompt, mode=mode)
    local = _local_path(repo)
    if local is None:
        return bad_request("repoUrl must be https://github.com/owner/name, owner/name, or an absolute path or "
                           "file:// URL of a local git repository")
    roots = services.settings.local_roots
    if not loopback and not any(local == r or r in local.parents for r in roots):
        return bad_request("local repositories are accepted only while the service listens on loopback, or under "
                           "a root listed in TB_LOCAL_ROOTS", 403)
    if not (local / ".git").exists() and not (local / "HEAD").is_file():
        return bad_request(f"{local} is not a git repository")
    return RunRequest(repo_url=str(local), prompt=prompt, mode=mode)


def _local_path(repo: str) -> Path | None:
    if repo.startswith("file://"):
        repo = urlsplit(repo).path
    if not repo.startswith("/") or "\x00" in repo:
        return None
    return Path(repo).resolve()


async def post_code(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    if request.content_length is not None and request.content_length > MAX_BODY:
        return bad_request(f"the body is over {MAX_BODY} bytes", 413)
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return bad_request('the body is not JSON; send {"repoUrl": "...", "prompt": "..."}')
    except web.HTTPRequestEntityTooLarge:
        return bad_request(f"the body is over {MAX_BODY} bytes", 413)
    run = validate(body, services, request.app[LOOPBACK])
    if isinstance(run, web.Response):
        return run
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    await stream_events(response, execute(run, services, new_run_id()), services.settings.ping_seconds,
                        Redactor())
    return response


async def stream_events(response: web.StreamResponse, events: Any, ping_seconds: float, redact: Redactor) -> None:
    """Write events as they come and a ping comment when none came for `ping_seconds`.

    The run is produced by its own task, so a slow event (a long tool call) never holds back the pings; when the
    client goes away this handler is cancelled, and so is the run, which then destroys its sandbox.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def produce() -> None:
        try:
            async for event in events:
                await queue.put(event)
        finally:
            await events.aclose()
            await queue.put(done)

    producer = asyncio.create_task(produce())
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), ping_seconds)
            except TimeoutError:
                await response.write(PING)
                continue
            if item is done:
                break
            await response.write(sse(item, redact))
        await producer
    finally:
        if not producer.done():
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer


async def health(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    servers = services.pool.health()
    status = "healthy" if all(s["state"] == "up" for s in servers.values()) else "degraded"
    return web.json_response({"status": status, "model": services.model.name, "servers": servers})


def build_app(services: Services, loopback: bool = True,
              on_cleanup: Callable[[web.Application], Awaitable[None]] | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[SERVICES] = services
    app[LOOPBACK] = loopback
    app.router.add_post("/code", post_code)
    app.router.add_get("/health", health)
    if on_cleanup:
        app.on_cleanup.append(on_cleanup)
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
