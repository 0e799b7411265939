"""`python -m orchestrator --host 127.0.0.1 --port 8002 --mcp-config mcp.json` serves;
`python -m orchestrator run --repo URL_OR_PATH "instruction"` is the command line client (`cli.py`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import anthropic
from aiohttp import web

from common.net import is_loopback
from common.redact import RedactingFilter, Redactor

from . import telemetry
from .app import WILDCARDS, build_app
from .config import Settings
from .connections import listen
from .mcp_pool import ConfigError, ToolPool, load_config
from .runs import RunManager
from .store import SQLiteRunStore, StoreError
from .model import AnthropicModel
from .run import Services

log = logging.getLogger("orchestrator")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description="The Tiny Backspace service.",
                                     epilog="python -m orchestrator run --help: run one job from the terminal")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--mcp-config", type=Path, default=Path("mcp.json"))
    return parser.parse_args(argv)


def build_services(settings: Settings, mcp_config: Path) -> Services:
    """The MCP tool pool (not yet started) and the model, as every run shares them."""
    pool = ToolPool(load_config(mcp_config))
    # Built with the SDK's defaults: ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL work as everywhere else.
    if os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN"):
        client = anthropic.AsyncAnthropic()
    else:
        log.warning("ANTHROPIC_API_KEY is not set: runs will fail until it is set (or until ANTHROPIC_BASE_URL "
                    "points at a compatible server that needs no key)")
        client = anthropic.AsyncAnthropic(api_key="")
    model = AnthropicModel(client, settings.model, settings.limits.max_output_tokens,
                           settings.limits.overloaded_retries, settings.limits.overloaded_backoff_s)
    return Services(settings, pool, model)


def setup_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter(Redactor()))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


async def serve(args: argparse.Namespace) -> None:
    settings = Settings.from_env()
    if not is_loopback(args.host) and not settings.api_token:
        sys.exit(f"refusing to listen on {args.host} without authentication: set TB_API_TOKEN to a long random "
                 "secret (e.g. `openssl rand -hex 32`) and send it as `Authorization: Bearer <token>`, or listen "
                 "on 127.0.0.1")
    services = build_services(settings, args.mcp_config)
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
    listener = await listen(runner, args.host, args.port)
    log.info("listening on http://%s:%d (model %s, MCP servers: %s)", args.host, args.port, settings.model,
             ", ".join(pool.connections))
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
    args = parse_args(argv)
    setup_logging()
    telemetry.setup()
    try:
        asyncio.run(serve(args))
    except ConfigError as exc:
        sys.exit(f"mcp.json: {exc}")
    except StoreError as exc:
        sys.exit(str(exc))


if __name__ == "__main__":
    main()
