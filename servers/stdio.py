"""Serving an MCP server over stdin and stdout on the event loop's own pipes.

The SDK's `stdio_server` reads and writes through worker threads: a dozen thread hops per request, which is most of a
tool call's cost over stdio. It accepts explicit streams, so we give it asyncio pipes, and guard the wire as it
would: fd 0 reads the null device and fd 1 goes to stderr, so stray output from a handler or a child cannot corrupt
the protocol.
"""

from __future__ import annotations

import asyncio
import os
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server

MAX_LINE = 256 * 1024 * 1024  # one JSON-RPC message; a file written whole travels in one


class _Lines:
    """The lines of a pipe, as `stdio_server` iterates them."""

    def __init__(self, reader: asyncio.StreamReader):
        self.reader = reader

    def __aiter__(self) -> _Lines:
        return self

    async def __anext__(self) -> str:
        line = await self.reader.readline()
        if not line:
            raise StopAsyncIteration
        return line.decode("utf-8", "replace")


class _Writer:
    """A pipe that `stdio_server` writes lines to."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer

    async def write(self, text: str) -> None:
        self.writer.write(text.encode())

    async def flush(self) -> None:
        await self.writer.drain()


async def serve_stdio(server: MCPServer) -> None:
    """Run `server` over this process's stdin and stdout until stdin closes."""
    if not (_is_pipe(0) and _is_pipe(1)):  # a file or a terminal: the SDK's own transport handles those
        await server.run_stdio_async()
        return
    loop = asyncio.get_running_loop()
    wire_in, wire_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    reader = asyncio.StreamReader(limit=MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(wire_in, "rb", 0))
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                        os.fdopen(wire_out, "wb", 0))
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    lowlevel = server._lowlevel_server  # as MCPServer.run_stdio_async uses it
    try:
        streams = stdio_server(stdin=_Lines(reader), stdout=_Writer(writer))  # type: ignore[arg-type]
        async with streams as (read, write):
            await lowlevel.run(read, write, lowlevel.create_initialization_options())
    except* (ConnectionResetError, BrokenPipeError):
        pass  # the client went away without closing our stdin first: there is no one left to answer
    finally:
        transport.close()


def _is_pipe(fd: int) -> bool:
    import stat

    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def run(server: MCPServer) -> None:
    """Serve `server` over stdio; returns when the client closes stdin."""
    try:
        asyncio.run(serve_stdio(server))
    except KeyboardInterrupt:
        sys.exit(130)
