"""Bounded connections: at most as many as the descriptor limit leaves room for, each of which must send its
request in time, so slow or idle sockets cannot starve the service before authentication."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import resource
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .guard import Handler

# Descriptors kept back from connections: the MCP servers' pipes, the run store, logs, the event loop's own, and
# per run in flight its model stream and tool connections.
RESERVED_FDS, FDS_PER_RUN = 64, 4
REPORT_EVERY_S = 60.0
BUSY_BODY = json.dumps({"error": "the service holds all the connections it can; retry in a few seconds"}).encode()
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 5\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(BUSY_BODY), BUSY_BODY))
log = logging.getLogger(__name__)


def connection_limit(max_runs: int) -> int:
    """How many connections the service may hold: its descriptor limit less what runs need beside them."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = 65536 if soft == resource.RLIM_INFINITY else min(soft, 65536)
    return max(16, soft - RESERVED_FDS - FDS_PER_RUN * max_runs)


class Connections:
    """At most `limit` open connections, each of which must send a request's head within `timeout_s` of opening
    or of its last answer. Past the limit the longest-idle connection makes room, so a flood of idle sockets only
    pushes out its own; when none is idle (every one is handling a request), the new one gets a 503."""

    def __init__(self, limit: int, timeout_s: float):
        self.limit, self.timeout_s = limit, timeout_s
        self.open: set[web.RequestHandler] = set()
        self.idle: dict[web.RequestHandler, asyncio.TimerHandle] = {}  # longest idle first
        self.fresh: set[web.RequestHandler] = set()  # not one request yet
        self.dropped: Counter[str] = Counter()
        self.reported = -math.inf

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """What the listening socket makes of each connection it accepts."""
        loop = asyncio.get_running_loop()

        def accept() -> asyncio.Protocol:
            if len(self.open) >= self.limit:
                if not self.idle:
                    self.note(f"refused over the limit of {self.limit} open (from ulimit -n)")
                    return _Busy()
                self.drop(next(iter(self.idle)), f"closed idle to stay within {self.limit} open (from ulimit -n)")
            handler = _Handler(self, server, loop=loop)
            self.open.add(handler)
            self.fresh.add(handler)
            self.wait(handler)
            return handler

        return accept

    def middleware(self) -> Callable:
        """Marks a connection busy while a request is handled, and starts its clock again after."""

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            connection = request.protocol
            timer = self.idle.pop(connection, None)
            if timer is not None:
                timer.cancel()
            self.fresh.discard(connection)
            try:
                return await handler(request)
            finally:
                if connection in self.open:
                    self.wait(connection)

        return middleware

    def wait(self, connection: web.RequestHandler) -> None:
        self.idle[connection] = asyncio.get_running_loop().call_later(self.timeout_s, self.expire, connection)

    def expire(self, connection: web.RequestHandler) -> None:
        # One that served requests is only a keep-alive connection at rest: closing it is routine.
        reason = f"sent no request within {self.timeout_s:g} s (TB_CLIENT_TIMEOUT_S)"
        self.drop(connection, reason if connection in self.fresh else None)

    def drop(self, connection: web.RequestHandler, reason: str | None) -> None:
        self.closed(connection)
        connection.force_close()
        if reason:
            self.note(reason)

    def closed(self, connection: web.RequestHandler) -> None:
        """Forget a connection that is gone."""
        timer = self.idle.pop(connection, None)
        if timer is not None:
            timer.cancel()
        self.open.discard(connection)
        self.fresh.discard(connection)

    def note(self, reason: str) -> None:
        # One line a minute at most, however many sockets a flood opens.
        self.dropped[reason] += 1
        now = time.monotonic()
        if now - self.reported >= REPORT_EVERY_S:
            log.warning("dropped connections (counted, and reported at most once a minute): %s",
                        "; ".join(f"{n} {why}" for why, n in self.dropped.items()))
            self.dropped.clear()
            self.reported = now

    def loop_errors(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The event loop's error handler: an accept out of descriptors is noted, not logged with a traceback."""
        if context.get("message") == "socket.accept() out of system resource":
            self.note("not accepted: out of file descriptors (raise ulimit -n, or lower TB_MAX_RUNS)")
        else:
            loop.default_exception_handler(context)


class _Handler(web.RequestHandler):
    def __init__(self, connections: Connections, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.connections = connections

    def connection_lost(self, exc: BaseException | None) -> None:
        self.connections.closed(self)
        super().connection_lost(exc)


class _Busy(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(BUSY)  # type: ignore[attr-defined]
        transport.close()


CONNECTIONS = web.AppKey("connections", Connections)


async def listen(runner: web.AppRunner, host: str | None = None, port: int | None = None, *,
                 sock: socket.socket | None = None) -> asyncio.Server:
    """Serve a set-up runner's app on host:port (or `sock`) within its connection bounds; close the server this
    returns before cleaning up the runner."""
    loop = asyncio.get_running_loop()
    connections = runner.app[CONNECTIONS]
    loop.set_exception_handler(connections.loop_errors)
    return await loop.create_server(connections.protocol_factory(runner.server), host, port, sock=sock)
