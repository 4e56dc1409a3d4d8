"""Where webhooks may go: the SURFING_WEBHOOK_ALLOW rules, the submit-time URL check, the
delivery-time resolve that keeps callbacks off private networks (SSRF), and a POST pinned to
the address that was checked (no second DNS lookup between the check and the connection).
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from app.settings import Settings

SIGNATURE_HEADER = "X-Surfing-Signature"
MAX_URL = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_URL_CHARS = re.compile(r"[!-~]+")  # printable ASCII: nothing to smuggle into a request line
_NAME = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")
DISABLED = (
    "webhooks are disabled on this server: an operator enables them by setting "
    "SURFING_WEBHOOK_ALLOW (comma-separated host[:port] patterns or CIDRs callbacks may go to) "
    "and SURFING_WEBHOOK_SECRET (the signing key)"
)


class WebhookRefused(ValueError):
    """A callback URL (or what its host resolves to) that this server will not call."""


@dataclass(frozen=True)
class AllowRule:
    """One SURFING_WEBHOOK_ALLOW entry: a host name (`*.` = any subdomain) or a network, and
    optionally the one port allowed."""

    name: str | None
    network: IPNetwork | None
    port: int | None

    def allows(self, host: str, port: int) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.network is not None:
            ip = _ip(host)
            return ip is not None and ip in self.network
        assert self.name is not None
        if self.name.startswith("*."):
            return host.endswith(self.name[1:])
        return host == self.name

    def names_address(self, ip: IPAddress, port: int) -> bool:
        """Whether this entry explicitly allows a non-public resolved address."""
        return self.network is not None and ip in self.network and self.port in (None, port)


def _ip(host: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"SURFING_WEBHOOK_ALLOW: bad port in {entry!r}")
    return int(text)


def _rule(entry: str) -> AllowRule:
    if "/" in entry:
        try:
            return AllowRule(None, ipaddress.ip_network(entry, strict=False), None)
        except ValueError:
            raise ValueError(f"SURFING_WEBHOOK_ALLOW: {entry!r} is not a CIDR") from None
    host, port = entry, None
    if entry.startswith("["):  # [v6] or [v6]:port
        host, _, rest = entry[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"SURFING_WEBHOOK_ALLOW: bad entry {entry!r}")
            port = _port(rest[1:], entry)
    elif entry.count(":") == 1:
        host, text = entry.split(":")
        port = _port(text, entry)
    ip = _ip(host)
    if ip is not None:
        return AllowRule(None, ipaddress.ip_network(ip), port)
    if not _NAME.fullmatch(host):
        raise ValueError(f"SURFING_WEBHOOK_ALLOW: {entry!r} is not a host[:port] or a CIDR")
    return AllowRule(host, None, port)


def parse_allow(spec: str) -> list[AllowRule]:
    """SURFING_WEBHOOK_ALLOW as rules; ValueError names a malformed entry."""
    return [_rule(e.strip().lower()) for e in spec.split(",") if e.strip()]


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # lower case, IPv6 without brackets
    port: int
    path: str  # with the query


def parse_target(url: str) -> Target:
    """The parts of a callback URL, or WebhookRefused saying what is wrong with it."""
    if len(url) > MAX_URL or not _URL_CHARS.fullmatch(url):
        raise WebhookRefused(
            f"callback_url must be printable ASCII without spaces, at most {MAX_URL} characters"
        )
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookRefused("callback_url must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise WebhookRefused(
            "callback_url must not carry credentials (user:password@); receivers authenticate "
            f"the server by the {SIGNATURE_HEADER} header"
        )
    host = parts.hostname
    if not host:
        raise WebhookRefused("callback_url has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise WebhookRefused("callback_url has an invalid port") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme, host.lower(), port, path)


def check_callback_url(url: str, settings: Settings) -> Target:
    """Submit-time check: scheme, no credentials, host allowed. No DNS here: what the host
    resolves to is checked when the POST is made."""
    rules = parse_allow(settings.webhook_allow)
    if not rules or settings.webhook_secret is None:
        raise WebhookRefused(DISABLED)
    target = parse_target(url)
    if not any(r.allows(target.host, target.port) for r in rules):
        raise WebhookRefused(
            f"callback host {target.host} port {target.port} is not allowed on this server "
            "(SURFING_WEBHOOK_ALLOW)"
        )
    return target


def resolve(target: Target, rules: list[AllowRule]) -> str:
    """The address to connect to: every address the host has must be public or named by an
    address/CIDR entry (a name entry never lets a request reach a private network)."""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ConnectionError(f"cannot resolve {target.host}: {e}") from None
    addresses: list[str] = []
    for *_, sockaddr in infos:
        ip = _ip(str(sockaddr[0]))
        if ip is None:
            continue
        public = ip.is_global and not ip.is_multicast
        if not public and not any(r.names_address(ip, target.port) for r in rules):
            raise WebhookRefused(
                f"{target.host} resolves to {ip}, which is not a public address; an address or "
                "CIDR entry in SURFING_WEBHOOK_ALLOW must name it"
            )
        addresses.append(str(ip))
    if not addresses:
        raise ConnectionError(f"{target.host} has no address")
    return addresses[0]


def post(target: Target, address: str, body: bytes, headers: dict[str, str], timeout: float
         ) -> tuple[int, str]:  # fmt: skip
    """POST to the checked `address` (TLS still verifies the host name); (status, reason)."""
    conn: http.client.HTTPConnection
    if target.scheme == "https":
        context = ssl.create_default_context()
        conn = http.client.HTTPSConnection(target.host, target.port, timeout=timeout,
                                           context=context)  # fmt: skip
    else:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)

    def pinned(addr: tuple[str, int], timeout: Any = None, source: Any = None) -> socket.socket:
        return socket.create_connection((address, addr[1]), timeout, source)

    conn._create_connection = pinned  # type: ignore[attr-defined]  # no second DNS lookup
    try:
        conn.request("POST", target.path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(64 * 1024)
        return response.status, response.reason
    finally:
        conn.close()
