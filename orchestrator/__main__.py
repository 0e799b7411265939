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
import sys
from pathlib import Path


def port(value: str) -> int:
    """A TCP port number, for argparse."""
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port: give a number from 1 to 65535")
    return int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description="The Tiny Backspace service.",
                                     epilog="python -m orchestrator run --help: run one job from the terminal")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port, default=8002)
    parser.add_argument("--mcp-config", type=Path, default=None,
                        help="the MCP servers (default: ~/.config/tiny-backspace/mcp.json if present, else the "
                             "project's mcp.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        from .cli import main as run_main  # the client needs none of the service's start-up

        sys.exit(run_main(argv[1:]))
    if argv[:1] and argv[0] in ("pulls", "pull", "comment", "follow-up", "close"):
        from .cli import pulls_main  # a local repository's pull requests, through the service

        sys.exit(pulls_main(argv))
    args = parse_args(argv)
    from .service import main as serve_main  # loaded only to serve: the clients above start in a fraction of it

    sys.exit(serve_main(args))


if __name__ == "__main__":
    main()
