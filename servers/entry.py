"""The command line both servers share: `python -m servers.<name> [--transport stdio|http] [--host H] [--port N]`."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Callable, Sequence

from mcp.server.mcpserver import MCPServer

from common.redact import Redactor, redact_all_logs, secret_values
from common.settings import ConfigError

from . import stdio, telemetry
from .http import serve_http


def serve_main(name: str, default_port: int, build: Callable[[], MCPServer], secrets: Sequence[str] = ()) -> None:
    """Parse the arguments, set up logs and traces, and serve `build()` until the client or a signal ends it.
    Every log line is redacted of the environment's secrets and of `secrets` (those read from elsewhere)."""
    parser = argparse.ArgumentParser(prog=f"python -m servers.{name}", description=f"The {name} MCP server.")
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    args = parser.parse_args()
    # At the records, not at our handler: uvicorn and other libraries log through handlers of their own.
    redact_all_logs(Redactor([*secret_values(), *secrets]))
    # stdout belongs to the protocol on stdio: logs go to stderr.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    telemetry.setup(f"tiny-backspace-{name}")
    try:
        server = build()
    except ConfigError as exc:
        refuse_config(name, exc)
    if args.transport == "stdio":
        stdio.run(server)
    else:
        serve_http(server, args.host, args.port)


def refuse_config(name: str, exc: ConfigError) -> typing.NoReturn:
    """End the server at start-up with one line that names every bad variable (no traceback)."""
    print(f"the {name} server cannot start: {exc}", file=sys.stderr)
    raise SystemExit(2)
