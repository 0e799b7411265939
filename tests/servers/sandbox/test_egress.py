"""The setup phase's egress proxy against real sockets, and through a real bubblewrap jail: what it carries, what it
refuses, and the message a refused agent reads."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from servers.sandbox import allowlist, egress
from servers.sandbox.allowlist import DEFAULT_ALLOW, Allowlist, Refused
from servers.sandbox.egress import EgressLimits

BOUND_S = 10
PACKAGE = b"demo-1.0.tar.gz: " + bytes(range(256)) * 64


@dataclass
class Registry:
    """A package index on this machine, and the requests it saw."""

    port: int
    seen: list[web.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)


@dataclass
class Reply:
    status: int
    phrase: str
    body: bytes


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    reg = Registry(0)

    async def package(request: web.Request) -> web.Response:
        reg.seen.append(request)
        reg.bodies.append(await request.read())
        return web.Response(body=PACKAGE if request.method == "GET" else b"got " + reg.bodies[-1])

    app = web.Application()
    app.router.add_route("*", "/packages/{name}", package)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    reg.port = site._server.sockets[0].getsockname()[1]
    yield reg
    await runner.cleanup()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short private folder for the proxy's socket (a Unix socket path holds at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tb-egress-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def proxy(registry: Registry, socket_dir: Path) -> AsyncIterator[egress.Proxy]:
    running = await egress.start(socket_dir / "egress.sock", Allowlist.parse(f"127.0.0.1:{registry.port}"))
    yield running
    await running.close()


async def ask(proxy: egress.Proxy, head: str, body: bytes = b"", half_close: bool = False) -> Reply:
    """Send one request to the proxy and read the whole answer; `half_close` ends a tunnel once it stands."""
    async with asyncio.timeout(BOUND_S):
        reader, writer = await asyncio.open_unix_connection(proxy.path)
        writer.write(head.encode("latin-1") + body)
        if half_close:
            writer.write_eof()
        answer = await reader.read()
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    _, status, phrase = status_line.decode().split(" ", 2)
    return Reply(int(status), phrase, rest.partition(b"\r\n\r\n")[2])


async def tunnel(proxy: egress.Proxy, target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A CONNECT tunnel through the proxy to `target`, once the proxy said it is established."""
    async with asyncio.timeout(BOUND_S):
        reader, writer = await asyncio.open_unix_connection(proxy.path)
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection established\r\n\r\n"
    return reader, writer


def get(url: str, *headers: str) -> str:
    return "\r\n".join([f"GET {url} HTTP/1.1", *headers, "", ""])


async def static_resolver(answers: dict[str, list[str]]) -> egress.Resolver:
    async def resolve(host: str, port: int) -> list[str]:
        return answers[host]
    return resolve


def test_allowlist_entries_are_names_wildcards_and_ip_literals_with_their_ports() -> None:
    allow = Allowlist.parse("PyPI.org, *.example.com,127.0.0.1:8080, [::1]:9000,git.example.org:8443")
    assert allow.match("pypi.org", 443) and allow.match("pypi.org", 80)
    assert not allow.match("pypi.org", 8080)
    assert allow.match("a.b.example.com", 443) and not allow.match("example.com", 443)
    assert not allow.match("badexample.com", 443)
    assert allow.match("127.0.0.1", 8080) and not allow.match("127.0.0.1", 80)
    assert allow.match("::1", 9000) and not allow.match("::1", 8080)
    assert allow.match("git.example.org", 8443) and not allow.match("git.example.org", 443)
    assert Allowlist.parse(["pypi.org", "*.example.com"]).match("x.example.com", 80)


