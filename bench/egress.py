"""What the setup phase's egress proxy adds to a download, against the same download straight from the server.

A loopback HTTP server serves a 1 MiB and a 10 KiB file; each is fetched on a fresh connection, read to its end,
directly over TCP and through the proxy's Unix socket as an absolute-form GET (and, for reference, through a CONNECT
tunnel). Client, proxy and server share this process's event loop, so a ratio counts all the work the proxy adds
rather than what a spare core could hide. The cases interleave, as in `bench.sandbox`. Only an absurd cost fails the
run: over 5x for 1 MiB.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from servers.sandbox import allowlist, egress

from .sandbox import Case, Result, headline, race

SIZES = {"1 MiB": 1024 * 1024, "10 KiB": 10 * 1024}
ROUNDS = {"1 MiB": 200, "10 KiB": 500}
MAX_RATIO_1MIB = 5.0


async def origin(sizes: dict[str, int]) -> tuple[asyncio.Server, int]:
    """A bare HTTP/1.1 server on loopback: GET /<bytes> answers that many bytes and closes."""
    bodies = {f"/{size}".encode(): os.urandom(size) for size in sizes.values()}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = bodies[head.split(b" ", 2)[1]]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def drain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, size: int) -> None:
    """Send `request` and read the answer to its end; fewer bytes than `size` would make the timing meaningless."""
    writer.write(request)
    received = 0
    while chunk := await reader.read(65536):
        received += len(chunk)
    writer.close()
    if received < size:
        raise RuntimeError(f"got {received} bytes, expected at least {size}")


def get(target: str, port: int) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()


async def direct(port: int, size: int) -> None:
    await drain(*await asyncio.open_connection("127.0.0.1", port), get(f"/{size}", port), size)


async def proxied(proxy: egress.Proxy, port: int, size: int) -> None:
    await drain(*await asyncio.open_unix_connection(proxy.path), get(f"http://127.0.0.1:{port}/{size}", port), size)


async def tunnelled(proxy: egress.Proxy, port: int, size: int) -> None:
    reader, writer = await asyncio.open_unix_connection(proxy.path)
    writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
    if not (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200"):
        raise RuntimeError("the proxy refused the benchmark's CONNECT")
    await drain(reader, writer, get(f"/{size}", port), size)


async def main() -> list[Result]:
    logging.disable(logging.INFO)
    folder = Path(tempfile.mkdtemp(prefix="tb-bench-egress-"))
    server, port = await origin(SIZES)
    proxy = await egress.start(folder / "egress.sock", allowlist.Allowlist.parse(f"127.0.0.1:{port}"))
    print(f"egress proxy benchmarks: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; medians and "
          "p90s of interleaved rounds, each a fresh connection")
    started, results = time.perf_counter(), []
    try:
        for label, size in SIZES.items():
            t = await race({
                "proxy": Case(lambda _, s=size: proxied(proxy, port, s)),
                "connect": Case(lambda _, s=size: tunnelled(proxy, port, s)),
                "direct": Case(lambda _, s=size: direct(port, s)),
            }, ROUNDS[label])
            if label == "1 MiB":
                ok = t["proxy"].median / t["direct"].median <= MAX_RATIO_1MIB
                results.append(headline(f"GET {label} through the proxy", t["proxy"], "direct", t["direct"],
                                        f"for reference; fails over {MAX_RATIO_1MIB:g}x", ok))
            else:
                results.append(headline(f"GET {label} through the proxy", t["proxy"], "direct", t["direct"],
                                        "for reference", True))
            results.append(headline(f"GET {label} in a CONNECT tunnel", t["connect"], "direct", t["direct"],
                                    "for reference", True))
    finally:
        await proxy.close()
        server.close()
        shutil.rmtree(folder, ignore_errors=True)
    print(f"(total {time.perf_counter() - started:.0f} s)")
    return results


if __name__ == "__main__":
    missed = [r.label for r in asyncio.run(main()) if not r.ok]
    print("\n" + (f"missed: {', '.join(missed)}" if missed else "no absurd cost"))
    sys.exit(1 if missed else 0)
