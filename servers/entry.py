"""The command line both servers share: `python -m servers.<name> [--transport stdio|http] [--host H] [--port N]`."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from mcp.server.mcpserver import MCPServer

from . import stdio, telemetry
from .http import serve_http


def serve_main(name: str, default_port: int, build: Callable[[], MCPServer],
               log_filter: logging.Filter | None = None) -> None:
    """Parse the arguments, set up logs and traces, and serve `build()` until the client or a signal ends it."""
    parser = argparse.ArgumentParser(prog=f"python -m servers.{name}", description=f"The {name} MCP server.")
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    args = parser.parse_args()
    # stdout belongs to the protocol on stdio: logs go to stderr.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if log_filter is not None:
        for handler in logging.getLogger().handlers:
            handler.addFilter(log_filter)
    telemetry.setup(f"tiny-backspace-{name}")
    server = build()
    if args.transport == "stdio":
        stdio.run(server)
    else:
        serve_http(server, args.host, args.port)
