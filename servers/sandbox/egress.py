"""The egress proxy of a sandbox's setup phase, and the bridge that reaches it from inside the jail.

The setup jail keeps a network namespace of its own, with nothing in it but loopback. A bridge on the jail's
127.0.0.1 forwards each connection to a Unix socket bind-mounted from the host, where this proxy carries a request
only where `allowlist.destinations` says it may go.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .allowlist import Allowlist, Refused, Resolver, address_of, destinations, is_name, shown, split_authority

MAX_REFUSED_LINES = 1000  # a client that loops must not fill the server's memory
LINGER_S = 1
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_request(head: bytes) -> tuple[str, str, int, bytes | None]:
    """A proxy request's method, host, port and the head to send upstream (None for CONNECT); Refused(400) if the
    proxy cannot carry it."""
    lines = head.decode("latin-1").removesuffix("\r\n\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise Refused(400, "malformed request line")
    method, target, version = parts
    fields = [line.partition(":") for line in lines[1:]]
    if any(not colon or not _TOKEN.fullmatch(name) for name, colon, _ in fields):
        raise Refused(400, "malformed header line")
    scheme, slashes, rest = target.partition("://")
    if method != "CONNECT" and (scheme.lower() != "http" or not slashes):
        raise Refused(400, "use CONNECT for https:// (https_proxy)" if scheme.lower() == "https" else
                      "the setup proxy carries only CONNECT host:port and absolute-form requests (GET http://host/…)")
    authority = target if method == "CONNECT" else re.match(r"[^/?#]*", rest)[0]
    try:
        host, port = split_authority(authority)
        if address_of(host) is None and not is_name(host):
            raise ValueError(authority)
    except ValueError:
        raise Refused(400, f"malformed host {authority[:100]!r}") from None
    if method == "CONNECT":
        if port is None:
            raise Refused(400, "CONNECT needs host:port")
        return method, host, port, None
    path = "/" + rest[len(authority):].partition("#")[0].removeprefix("/")
    keep = [f"{name}:{value}" for name, _, value in fields
            if name.lower() not in ("host", "connection", "keep-alive") and not name.lower().startswith("proxy-")]
    upstream = [f"{method} {path} {version}", f"Host: {authority}", *keep, "Connection: close", "", ""]
    return method, host, port or 80, "\r\n".join(upstream).encode("latin-1")


@dataclass(frozen=True)
class EgressLimits:
    connect_s: float = 10  # resolving and connecting, together
    head_s: float = 30
    idle_s: float = 300  # a tunnel with no byte either way for this long is closed
    tunnels: int = 64
    head_bytes: int = 16 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, activity: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while data := await reader.read(65536):
        activity[0] = loop.time()
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    phrase = f"egress {'failed' if status == 502 else 'refused'}: " + re.sub(r"[^\x20-\x7e]", "?", reason)[:300]
    body = f"{phrase}\n".encode()
    writer.write(f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    writer.write_eof()
    # Closing with the request unread would reset the connection, and the client could lose the answer.
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(LINGER_S):
            while await reader.read(65536):
                pass


class Proxy:
    """A running egress proxy; `refused` holds one line for each request it did not carry."""

    def __init__(self, path: Path, allow: Allowlist, on_log: Callable[[str], None] | None, limits: EgressLimits,
                 resolve: Resolver | None):
        self.path, self.allow, self.limits, self._on_log, self._resolve = path, allow, limits, on_log, resolve
        self.refused: list[str] = []
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.Server | None = None

    async def close(self) -> None:
        """Stop listening and close every tunnel."""
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _log(self, line: str, refused: bool = False) -> None:
        if refused and len(self.refused) < MAX_REFUSED_LINES:
            self.refused.append(line)
        if self._on_log is not None:
            self._on_log(line)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(task := asyncio.current_task())
        try:
            await self._handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or close() ended it: a handler ending cancelled makes asyncio 3.11 log
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        what, limits = "request", self.limits
        try:
            if len(self._tasks) > limits.tunnels:
                raise Refused(503, f"the setup proxy already carries {limits.tunnels} connections; retry later")
            try:
                async with asyncio.timeout(limits.head_s):
                    head = await reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                raise Refused(408, f"no complete request head within {limits.head_s:g} s") from None
            except asyncio.LimitOverrunError:
                raise Refused(431, f"the request head is over {limits.head_bytes // 1024} KiB") from None
            method, host, port, forward = parse_request(head)
            what = f"{method} {shown(host, port)}"
            try:
                async with asyncio.timeout(limits.connect_s):
                    up_reader, up_writer = await self._connect(host, port)
            except TimeoutError:
                raise Refused(502, f"{shown(host, port)} did not answer within {limits.connect_s:g} s") from None
        except Refused as exc:
            self._log(f"egress: refused {what}: {exc.reason}", refused=True)
            return await _answer(reader, writer, exc.status, exc.reason)
        self._log(f"egress: {what}")
        try:
            if forward is None:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                up_writer.write(forward)
            await self._tunnel(reader, writer, up_reader, up_writer)
        finally:
            up_writer.transport.abort()

    async def _connect(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        errors = []
        for address in await destinations(host, port, self.allow, self._resolve):
            try:
                return await asyncio.open_connection(str(address), port)
            except OSError as exc:
                errors.append(f"{shown(str(address), port)}: {os.strerror(exc.errno) if exc.errno else exc}")
        raise Refused(502, f"cannot connect to {shown(host, port)}: {'; '.join(errors)}")

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        # The client may half-close and still read the answer; once the upstream side ends, the tunnel is over.
        loop = asyncio.get_running_loop()
        activity = [loop.time()]
        up = asyncio.ensure_future(_pipe(reader, up_writer, activity))
        down = asyncio.ensure_future(_pipe(up_reader, writer, activity))
        pending = {up, down}
        try:
            while down in pending and (remaining := activity[0] + self.limits.idle_s - loop.time()) > 0:
                done, pending = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if [t for t in done if t.exception()]:  # every exception read, or asyncio logs it
                    break
        finally:
            up.cancel()
            down.cancel()


async def start(socket_path: Path, allow: Allowlist, on_log: Callable[[str], None] | None = None,
                owner: tuple[int, int] | None = None, *, limits: EgressLimits = EgressLimits(),
                resolve: Resolver | None = None) -> Proxy:
    """Serve the egress proxy on the Unix socket `socket_path`, which only `owner` (or this user) may connect to."""
    proxy = Proxy(Path(socket_path), allow, on_log, limits, resolve)
    proxy._server = await asyncio.start_unix_server(proxy._serve, path=str(socket_path), limit=limits.head_bytes)
    os.chmod(socket_path, 0o600)
    if owner is not None:
        os.chown(socket_path, *owner)
    return proxy


PYTHON = "/usr/bin/python3"
MISSING_PYTHON = "setup needs /usr/bin/python3 for its network bridge: apt-get install python3"
# Runs in the jail: carries each connection to 127.0.0.1:<port> to the proxy's socket. Free of single quotes, as it
# travels in a single-quoted shell word.
BRIDGE = """
import asyncio, os, sys
async def pipe(r, w):
    while d := await r.read(65536): w.write(d); await w.drain()
    w.write_eof()
