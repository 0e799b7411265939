"""Serving an MCP server over streamable HTTP at /mcp: on loopback by default (with the SDK's Host and Origin
checks against DNS rebinding), and never anywhere else without a bearer token."""

from __future__ import annotations

import hmac
import json
import os
import sys
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer

from common.changeset import MAX_CHANGESET_BYTES, MAX_ENTRIES
from common.net import is_loopback

# The largest request either server must take is a commit_changes of the largest changeset the forges accept:
# its content in base64 (4/3 of it, plus padding per file), and each entry's path JSON-escaped at its worst
# (4096 characters of 6 bytes each) with its keys; 1 MiB holds the commit message and the envelope. The SDK's
# 4 MiB default refused a 3 MB file. A sandbox write_file (8 MB of text, escaped) fits under it too.
MAX_REQUEST_BYTES = 4 * (MAX_CHANGESET_BYTES // 3 + MAX_ENTRIES) + MAX_ENTRIES * (6 * 4096 + 100) + 2**20


class BearerAuth:
    """An ASGI wrapper that answers 401 to any HTTP request without `Authorization: Bearer <token>`."""

    def __init__(self, app: Any, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = json.dumps({"error": "send Authorization: Bearer <MCP_AUTH_TOKEN>"}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b'Bearer realm="mcp"')]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def serve_http(server: MCPServer, host: str, port: int) -> None:
    """Serve until interrupted; `MCP_AUTH_TOKEN` is required unless `host` is a loopback address."""
    token = os.environ.get("MCP_AUTH_TOKEN") or None
    if token is None and not is_loopback(host):
        sys.exit(f"refusing to serve MCP on {host} without authentication: set MCP_AUTH_TOKEN to a long random "
                 "secret (clients send it as `Authorization: Bearer <token>`), or listen on 127.0.0.1")
    app: Any = server.streamable_http_app(host=host, max_request_body_size=MAX_REQUEST_BYTES)
    if token:
        app = BearerAuth(app, token)
    uvicorn.run(app, host=host, port=port, log_level="info")
