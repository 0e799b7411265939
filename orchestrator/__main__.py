"""`python -m orchestrator --host 127.0.0.1 --port 8002 --mcp-config mcp.json` serves;
`python -m orchestrator run --repo URL_OR_PATH "instruction"` is the command line client (`cli.py`), and
`python -m orchestrator pulls|pull|comment|follow-up|close REPO ...` works on a local repository's pull requests.

Without --mcp-config both use ~/.config/tiny-backspace/mcp.json when it exists, else the project's own mcp.json (beside
this package in a source checkout), whatever the current folder. A failure the operator can fix at start-up (a bad
variable, a port in use, an unusable mcp.json, run store or trajectory) is one line on stderr saying what to do, and
exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web

from common.net import is_loopback
from common.redact import RedactingFilter, Redactor

from . import telemetry
from .app import WILDCARDS, build_app
from .connections import listen
from .runs import RunManager
from .store import SQLiteRunStore
from .service import STARTUP_ERRORS, StartupError, build_services, find_mcp_config, settings_from_env

log = logging.getLogger("orchestrator")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description="The Tiny Backspace service.",
                                     epilog="python -m orchestrator run --help: run one job from the terminal")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--mcp-config", type=Path, default=None,
                        help="the MCP servers (default: ~/.config/tiny-backspace/mcp.json if present, else the "
                             "project's mcp.json)")
    return parser.parse_args(argv)


def setup_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter(Redactor()))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def check_port(host: str, port: int) -> None:
    """Refuse at once a port this service cannot listen on: before the MCP servers start, and before the runs of
    another service still listening there are taken for runs it left interrupted."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host!r} ({exc.strerror}): pass --host with an address of this "
                           "machine, like 127.0.0.1") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener will
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise StartupError(listen_problem(host, port, exc)) from None


def listen_problem(host: str, port: int, exc: OSError) -> str:
    """What to do when the service cannot listen on host:port."""
    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} on {host or 'every address'} is in use, perhaps by another ./tb serve: stop that one, "
                "or pass --port with a free port")
    return f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass a --host and --port this machine allows"


async def serve(args: argparse.Namespace) -> None:
    settings = settings_from_env()
    if not is_loopback(args.host) and not settings.api_token:
        raise StartupError(f"refusing to listen on {args.host} without authentication: set TB_API_TOKEN to a long "
                           "random secret (e.g. `openssl rand -hex 32`) and send it as `Authorization: Bearer "
                           "<token>`, or listen on 127.0.0.1")
    check_port(args.host, args.port)
    mcp_config = args.mcp_config or find_mcp_config()
    services = build_services(settings, mcp_config)
    pool = services.pool
    store = SQLiteRunStore(settings.data_dir / "runs.sqlite3")
    await pool.start()
    runs = RunManager(services, store)
    interrupted = await runs.recover()
    if interrupted:
        log.warning("marked %d run(s) left in flight by the previous process as interrupted", len(interrupted))

    async def close(_: web.Application) -> None:
        await pool.close()
        store.close()

    app = build_app(runs, args.host, on_cleanup=close, shutdown_grace_s=settings.shutdown_grace_s)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    try:
        listener = await listen(runner, args.host, args.port)
    except OSError as exc:  # taken since check_port
        await runner.cleanup()
        raise StartupError(listen_problem(args.host, args.port, exc)) from None
    log.info("listening on http://%s:%d (model %s, MCP servers: %s, from %s)", args.host, args.port,
             services.model.name, ", ".join(pool.connections), mcp_config)
    if args.host in WILDCARDS and not settings.allowed_hosts:
        log.warning("listening on every address, but answering only to localhost, 127.0.0.1 and [::1]: set "
                    "TB_ALLOWED_HOSTS to the names clients use to reach this machine")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        listener.close()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        from .cli import main as run_main  # the client needs none of the service's start-up

        sys.exit(run_main(argv[1:]))
    if argv[:1] and argv[0] in ("pulls", "pull", "comment", "follow-up", "close"):
        from .cli import pulls_main  # a local repository's pull requests, through the service

        sys.exit(pulls_main(argv))
    args = parse_args(argv)
    setup_logging()
    telemetry.setup()
    try:
        asyncio.run(serve(args))
    except STARTUP_ERRORS as exc:
        sys.exit(startup_failed(exc))
    except KeyboardInterrupt:  # before the service was up to stop gracefully
        sys.exit(130)


def startup_failed(exc: Exception) -> int:
    """Say what went wrong in one line on stderr; the exit code for it."""
    print("error: " + " ".join(str(exc).split()), file=sys.stderr)
    return 2


if __name__ == "__main__":
    main()