async def serve(r, w):
    try: ur, uw = await asyncio.open_unix_connection(sys.argv[1])
    except OSError: w.write(b"HTTP/1.1 502 egress proxy unreachable\\r\\n\\r\\n"); w.close(); return
    up = asyncio.ensure_future(pipe(r, uw))
    try: await pipe(ur, w)
    except OSError: pass
    finally: up.cancel(); uw.close(); w.close()
async def main():
    try: server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[2]))
    except OSError as e: return print(e, flush=True)
    print("ready", flush=True); os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    await server.serve_forever()
asyncio.run(main())
"""
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "npm_config_proxy", "npm_config_https_proxy")


def jail_prefix(socket_in_jail: str = "/run/tb-egress.sock", port: int = 3128) -> str:
    """Bash lines, to run before the setup script in its jail, that start the bridge and point clients at it."""
    proxy = f"http://127.0.0.1:{int(port)}"
    # Empty NO_PROXY: clients otherwise bypass the proxy for 127.0.0.1, and nothing on the jail's loopback helps.
    exports = " ".join(f"{var}={proxy}" for var in PROXY_VARS) + " NO_PROXY= no_proxy="
    return (
        f"if [ ! -x {PYTHON} ]; then echo {shlex.quote(MISSING_PYTHON)} >&2; exit 1; fi\n"
        f"exec {{tb_bridge}}< <(exec {PYTHON} -I -c '{BRIDGE}' {shlex.quote(socket_in_jail)} {int(port)} "
        "</dev/null 2>/dev/null)\n"
        'if ! read -r -t 10 -u "$tb_bridge" tb_ready || [ "$tb_ready" != ready ]; then\n'
        '  echo "the setup network bridge did not start: ${tb_ready:-it exited or did not answer within 10 s}" >&2\n'
        "  exit 1\n"
        "fi\n"
        "exec {tb_bridge}<&-; unset tb_bridge tb_ready\n"
        f"export {exports}\n"
    )
