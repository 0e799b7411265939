"""`python -m servers.github [--transport stdio|http] [--host H] [--port N]`"""

import argparse
import logging

from .. import stdio, telemetry
from ..http import serve_http
from .config import RedactingFilter, Settings
from .server import build_server


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m servers.github", description="The github MCP server.")
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8003)
    args = parser.parse_args()
    settings = Settings.from_env()
    # stdout belongs to the protocol on stdio: logs go to stderr, through the redaction filter.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter(settings.secrets()))
    telemetry.setup("tiny-backspace-github")
    server = build_server(settings)
    if args.transport == "stdio":
        stdio.run(server)
    else:
        serve_http(server, args.host, args.port)


if __name__ == "__main__":
    main()
