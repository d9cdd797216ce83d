"""Which webhook targets are allowed (KIAPI_WEBHOOK_ALLOW; default loopback only).

An entry is a network (``127.0.0.0/8``, ``::1``, ``10.1.2.3``) or a host name (``localhost``,
``hooks.example.com``, ``*.example.com``). A URL is allowed when it is http(s) and its host is
an address inside a listed network, a listed name, or a name whose every address is inside a
listed network. The check runs at submit (422 otherwise) and again before every delivery
attempt on the addresses the name resolves to then (DNS rebinding): a listed name may not
resolve into loopback, private or link-local space that no network entry allows. Plain http
is sent to the address checked (the name goes in ``Host``), so a second lookup cannot move it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from kiapi_core.webhooks.spec import MAX_URL_CHARS

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_ALLOW = ["127.0.0.0/8", "::1", "localhost"]


class TargetRefused(ValueError):
    """A webhook URL this server will not call; the message names the rule."""


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int


@dataclass(frozen=True)
class AllowList:
    networks: tuple[Network, ...]
    names: tuple[str, ...]

    @classmethod
    def parse(cls, entries: list[str]) -> AllowList:
        networks: list[Network] = []
        names: list[str] = []
        for entry in entries:
            entry = entry.strip().lower()
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.append(entry.rstrip("."))
        return cls(tuple(networks), tuple(names))

    def describe(self) -> str:
        return ", ".join([*(str(n) for n in self.networks), *self.names]) or "nothing"

    def has_address(self, address: Address) -> bool:
        address = _unmapped(address)
        return any(address in n for n in self.networks if n.version == address.version)

    def has_name(self, host: str) -> bool:
        return any(
            host == name or (name.startswith("*.") and host.endswith(name[1:]))
            for name in self.names
        )


def _unmapped(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def parse_target(url: str) -> Target:
    """The parts of a webhook URL; TargetRefused unless http(s) with a host."""
    if len(url) > MAX_URL_CHARS:
        raise TargetRefused(f"must be at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise TargetRefused("must be an http:// or https:// URL")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise TargetRefused("must name a host")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("must not carry credentials (user:password@)")
    default = 443 if parts.scheme == "https" else 80
    return Target(url.strip(), parts.scheme, host.lower(), port or default)


def check_host(target: Target, allow: AllowList, addresses: list[Address] | None) -> None:
    """TargetRefused unless ``target`` is allowed, given what its host resolves to
    (``addresses``; None: not looked up, for an address literal or a listed name)."""
    literal = _literal(target.host)
    rule = f"KIAPI_WEBHOOK_ALLOW allows only {allow.describe()}"
    if literal is not None:
        if not allow.has_address(literal):
            raise TargetRefused(f"{target.host} is outside the allow-list ({rule})")
        return
    named = allow.has_name(target.host)
    if addresses is None:
        if not named:
            raise TargetRefused(f"host {target.host} is not allowed ({rule})")
        return
    if not addresses:
        raise TargetRefused(f"host {target.host} does not resolve")
    for address in addresses:
        if allow.has_address(address):
            continue
        internal = _unmapped(address)
        if not named:
            raise TargetRefused(f"host {target.host} resolves to {address}, outside ({rule})")
        if internal.is_loopback or internal.is_private or internal.is_link_local:
            raise TargetRefused(
                f"host {target.host} resolves to the internal address {address}, which no"
                f" network entry allows ({rule})"
            )


def resolve(target: Target) -> list[Address]:
    """Every address the target's host has now (blocking: never on the event loop)."""
    literal = _literal(target.host)
    if literal is not None:
        return [literal]
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except OSError:
        return []
    found: list[Address] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if address not in found:
            found.append(address)
    return found


def needs_lookup(target: Target, allow: AllowList) -> bool:
    """Whether the submit check must resolve the host (a name not listed by name)."""
    return _literal(target.host) is None and not allow.has_name(target.host)
