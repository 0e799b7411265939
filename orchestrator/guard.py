"""What stands in front of the endpoints: the checks a hostile web page cannot pass (Host, Origin, body type) and
bearer authentication. Bounds on the connections themselves are in `connections`; the rate limit and the caps on runs
in flight are the run store's (`RunStore.admit`), so that they hold across replicas."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from aiohttp import web

from common.net import is_loopback

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The page holds no data and asks for the token itself (a browser cannot send one to load it). GitHub's deliveries
# carry no token: the webhook checks their signature (GITHUB_WEBHOOK_SECRET) instead.
OPEN_PATHS = {"/health", "/", "/github/webhook"}
CLIENT = web.RequestKey("client", str)  # on a request whose bearer token was checked: the token, hashed
HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::\d{1,5})?")
DEFAULT_PORTS = {"http": 80, "https": 443}


def client_key(request: web.Request) -> str:
    """Who a request counts against: its checked bearer token (hashed), else its address, with all of loopback one
    client and each IPv6 /64 one client (a proxy in front should set the limits itself)."""
    if CLIENT in request:
        return request[CLIENT]
    remote = request.remote or "unknown"
    if is_loopback(remote):
        return "loopback"
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(getattr(address, "ipv4_mapped", None) or address)


def refuse(status: int, message: str, retry_after: float | None = None) -> web.Response:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    if status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="tiny-backspace"'}
    return web.json_response({"error": message}, status=status, headers=headers)


def host_name(host: str) -> str | None:
    """The name in a Host header, lower-cased, without brackets or port; None when it is no host."""
    match = HOST.fullmatch(host)
    return match[1].strip("[]").lower() if match else None


def origin_of(url: str) -> tuple[str, str, int] | None:
    """An origin (or URL) as (scheme, host, port) with the default port filled in; None when it is no origin."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme]


def browser_checks(hosts: Iterable[str], origins: Iterable[str]) -> Callable:
    """Refuse what only a hostile web page sends: a Host that is not ours (DNS rebinding), an Origin that is not
    ours (a cross-site request), a POST body that is not JSON (a form or text/plain, which need no preflight)."""
    names = {host_name(name) or name.lower() for name in hosts}  # a configured port is ignored, as for loopback
    allowed = {origin for origin in map(origin_of, origins) if origin}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        name = host_name(host)
        if name is None or not (is_loopback(name) or name in names):
            return refuse(421, f"this service does not answer to the name {host!r}: address it as localhost or "
                               "127.0.0.1, or add the name to TB_ALLOWED_HOSTS")
        origin = request.headers.get("Origin")
        given = origin_of(origin) if origin is not None else None
        if origin is not None and (given is None or given not in allowed
                                   and given != origin_of(f"{request.scheme}://{host}")):
            return refuse(403, f"a page at {origin} may not use this service: use the service's own page, or add "
                               "that origin to TB_ALLOWED_ORIGINS")
        if request.method == "POST" and request.body_exists and request.content_type != "application/json":
            return refuse(415, "send the body as JSON, with the header Content-Type: application/json")
        return await handler(request)

    return middleware


def auth_middleware(token: str | None) -> Callable:
    """Every endpoint but /health, the page and the (signed) GitHub webhook needs `Authorization: Bearer
    <TB_API_TOKEN>` when a token is set."""
    expected = f"Bearer {token}".encode() if token else None
    identity = "token sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12] if token else ""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is None or request.path in OPEN_PATHS:
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return refuse(401, "send Authorization: Bearer <the service's TB_API_TOKEN>")
        request[CLIENT] = identity
        return await handler(request)

    return middleware