def test_the_default_allowlist_lets_pip_npm_and_go_reach_their_registries_and_nothing_else() -> None:
    allow = Allowlist.parse(DEFAULT_ALLOW)
    for host in ("pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "proxy.golang.org", "sum.golang.org"):
        assert allow.match(host, 443), host
    assert not allow.match("github.com", 443)
    assert not allow.match("evil.pypi.org", 443)


@pytest.mark.parametrize("entry", ["10.0.0.1", "[::1]", "::1:80", "http://pypi.org", "*.*.example.com", "pypi.org:0",
                                   "pypi.org:70000", "127.1", "[pypi.org]:443", "*", "py pi.org", "-pypi.org",
                                   "pypi.org/simple", "user@pypi.org"])
def test_a_bad_allowlist_entry_is_refused_with_the_forms_that_are_accepted(entry: str) -> None:
    with pytest.raises(ValueError) as caught:
        Allowlist.parse(f"pypi.org,{entry}")
    assert repr(entry) in str(caught.value)
    assert "*.domain" in str(caught.value) and "127.0.0.1:8080" in str(caught.value)


@pytest.mark.parametrize(("address", "problem"), [
    ("10.0.0.5", "a private address"), ("192.168.1.1", "a private address"), ("fd00::2", "a private address"),
    ("169.254.169.254", "a link-local address"), ("fe80::1", "a link-local address"),
    ("127.0.0.1", "a loopback address"), ("::1", "a loopback address"), ("::ffff:127.0.0.1", "a loopback address"),
    ("::ffff:10.0.0.5", "a private address"), ("2002:a00:5::", "a private address"),
    ("64:ff9b::a9fe:a9fe", "a link-local address"), ("0.0.0.0", "an unspecified address"),
    ("224.0.0.1", "a multicast address"), ("100.64.0.1", "not a public address"),
])
def test_addresses_a_host_name_may_not_reach_are_named_for_what_they_are(address: str, problem: str) -> None:
    assert allowlist.address_problem(ipaddress.ip_address(address)) == problem


def test_public_addresses_have_no_problem() -> None:
    for address in ("151.101.0.223", "2a04:4e42::223", "::ffff:151.101.0.223"):
        assert allowlist.address_problem(ipaddress.ip_address(address)) is None, address


@pytest.mark.parametrize("resolved", [["10.0.0.5"], ["169.254.169.254"], ["::1"], ["::ffff:127.0.0.1"],
                                      ["151.101.0.223", "10.0.0.5"]])
async def test_an_allowlisted_name_that_resolves_to_a_private_address_is_refused(resolved: list[str]) -> None:
    resolve = await static_resolver({"pypi.org": resolved})
    with pytest.raises(Refused) as caught:
        await allowlist.destinations("pypi.org", 443, Allowlist.parse("pypi.org"), resolve)
    assert caught.value.status == 403
    assert caught.value.reason.startswith("pypi.org resolves to ") and "address" in caught.value.reason


async def test_an_allowlisted_name_is_reached_at_the_public_addresses_it_resolved_to() -> None:
    resolve = await static_resolver({"pypi.org": ["151.101.0.223", "151.101.0.223", "2a04:4e42::223"]})
    found = await allowlist.destinations("pypi.org", 443, Allowlist.parse("pypi.org"), resolve)
    assert found == [ipaddress.ip_address("151.101.0.223"), ipaddress.ip_address("2a04:4e42::223")]


async def test_an_allowlisted_ip_literal_is_fetched_in_absolute_form_with_the_proxy_headers_dropped(
        registry: Registry, socket_dir: Path) -> None:
    logged: list[str] = []
    proxy = await egress.start(socket_dir / "e.sock", Allowlist.parse(f"127.0.0.1:{registry.port}"), logged.append)
    try:
        reply = await ask(proxy, get(f"http://127.0.0.1:{registry.port}/packages/demo?v=1#frag",
                                     "Host: wrong.example", "Proxy-Authorization: Basic eDp5",
                                     "Proxy-Connection: keep-alive", "Connection: keep-alive", "User-Agent: pip"))
    finally:
        await proxy.close()
    assert (reply.status, reply.body) == (200, PACKAGE)
    seen = registry.seen[0]
    assert seen.path_qs == "/packages/demo?v=1"
    assert seen.headers["Host"] == f"127.0.0.1:{registry.port}"
    assert seen.headers["Connection"] == "close" and seen.headers["User-Agent"] == "pip"
    assert not [name for name in seen.headers if name.lower().startswith("proxy-")]
    assert logged == [f"egress: GET 127.0.0.1:{registry.port}"] and proxy.refused == []


async def test_a_request_body_reaches_the_registry(proxy: egress.Proxy, registry: Registry) -> None:
    body = b"name=demo&" + b"x" * 100_000
    reply = await ask(proxy, "\r\n".join([f"POST http://127.0.0.1:{registry.port}/packages/upload HTTP/1.1",
                                          f"Content-Length: {len(body)}", "", ""]), body)
    assert (reply.status, reply.body) == (200, b"got " + body)


async def test_a_connect_tunnel_carries_bytes_both_ways(proxy: egress.Proxy, registry: Registry) -> None:
    reader, writer = await tunnel(proxy, f"127.0.0.1:{registry.port}")
    writer.write(b"GET /packages/demo HTTP/1.1\r\nHost: registry\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(BOUND_S):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(PACKAGE)


async def test_a_host_not_on_the_allowlist_is_refused_with_a_message_an_agent_can_act_on(
        proxy: egress.Proxy) -> None:
    message = "egress refused: example.com is not on the setup allowlist (SANDBOX_SETUP_ALLOW)"
    reply = await ask(proxy, get("http://example.com/simple/"))
    assert (reply.status, reply.phrase, reply.body) == (403, message, message.encode() + b"\n")
    connect = await ask(proxy, "CONNECT example.com:8443 HTTP/1.1\r\n\r\n")
    assert connect.status == 403 and "example.com:8443 is not on the setup allowlist" in connect.phrase
    assert len(proxy.refused) == 2 and "GET example.com:80" in proxy.refused[0]


async def test_localhost_allowlisted_by_name_is_refused_because_it_resolves_to_loopback(
        registry: Registry, socket_dir: Path) -> None:
    proxy = await egress.start(socket_dir / "e.sock", Allowlist.parse(f"localhost:{registry.port}"))
    try:
        reply = await ask(proxy, get(f"http://localhost:{registry.port}/packages/demo"))
    finally:
        await proxy.close()
    assert reply.status == 403 and "localhost resolves to" in reply.phrase and "a loopback address" in reply.phrase
    assert registry.seen == []


@pytest.mark.parametrize("target", ["10.0.0.5:80", "169.254.169.254:80", "[::1]:{port}", "[::ffff:127.0.0.1]:{port}",
                                    "127.0.0.2:{port}", "127.0.0.1:80"])
async def test_an_address_not_named_with_its_port_is_refused(proxy: egress.Proxy, registry: Registry,
                                                             target: str) -> None:
    target = target.format(port=registry.port)
    assert (await ask(proxy, get(f"http://{target}/packages/demo"))).status == 403
    assert (await ask(proxy, f"CONNECT {target} HTTP/1.1\r\n\r\n")).status == 403
    assert registry.seen == []


@pytest.mark.parametrize("head", [
    "GET /packages/demo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "GET https://pypi.org/simple/ HTTP/1.1\r\n\r\n",
    "GET ftp://pypi.org/ HTTP/1.1\r\n\r\n",
    "hello\r\n\r\n",
    "GET http://pypi.org/\r\n\r\n",
    "GET http://pypi.org/ HTTP/2.0\r\n\r\n",
    "GET http://pypi.org/ HTTP/1.1\r\nno colon here\r\n\r\n",
    "GET http://user@pypi.org/ HTTP/1.1\r\n\r\n",
    "GET http://pypi.org:99999/ HTTP/1.1\r\n\r\n",
    "GET http://pypi_org/ HTTP/1.1\r\n\r\n",
    "CONNECT pypi.org HTTP/1.1\r\n\r\n",
    "CONNECT [pypi.org]:443 HTTP/1.1\r\n\r\n",
])
async def test_a_request_the_proxy_cannot_carry_gets_400(proxy: egress.Proxy, head: str) -> None:
    reply = await ask(proxy, head)
    assert reply.status == 400 and reply.phrase.startswith("egress refused: ")
    assert reply.body == reply.phrase.encode() + b"\n"


async def test_an_https_url_in_absolute_form_is_told_to_use_connect(proxy: egress.Proxy) -> None:
    assert "use CONNECT" in (await ask(proxy, "GET https://pypi.org/simple/ HTTP/1.1\r\n\r\n")).phrase


async def test_a_head_over_16_kib_gets_431(proxy: egress.Proxy) -> None:
    reply = await ask(proxy, get("http://pypi.org/", "X-Filler: " + "a" * 17_000))
    assert reply.status == 431


async def test_a_client_that_never_finishes_its_head_gets_408(socket_dir: Path) -> None:
    proxy = await egress.start(socket_dir / "e.sock", Allowlist.parse("pypi.org"), limits=EgressLimits(head_s=0.2))
    try:
        assert (await ask(proxy, "GET http://pypi.org/ HTTP/1.1\r\n")).status == 408
    finally:
        await proxy.close()


async def test_an_upstream_that_refuses_the_connection_gets_502_with_the_reason(socket_dir: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        proxy = await egress.start(socket_dir / "e.sock", Allowlist.parse(f"127.0.0.1:{port}"))
        try:
            reply = await ask(proxy, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n")
        finally:
            await proxy.close()
    assert reply.status == 502 and f"cannot connect to 127.0.0.1:{port}" in reply.phrase
    assert "Connection refused" in reply.phrase


async def test_connections_beyond_the_limit_get_503_until_one_ends(registry: Registry, socket_dir: Path) -> None:
    proxy = await egress.start(socket_dir / "e.sock", Allowlist.parse(f"127.0.0.1:{registry.port}"),
                               limits=EgressLimits(tunnels=2))
    target = f"127.0.0.1:{registry.port}"
    held = [await tunnel(proxy, target) for _ in range(2)]
    try:
        reply = await ask(proxy, f"CONNECT {target} HTTP/1.1\r\n\r\n")
        assert reply.status == 503 and "2 connections" in reply.phrase
        held[0][1].close()
        async with asyncio.timeout(BOUND_S):
            while (await ask(proxy, f"CONNECT {target} HTTP/1.1\r\n\r\n", half_close=True)).status == 503:
                await asyncio.sleep(0.01)
    finally:
        for _, writer in held:
            writer.close()
        await proxy.close()


async def test_an_idle_tunnel_is_closed(registry: Registry, socket_dir: Path) -> None:
    proxy = await egress.start(socket_dir / "e.sock", Allowlist.parse(f"127.0.0.1:{registry.port}"),
                               limits=EgressLimits(idle_s=0.3))
    try:
        reader, writer = await tunnel(proxy, f"127.0.0.1:{registry.port}")
        async with asyncio.timeout(BOUND_S):
            assert await reader.read() == b""
        writer.close()
    finally:
        await proxy.close()


async def test_closing_the_proxy_ends_its_tunnels_and_removes_its_private_socket(
        proxy: egress.Proxy, registry: Registry) -> None:
    assert proxy.path.stat().st_mode & 0o777 == 0o600
    reader, writer = await tunnel(proxy, f"127.0.0.1:{registry.port}")
    await proxy.close()
    async with asyncio.timeout(BOUND_S):
        assert await reader.read() == b""
    writer.close()
    assert not proxy.path.exists()


# Through a real jail, as the setup phase runs.

needs_jail = pytest.mark.skipif(shutil.which("bwrap") is None or not os.access(egress.PYTHON, os.X_OK),
                                reason="the jail tests need bubblewrap (apt-get install bubblewrap) and "
                                       "/usr/bin/python3")


def host_address() -> str:
    """This machine's address on its default route, or loopback where it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet leaves: a UDP connect only picks the route
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


async def in_jail(socket_path: Path, script: str, *extra: str) -> subprocess.CompletedProcess:
    """Run `script` in a bubblewrap jail like the local backend's, with the proxy's socket at /run/tb-egress.sock."""
    argv = ["bwrap", "--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for top in ("/bin", "/sbin", "/lib", "/lib64"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run",
             "--ro-bind", str(socket_path), "/run/tb-egress.sock", *extra,
             "--unshare-all", "--unshare-user", "--uid", "1000", "--gid", "1000", "--die-with-parent",
             "--new-session", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
             "--", "bash", "-c", script]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    # Bounded well below the bridge's own life: the jail's output must end when its script does.
    async with asyncio.timeout(BOUND_S * 2):
        out, err = await proc.communicate()
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode("latin-1"), err.decode("latin-1"))


@needs_jail
async def test_a_jailed_setup_downloads_through_the_proxy_in_both_forms(proxy: egress.Proxy,
                                                                      registry: Registry) -> None:
    url = f"http://127.0.0.1:{registry.port}/packages/demo"
    # A no_proxy naming loopback, as many images set, would send curl to the jail's own 127.0.0.1 instead.
    script = "export no_proxy=127.0.0.1 NO_PROXY=localhost\n" + egress.jail_prefix()
    ran = await in_jail(proxy.path, script + f"curl -sS {url} && echo && curl -sS --proxytunnel {url}")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.encode("latin-1") == PACKAGE + b"\n" + PACKAGE
    assert len(registry.seen) == 2


@needs_jail
async def test_a_jailed_request_to_a_host_off_the_list_prints_the_refusal(proxy: egress.Proxy) -> None:
    ran = await in_jail(proxy.path, egress.jail_prefix() + "curl -sS http://example.com/simple/")
    assert "egress refused: example.com is not on the setup allowlist (SANDBOX_SETUP_ALLOW)" in ran.stdout
    assert proxy.refused and "example.com" in proxy.refused[0]


@needs_jail
async def test_a_jailed_setup_has_no_route_around_the_proxy(proxy: egress.Proxy, registry: Registry) -> None:
    address = host_address()
    app_runner = web.AppRunner(web.Application())
    await app_runner.setup()
    site = web.TCPSite(app_runner, address, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        url = f"http://{address}:{port}/"
        host = await asyncio.create_subprocess_exec("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url,
                                                    stdout=subprocess.PIPE)
        assert (await host.communicate())[0] == b"404"  # reachable from the host itself
        ran = await in_jail(proxy.path, egress.jail_prefix() + f"curl -sS --noproxy '*' -m 5 {url}")
    finally:
        await app_runner.cleanup()
    assert ran.returncode != 0 and ran.stdout == ""


@needs_jail
async def test_setup_without_python_says_what_to_install(proxy: egress.Proxy) -> None:
    ran = await in_jail(proxy.path, egress.jail_prefix() + "echo unreachable",
                        "--ro-bind", "/dev/null", egress.PYTHON)
    assert ran.returncode == 1 and "unreachable" not in ran.stdout
    assert egress.MISSING_PYTHON in ran.stderr
