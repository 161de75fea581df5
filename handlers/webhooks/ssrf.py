"""SSRF guard for webhook URLs, the resolving half: vet the address before anything is sent.

The rules and the pure check (no DNS) are :mod:`streams.urlguard` (:func:`check_webhook_url`
refuses what the URL alone shows to be unsafe, at submission and before each attempt).
:class:`GuardedResolver` is the aiohttp resolver of the sender's session: it resolves a name
once, refuses the delivery if *any* address is unsafe, and hands the connector exactly the
vetted addresses, so the Host header and the TLS name stay the URL's while the connection goes
to the address that was checked (no second lookup an attacker could rebind).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

from aiohttp.abc import AbstractResolver, ResolveResult

from sop_llm.streams.urlguard import (
    AllowList,
    IPAddress,
    Lookup,
    as_allow,
    check_webhook_url,
    vet_addresses,
)


async def system_lookup(host: str, port: int, family: int) -> list[IPAddress]:
    """Every address of ``host`` from the system resolver (one ``getaddrinfo`` call)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, family=family, type=socket.SOCK_STREAM
    )
    out: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        addr = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        if addr not in out:
            out.append(addr)
    return out


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that resolves once, vets every address, and returns only those.

    Use it with ``TCPConnector(resolver=..., use_dns_cache=False)`` so every new connection is
    vetted. aiohttp does not call resolvers for literal addresses: vet those with
    :func:`check_webhook_url` before the request. Refusals raise
    :class:`WebhookURLRefusedError` (not an ``OSError``, so aiohttp passes it through).
    """

    def __init__(
        self,
        *,
        allow: AllowList | Iterable[str] = (),
        lookup: Lookup = system_lookup,
        timeout_s: float = 10.0,
    ) -> None:
        self._allow = as_allow(allow)
        self._lookup = lookup
        self._timeout_s = timeout_s

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        check_webhook_url(f"http://{host}/", self._allow)
        async with asyncio.timeout(self._timeout_s):
            addrs = await self._lookup(host, port, int(family))
        vet_addresses(host, addrs, self._allow)
        numeric = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        return [
            ResolveResult(
                hostname=host, host=str(a), port=port,
                family=socket.AF_INET if a.version == 4 else socket.AF_INET6,
                proto=socket.IPPROTO_TCP, flags=numeric,
            )
            for a in addrs
        ]  # fmt: skip

    async def close(self) -> None:
        return None
