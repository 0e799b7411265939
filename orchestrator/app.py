"""HTTP and Server-Sent Events only: `POST /code` streams a run, `GET /health` reports the model and the MCP servers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from common.net import is_loopback
from common.redact import Redactor

from .events import PING, sse
from .connections import CONNECTIONS, Connections, connection_limit
from .guard import auth_middleware, browser_checks, client_key
from . import pulls
from .intake import (LOOPBACK, MAX_BODY, REDACT, RUNS, bad_request, control_character, not_admitted, read_json,
                     redacted_json, validate)
from .replay import trajectory
from .runs import NotAdmitted, NotPublishable, RunManager
from .store import StoreError
from .webhook import Webhook

LAST_EVENT_DIGITS = 18  # any event number fits; a longer one would overflow the store's 64-bit integers
WILDCARDS = {"", "0.0.0.0", "::"}  # listening on every address names none a client would send as Host
STORE_CHECK_S = 5.0  # /health asks the run store for one run within this
PAGE = Path(__file__).parent / "web" / "index.html"
log = logging.getLogger(__name__)


async def post_code(request: web.Request) -> web.StreamResponse:
    runs = request.app[RUNS]
    if runs.services.model_problem:
        return bad_request(runs.services.model_problem, 503)
    body = await read_json(request, '{"repoUrl": "...", "prompt": "..."}')
    if isinstance(body, web.Response):
        return body
    run = validate(body, runs.services, request.app[LOOPBACK])
    if isinstance(run, web.Response):
        return run
    on_disconnect = body.get("on_disconnect", "continue")
    try:
        run_id = await runs.start(run, client_key(request))
    except NotAdmitted as exc:
        return not_admitted(client_key(request), exc, runs.services)
    try:
        return await sse_response(request, runs.follow(run_id))
    except asyncio.CancelledError:
        if on_disconnect == "cancel":
            await asyncio.shield(runs.cancel(run_id))
        raise


async def run_events(request: web.Request) -> web.StreamResponse:
    """A run's events as SSE: those after `Last-Event-ID` (or `?after=`), then live ones until it completes."""
    runs, run_id = request.app[RUNS], request.match_info["run_id"]
    if await runs.store.get(run_id) is None:
        return bad_request(f"no run {run_id!r}", 404)
    raw = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    if not (raw.isascii() and raw.isdigit() and len(raw) <= LAST_EVENT_DIGITS):
        return bad_request("Last-Event-ID (or after) must be the number of the last event you received "
                           f"(at most {LAST_EVENT_DIGITS} digits), or 0 for all of them")
    return await sse_response(request, runs.follow(run_id, int(raw)))


async def sse_response(request: web.Request, events: Any) -> web.StreamResponse:
    runs = request.app[RUNS]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    await stream_events(response, events, runs.services.settings.ping_seconds, request.app[REDACT])
    return response


async def list_runs(request: web.Request) -> web.Response:
    try:
        limit = min(100, max(1, int(request.query.get("limit", "20"))))
        before = float(request.query["before"]) if "before" in request.query else None
    except ValueError:
        return bad_request("limit must be a whole number and before a timestamp (the `created` of a run)")
    records = await request.app[RUNS].store.list(limit, before)
    page = {"runs": records}
    if len(records) == limit:
        page["next"] = f"/runs?limit={limit}&before={records[-1]['created']}"
    return redacted_json(request, page)


async def get_run(request: web.Request) -> web.Response:
    record = await request.app[RUNS].get(request.match_info["run_id"])
    if record is None:
        return bad_request(f"no run {request.match_info['run_id']!r}", 404)
    return redacted_json(request, {**record, "events_url": f"/runs/{record['id']}/events"})


async def get_trajectory(request: web.Request) -> web.Response:
    """What the model decided in a run, per agent, to replay with TB_MODEL=replay:PATH."""
    store, run_id = request.app[RUNS].store, request.match_info["run_id"]
    record = await store.get(run_id)
    if record is None:
        return bad_request(f"no run {run_id!r}", 404)
    return redacted_json(request, trajectory(record, await store.turns(run_id)))


