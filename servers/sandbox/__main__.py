"""`python -m servers.sandbox [--transport stdio|http] [--host H] [--port N]`"""

import argparse
import logging

from .. import stdio, telemetry
from ..http import serve_http
from .server import build_server


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m servers.sandbox", description="The sandbox MCP server.")
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    # stdout belongs to the protocol on stdio: logs go to stderr.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    telemetry.setup("tiny-backspace-sandbox")
    server = build_server()
    if args.transport == "stdio":
        stdio.run(server)
    else:
        serve_http(server, args.host, args.port)


if __name__ == "__main__":
    main()
