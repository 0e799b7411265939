"""What stands in front of the endpoints: bearer authentication, a rate limit and caps on runs in flight."""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The page holds no data and asks for the token itself (a browser cannot send one to load it).
OPEN_PATHS = {"/health", "/"}


def client_key(request: web.Request) -> str:
    """Who a request counts against: its peer address (a proxy in front should set the limits itself)."""
    return request.remote or "unknown"


@dataclass
class TokenBucket:
    """`burst` requests at once, refilled at `per_minute`."""

    burst: int
    per_minute: float
    tokens: dict[str, tuple[float, float]] = field(default_factory=dict)  # client -> (tokens, last refill)

    def take(self, client: str) -> float:
        """0 when the request may go; otherwise the seconds until it may."""
        now = time.monotonic()
        tokens, last = self.tokens.get(client, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - last) * self.per_minute / 60)
        if len(self.tokens) > 10_000:  # forget the idle, so the table stays bounded
            self.tokens = {k: v for k, v in self.tokens.items() if now - v[1] < 3600}
        if tokens >= 1:
            self.tokens[client] = (tokens - 1, now)
            return 0.0
        self.tokens[client] = (tokens, now)
        return (1 - tokens) * 60 / self.per_minute


def refuse(status: int, message: str, retry_after: float | None = None) -> web.Response:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    if status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="tiny-backspace"'}
    return web.json_response({"error": message}, status=status, headers=headers)


def auth_middleware(token: str | None) -> Callable:
    """Every endpoint but /health needs `Authorization: Bearer <TB_API_TOKEN>` when a token is set."""
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is None or request.path in OPEN_PATHS:
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return refuse(401, "send Authorization: Bearer <the service's TB_API_TOKEN>")
        return await handler(request)

    return middleware


@dataclass
class Admission:
    """Whether a new run may start: the rate limit per client, then the caps on runs in flight."""

    bucket: TokenBucket
    max_runs: int
    max_runs_per_client: int

    def check(self, client: str, in_flight: list[str]) -> web.Response | None:
        wait = self.bucket.take(client)
        if wait:
            return refuse(429, f"too many runs started from {client}; retry in {math.ceil(wait)} s", wait)
        if in_flight.count(client) >= self.max_runs_per_client:
            return refuse(429, f"{client} already has {self.max_runs_per_client} runs in flight "
                               "(TB_MAX_RUNS_PER_CLIENT); wait for one to finish", 10)
        if len(in_flight) >= self.max_runs:
            return refuse(503, f"the service is running {self.max_runs} runs (TB_MAX_RUNS); retry shortly", 10)
        return None