async def cancel_run(request: web.Request) -> web.Response:
    """Stop a run: `{"changes": "keep"}` (the default) keeps its changes as a draft pull request, or with the run
    when the forge cannot be reached; `{"changes": "discard"}` drops them."""
    runs, run_id = request.app[RUNS], request.match_info["run_id"]
    record = await runs.store.get(run_id)
    if record is None:
        return bad_request(f"no run {run_id!r}", 404)
    body = await read_json(request, '{"changes": "keep"} or {"changes": "discard"}', optional=True)
    if isinstance(body, web.Response):
        return body
    changes = body.get("changes", "keep") if isinstance(body, dict) else None
    if changes not in ("keep", "discard") or set(body) - {"changes"}:
        return bad_request('send {"changes": "keep"} to keep the run\'s changes as a draft pull request, or '
                           '{"changes": "discard"} to drop them (no body: keep)')
    if not await runs.cancel(run_id, keep=changes == "keep"):
        return bad_request(f"run {run_id} is not running (it is {record['status']})", 409)
    record = await runs.store.get(run_id) or record
    return redacted_json(request, {"id": run_id, "status": record["status"], "changes": changes,
                                   "pull_request_url": record["pull_request_url"], "kept": record.get("kept")})


async def steer_run(request: web.Request) -> web.Response:
    """`{"text": "..."}`: a message from the user to the run's active agent, handed over at its next turn."""
    runs, run_id = request.app[RUNS], request.match_info["run_id"]
    record = await runs.store.get(run_id)
    if record is None:
        return bad_request(f"no run {run_id!r}", 404)
    body = await read_json(request, '{"text": "..."}')
    if isinstance(body, web.Response):
        return body
    limit = runs.services.settings.max_prompt_chars
    text = body.get("text") if isinstance(body, dict) and set(body) == {"text"} else None
    if not isinstance(text, str) or not text.strip():
        return bad_request('send {"text": "..."}: what the agent should know or do, as plain text')
    if len(text) > limit:
        return bad_request(f"text is {len(text)} characters, over the limit of {limit} (TB_MAX_PROMPT_CHARS)", 413)
    if refused := control_character("text", text):
        return refused
    if refused := await runs.steer(run_id, text):
        return bad_request(f"not delivered: {refused} (run {run_id} is {record['status']}); start a new run, or "
                           "retry it if it kept its changes", 409)
    return web.json_response({"id": run_id, "accepted": True,
                              "message": "the active agent gets it at its next turn; the stream shows it then"},
                             status=202)


async def publish_run(request: web.Request) -> web.Response:
    """Open a draft pull request from the changes a stopped run kept."""
    runs, run_id = request.app[RUNS], request.match_info["run_id"]
    if await runs.store.get(run_id) is None:
        return bad_request(f"no run {run_id!r}", 404)
    try:
        pr = await runs.publish(run_id)
    except NotPublishable as exc:
        return bad_request(str(exc), exc.status)
    return redacted_json(request, {"id": run_id, "pull_request_url": pr["url"], "number": pr.get("number"),
                                   "draft": pr.get("draft", True)})


async def retry_run(request: web.Request) -> web.Response:
    """Start a new run of a stopped run's request, from the changes it kept; answers the new run's id."""
    runs, run_id = request.app[RUNS], request.match_info["run_id"]
    if await runs.store.get(run_id) is None:
        return bad_request(f"no run {run_id!r}", 404)
    if runs.services.model_problem:
        return bad_request(runs.services.model_problem, 503)
    try:
        new_id = await runs.retry(run_id, client_key(request))
    except NotPublishable as exc:
        return bad_request(str(exc), exc.status)
    except NotAdmitted as exc:
        return not_admitted(client_key(request), exc, runs.services)
    return web.json_response({"id": new_id, "retries": run_id, "events_url": f"/runs/{new_id}/events"}, status=202)


