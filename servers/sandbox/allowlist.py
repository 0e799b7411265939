"""Where a setup may connect: the operator's allowlist, and the addresses a host name may lead to.

A host must be on the allowlist, and a host name must resolve to public addresses only, which the proxy then
connects to itself (never resolving again, so a rebinding answer cannot move the connection). Only an IP literal the
operator named together with its port may be private: that is how a package index on this machine is reached.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> addresses, as text

ALLOW_ENV = "SANDBOX_SETUP_ALLOW"
DEFAULT_ALLOW = ("pypi.org", "files.pythonhosted.org", "registry.npmjs.org", "registry.yarnpkg.com",
                 "repo.yarnpkg.com", "proxy.golang.org", "sum.golang.org")
FORMS = ("a host name (pypi.org) or *.domain for its subdomains, each with an optional :port (80 and 443 without "
         "one), or an IP address with its port (127.0.0.1:8080, [::1]:8080)")
PROBLEMS = (("is_unspecified", "an unspecified address"), ("is_loopback", "a loopback address"),
            ("is_link_local", "a link-local address"), ("is_multicast", "a multicast address"),
            ("is_private", "a private address"), ("is_reserved", "a reserved address"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")
_AUTHORITY = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(?::(\d{1,5}))?")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class Refused(Exception):
    """A request the proxy will not carry: its HTTP status, and a reason the agent can act on."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def address_of(host: str) -> IPAddress | None:
    """`host` as an IP address, or None for a name."""
    try:
        return None if "%" in host else ipaddress.ip_address(host)
    except ValueError:
        return None


def is_name(host: str) -> bool:
    """Whether `host` is a well-formed DNS name (not an address in any shorthand)."""
    labels = host.split(".")
    # A numeric last label is an address in some shorthand (127.1), never a name.
    return len(host) <= 253 and all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def split_authority(text: str) -> tuple[str, int | None]:
    """`host[:port]` or `[IPv6][:port]` as a lowercased host (an address in canonical form) and the port."""
    match = _AUTHORITY.fullmatch(text.strip().lower().replace(".:", ":").rstrip("."))
    port = int(match[2]) if match and match[2] else None
    if not match or port is not None and not 0 < port < 65536:
        raise ValueError(text)
    host = match[1].removeprefix("[").removesuffix("]")
    address = address_of(host)
    if match[1].startswith("[") != isinstance(address, ipaddress.IPv6Address):
        raise ValueError(text)
    return (str(address) if address else host), port


@dataclass(frozen=True)
class Rule:
    host: str  # a name, ".domain" for a wildcard's subdomains, or an address
    port: int | None  # None: 80 and 443
    address: IPAddress | None = None

    @classmethod
    def parse(cls, entry: str) -> Rule:
        """One allowlist entry; ValueError names it and the forms accepted."""
        try:
            host, port = split_authority(entry)
            if (address := address_of(host)) is not None and port is not None:
                return cls(host, port, address)
            if address is None and is_name(host.removeprefix("*.")):
                return cls(host.removeprefix("*"), port)
        except ValueError:
            pass
        raise ValueError(f"setup allowlist entry {entry.strip()!r} is not {FORMS}")


class Allowlist:
    """The hosts and ports a setup phase may reach."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = tuple(rules)

    @classmethod
    def parse(cls, entries: str | Iterable[str]) -> Allowlist:
        """An allowlist from comma-separated entries, or from a list of them; ValueError names a bad entry."""
        return cls(Rule.parse(e) for e in (entries.split(",") if isinstance(entries, str) else entries) if e.strip())

    def match(self, host: str, port: int) -> Rule | None:
        """The rule that lets `host` (as `split_authority` gives it) be reached on `port`, if any."""
        address = address_of(host)
        for rule in self.rules:
            if address is not None or rule.address is not None:
                if rule.address == address and rule.port == port:
                    return rule
            elif (host == rule.host or rule.host.startswith(".") and host.endswith(rule.host)) and (
                    port == rule.port or rule.port is None and port in (80, 443)):
                return rule
        return None


def address_problem(address: IPAddress) -> str | None:
    """Why a host name may not lead to `address` ("a private address"), or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (
            ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) if address in NAT64 else None)
        if embedded is not None:  # what a mapped, 6to4 or NAT64 address reaches is its IPv4 part
            return address_problem(embedded)
    return next((problem for test, problem in PROBLEMS if getattr(address, test)),
                None if address.is_global else "not a public address")


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def shown(host: str, port: int) -> str:
    """`host:port` as a person writes it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def destinations(host: str, port: int, allow: Allowlist, resolve: Resolver | None = None) -> list[IPAddress]:
    """The addresses the proxy may connect to for `host:port`; Refused says why there are none."""
    if (rule := allow.match(host, port)) is None:
        raise Refused(403, f"{host if port in (80, 443) else shown(host, port)} is not on the setup allowlist "
                           f"({ALLOW_ENV})")
    if rule.address is not None:
        return [rule.address]
    try:
        addresses = list(dict.fromkeys(ipaddress.ip_address(a) for a in await (resolve or _getaddrinfo)(host, port)))
    except OSError as exc:
        raise Refused(502, f"cannot resolve {host}: {exc.strerror or exc}") from None
    for address in addresses:
        if problem := address_problem(address):
            raise Refused(403, f"{host} resolves to {address}, {problem}; a host name may only reach public ones")
    if not addresses:
        raise Refused(502, f"{host} resolves to no address")
    return addresses
