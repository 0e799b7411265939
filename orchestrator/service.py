"""The service's parts, assembled once from the settings and mcp.json, for the server and the command line (`cli`)
alike: the MCP tool pool and the model every run shares; and the server's start-up (`main`, from `__main__`)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web

from mcp import StdioServerParameters

from common.net import is_loopback
from common.redact import RedactingFilter, Redactor
from common.settings import ConfigError as BadSettings

from . import telemetry
from .app import WILDCARDS, build_app
from .connections import listen

from .config import Settings
from .mcp_pool import ConfigError, ToolPool, load_config
from .model import AnthropicModel, anthropic_client
from .replay import TrajectoryError, is_replay
from .replay import load as load_replay
from .run import Services
from .runs import RunManager
from .store import StoreError, open_store

log = logging.getLogger("orchestrator")


class StartupError(Exception):
    """The service or the command line cannot start; the message says what to do."""


STARTUP_ERRORS = (StartupError, ConfigError, StoreError, TrajectoryError)


def find_mcp_config() -> Path:
    """The mcp.json to use when none is named: the user's own when present, else the project's. Never one in the
    current folder: that is the user's repository, whose mcp.json (if any) is not ours."""
    user = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "tiny-backspace" / "mcp.json"
    project = Path(__file__).resolve().parent.parent / "mcp.json"
    for path in (user, project):
        if path.is_file():
            return path
    raise ConfigError(f"no mcp.json at {user} or {project}: pass --mcp-config PATH, or copy the project's mcp.json "
                      f"to {user} with absolute commands")


def settings_from_env() -> Settings:
    """The settings, or a `StartupError` naming the variable whose value cannot be used."""
    try:
        return Settings.from_env()
    except BadSettings as exc:  # bad TB_* values
        raise StartupError(f"{exc}: correct them, or unset them for the defaults") from None


def build_services(settings: Settings, mcp_config: Path | None = None) -> Services:
    """The MCP tool pool (not yet started) and the model, as every run shares them."""
    path = mcp_config or find_mcp_config()
    specs = load_config(path)
    for spec in specs:
        # Found now rather than after START_SECONDS of a server that cannot start.
        if isinstance(spec.target, StdioServerParameters) and shutil.which(spec.target.command) is None:
            raise ConfigError(f"{path} starts the {spec.name} server with {spec.target.command}, which is not "
                              "there: run ./tb serve once in the project (it makes .venv), or correct the command")
    pool = ToolPool(specs)
    if is_replay(settings.model):
        return Services(settings, pool, load_replay(settings.model))
    client, problem = anthropic_client()
    if problem:
        log.warning("runs are refused until a model is usable: %s", problem)
    model = AnthropicModel(client, settings.model, settings.limits.max_output_tokens,
                           settings.limits.overloaded_retries, settings.limits.overloaded_backoff_s)
    return Services(settings, pool, model, model_problem=problem)


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
    store = await open_store(settings)
    try:
        await pool.start()
        runs = RunManager(services, store)
        await runs.begin()  # marks the runs of replicas that are gone (a previous process of this one) interrupted
    except BaseException:
        await pool.close()
        await store.close()
        raise

    async def close(_: web.Application) -> None:
        await pool.close()
        await store.close()

    app = build_app(runs, args.host, on_cleanup=close, shutdown_grace_s=settings.shutdown_grace_s)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    try:
        listener = await listen(runner, args.host, args.port)
    except OSError as exc:  # taken since check_port
        await runner.cleanup()
        raise StartupError(listen_problem(args.host, args.port, exc)) from None
    log.info("listening on http://%s:%d (replica %s, model %s, MCP servers: %s, from %s)", args.host, args.port,
             store.replica, services.model.name, ", ".join(pool.connections), mcp_config)
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


def main(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; the exit code."""
    setup_logging()
    telemetry.setup()
    try:
        asyncio.run(serve(args))
    except STARTUP_ERRORS as exc:
        return startup_failed(exc)
    except KeyboardInterrupt:  # before the service was up to stop gracefully
        return 130
    return 0


def startup_failed(exc: Exception) -> int:
    """Say what went wrong in one line on stderr; the exit code for it."""
    print("error: " + " ".join(str(exc).split()), file=sys.stderr)
    return 2
