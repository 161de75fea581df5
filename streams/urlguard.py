"""The SSRF rules for webhook URLs, without any I/O (usable at submission and at delivery).

Unsafe: loopback, private, link-local, CGNAT (100.64/10), unique-local (fc00::/7), IPv4-mapped
IPv6, cloud metadata, unspecified, multicast, reserved and anything else not globally
routable, including 6to4/Teredo/NAT64 addresses that embed such an IPv4 address. An allow-list
entry (a host name, ``.suffix`` for a domain's sub-names, an address or a CIDR network) lifts it.
The resolving half (one lookup, every address vetted, connect to what was vetted) is
``handlers/webhooks/ssrf.py``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from sop_llm.schemas.errors import InvalidTaskError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Lookup = Callable[[str, int, int], Awaitable[list[IPAddress]]]

_net = ipaddress.ip_network
METADATA_ADDRESSES: Final = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
    )
)
_CGNAT: Final = _net("100.64.0.0/10")
_ULA: Final = _net("fc00::/7")
_NAT64: Final = _net("64:ff9b::/96")
# names that only ever mean "this host" or "the cloud's metadata service"
_INTERNAL_NAMES: Final = frozenset(
    {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback",
     "metadata", "metadata.google.internal", "metadata.goog", "instance-data",
     "instance-data.ec2.internal"}
)  # fmt: skip
_INTERNAL_SUFFIXES: Final = (".localhost",)


class WebhookURLRefusedError(InvalidTaskError):
    """A webhook URL the SSRF guard will not send to (or that is not an http(s) URL)."""


@dataclass(frozen=True, slots=True)
class AllowList:
    """Hosts and networks the guard lets through, parsed once."""

    hosts: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """Entries: ``host.name``, ``.example.com`` (any sub-name), ``10.1.2.3``, ``10.0.0.0/8``,
        ``::1``, ``[::1]``. Raises ``ValueError`` for a malformed network (``10.0.0.0/33``)."""
        hosts: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().lower().strip("[]")
            if not entry:
                continue
            if "/" in entry:
                try:
                    networks.append(_net(entry, strict=False))
                except ValueError as exc:
                    raise ValueError(f"invalid network in the webhook allow-list: {raw!r}") from exc
                continue
            try:
                networks.append(_net(ipaddress.ip_address(entry)))
            except ValueError:
                name = entry.rstrip(".")
                if name.startswith("*."):
                    name = name[1:]
                if name.startswith("."):
                    suffixes.append(name)
                else:
                    hosts.add(name)
        return cls(frozenset(hosts), tuple(suffixes), tuple(networks))

    def permits_host(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        return name in self.hosts or any(name.endswith(s) for s in self.suffixes)

    def permits_address(self, addr: IPAddress) -> bool:
        return any(addr.version == n.version and addr in n for n in self.networks)


def as_allow(allow: AllowList | Iterable[str]) -> AllowList:
    return allow if isinstance(allow, AllowList) else AllowList.parse(allow)


def unsafe_reason(addr: IPAddress) -> str | None:
    """Why ``addr`` must not be connected to, or ``None`` for a public address."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            inner = unsafe_reason(embedded)
            if inner is not None:
                return f"an IPv6 address embedding {inner}"
    if addr in METADATA_ADDRESSES:
        return "a cloud metadata address"
    checks: tuple[tuple[bool, str], ...] = (
        (addr.is_loopback, "a loopback address"),
        (addr.is_unspecified, "an unspecified address"),
        (addr.is_link_local, "a link-local address"),
        (addr.version == 4 and addr in _CGNAT, "a CGNAT (shared, 100.64/10) address"),
        (addr.version == 6 and addr in _ULA, "a unique-local address"),
        (addr.is_multicast, "a multicast address"),
        (addr.is_private, "a private address"),
        (addr.is_reserved, "a reserved address"),
        (not addr.is_global, "not a globally routable address"),
    )
    return next((why for hit, why in checks if hit), None)


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def vet_addresses(host: str, addrs: Iterable[IPAddress], allow: AllowList | Iterable[str]) -> None:
    """Refuse unless every address of ``host`` is public or allow-listed (or ``host`` is).

    Raises :class:`WebhookURLRefusedError` naming the first unsafe address; an empty list is
    refused too (nothing was vetted).
    """
    rules = as_allow(allow)
    if rules.permits_host(host):
        return
    seen = False
    for addr in addrs:
        seen = True
        reason = unsafe_reason(addr)
        if reason is not None and not rules.permits_address(addr):
            shown = host if host == str(addr) else f"{host} ({addr})"
            raise WebhookURLRefusedError(
                f"webhook URL refused: {shown} is {reason}; "
                "add it to SOP_WEBHOOK_ALLOW to permit it"
            )
    if not seen:
        raise WebhookURLRefusedError(f"webhook URL refused: {host} has no address")


def _looks_numeric(host: str) -> bool:
    # 2130706433, 0x7f000001, 127.1, 0177.0.0.1: forms getaddrinfo maps onto an address
    labels = host.split(".")
    return all(lbl and (lbl.isdigit() or lbl.lower().startswith("0x")) for lbl in labels)


def check_webhook_url(url: str, allow: AllowList | Iterable[str] = ()) -> None:
    """Refuse a webhook URL that is unsafe on its face; never resolves a name.

    Checks the scheme (http/https), that a host is present, literal IP addresses (vetted like
    resolved ones), numeric host forms other than dotted-quad, and names that always mean this
    host or a metadata service (``localhost``, ``*.localhost``, ``metadata.google.internal``...).
    A name that merely *resolves* to an internal address passes here and is refused at delivery.
    Raises :class:`WebhookURLRefusedError` (an ``InvalidTaskError``) with a clear message.
    """
    rules = as_allow(allow)
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise WebhookURLRefusedError(f"webhook URL refused: malformed URL ({exc})") from exc
    if parts.scheme not in ("http", "https"):
        raise WebhookURLRefusedError("webhook URL refused: only http:// and https:// URLs are sent")
    if not host:
        raise WebhookURLRefusedError("webhook URL refused: the URL has no host")
    host = host.rstrip(".")
    try:
        addr = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        addr = None
    if addr is not None:
        vet_addresses(str(addr), [addr], rules)
        return
    if rules.permits_host(host):
        return
    if _looks_numeric(host):
        raise WebhookURLRefusedError(
            f"webhook URL refused: {host!r} is a numeric host form; "
            "write the address as a dotted quad"
        )
    if host in _INTERNAL_NAMES or host.endswith(_INTERNAL_SUFFIXES):
        raise WebhookURLRefusedError(
            f"webhook URL refused: {host} names this host or a metadata service; "
            "add it to SOP_WEBHOOK_ALLOW to permit it"
        )