async def stream_events(response: web.StreamResponse, events: Any, ping_seconds: float, redact: Redactor) -> None:
    """Write events as they come and a ping comment when none came for `ping_seconds`.

    The events come from their own task, so a slow one (a long tool call) never holds back the pings; when the
    client goes away this handler is cancelled, and so is that task (the run itself goes on unless the request
    asked for `on_disconnect: cancel`).
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
    services = request.app[RUNS].services
    servers = services.pool.health()
    reasons = {"model": services.model_problem} if services.model_problem else {}
    try:
        async with asyncio.timeout(STORE_CHECK_S):
            await request.app[RUNS].store.list(1, None)
    except (StoreError, TimeoutError) as exc:  # the details (where the database is) are for the log, not for anyone
        log.error("/health: the run store failed: %s", exc or f"no answer within {STORE_CHECK_S:g} s")
        reasons["store"] = "the run store cannot be used now: the service's log says why"
    if down := [f"{name} is {s['state']}" + (f" ({s['error']})" if s.get("error") else "")
                for name, s in servers.items() if s["state"] != "up"]:
        reasons["servers"] = "MCP server " + "; ".join(down)
    runs = request.app[RUNS]
    status = "draining" if runs.draining else "degraded" if reasons else "healthy"
    answer = {"status": status, "model": services.model.name, "servers": servers, "replica": runs.store.replica,
              "runs_in_flight": len(runs.live)}
    response = redacted_json(request, answer | ({"reasons": reasons} if reasons else {}))
    if runs.draining:  # a load balancer's health check takes this replica out while its runs finish
        response.set_status(503)
    return response


@web.middleware
async def store_failures(request: web.Request, handler: Any) -> web.StreamResponse:
    """A run store that fails now (PostgreSQL down or unreachable) is a 503 saying so, not a 500."""
    try:
        return await handler(request)
    except StoreError as exc:
        return web.json_response({"error": f"{exc}"}, status=503, headers={"Retry-After": "5"})


def page_handler() -> Callable[[web.Request], Awaitable[web.Response]]:
    """`GET /`: the page, whose inline script alone may run (its hash is in the Content-Security-Policy)."""
    html = PAGE.read_text()
    script = html.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    # img-src data: for the page's inline favicon; a route of its own would want the API token, which a browser does
    # not send for an icon.
    policy = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; connect-src 'self'; "
              "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html",
                            headers={"Content-Security-Policy": policy, "Cache-Control": "no-cache"})

    return page


def build_app(runs: RunManager, host: str = "127.0.0.1",
              on_cleanup: Callable[[web.Application], Awaitable[None]] | None = None,
              shutdown_grace_s: float = 0.0) -> web.Application:
    """The service, to listen on `host`: off loopback it accepts local paths only under TB_LOCAL_ROOTS, and
    answers to the name it listens on besides TB_ALLOWED_HOSTS."""
    settings = runs.services.settings
    loopback = is_loopback(host)
    hosts = settings.allowed_hosts + ((host,) if not loopback and host not in WILDCARDS else ())
    connections = Connections(connection_limit(settings.max_runs), settings.client_timeout_s)
    middlewares = [connections.middleware(), browser_checks(hosts, settings.allowed_origins),
                   auth_middleware(settings.api_token), store_failures]
    app = web.Application(client_max_size=MAX_BODY, middlewares=middlewares)
    app[CONNECTIONS] = connections
    app[RUNS] = runs
    app[LOOPBACK] = loopback
    app[REDACT] = Redactor()
    app.router.add_post("/code", post_code)
    app.router.add_get("/runs", list_runs)
    app.router.add_get("/runs/{run_id}", get_run)
    app.router.add_get("/runs/{run_id}/events", run_events)
    app.router.add_get("/runs/{run_id}/trajectory", get_trajectory)
    app.router.add_post("/runs/{run_id}/cancel", cancel_run)
    app.router.add_post("/runs/{run_id}/messages", steer_run)
    app.router.add_post("/runs/{run_id}/publish", publish_run)
    app.router.add_post("/runs/{run_id}/retry", retry_run)
    app.router.add_get("/pulls", pulls.list_pulls)
    app.router.add_get("/pulls/{number}", pulls.get_pull)
    app.router.add_post("/pulls/{number}/comments", pulls.add_comment)
    app.router.add_post("/pulls/{number}/close", pulls.close_pull)
    app.router.add_get("/health", health)
    app.router.add_get("/", page_handler())
    Webhook(runs, MAX_BODY).install(app)  # POST /github/webhook

    async def finish_runs(_: web.Application) -> None:
        # Before aiohttp waits for open handlers: theirs are the streams of these runs.
        await runs.shutdown(shutdown_grace_s)

    app.on_shutdown.append(finish_runs)
    if on_cleanup:
        app.on_cleanup.append(on_cleanup)
    return app
