"""The SSRF guard, exercised without sending a packet anywhere but loopback."""

from __future__ import annotations

import ipaddress
import socket

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sop_llm.handlers.webhooks.ssrf import GuardedResolver, system_lookup
from sop_llm.schemas.errors import InvalidTaskError
from sop_llm.streams.urlguard import (
    AllowList,
    IPAddress,
    WebhookURLRefusedError,
    check_webhook_url,
    unsafe_reason,
    vet_addresses,
)


@pytest.fixture(autouse=True)
def connects(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Tripwire: every socket connect is recorded; one to a non-loopback address fails."""
    seen: list[object] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(addr: object) -> None:
        seen.append(addr)
        if isinstance(addr, tuple):
            host = ipaddress.ip_address(str(addr[0]).partition("%")[0])
            if not host.is_loopback:
                raise AssertionError(f"the test tried to connect to {addr}")

    def connect(self: socket.socket, addr: object) -> None:
        guard(addr)
        real_connect(self, addr)  # type: ignore[arg-type]

    def connect_ex(self: socket.socket, addr: object) -> int:
        guard(addr)
        return real_connect_ex(self, addr)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return seen


REFUSED = [
    ("http://127.0.0.1:8080/hook", "loopback"),
    ("http://10.0.0.1/hook", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://169.254.1.1/", "link-local"),
    ("http://100.64.0.1/", "CGNAT"),
    ("http://100.100.100.200/", "metadata"),
    ("http://0.0.0.0:80/", "unspecified"),
    ("http://[::1]:8080/", "loopback"),
    ("http://[fd00::1]/", "unique-local"),
    ("http://[fd00:ec2::254]/", "metadata"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[::ffff:127.0.0.1]/", "IPv4-mapped"),
    ("http://[::ffff:8.8.8.8]/", "IPv4-mapped"),
    ("http://[2002:0a00:0001::1]/", "embedding a private"),
    ("http://[64:ff9b::a9fe:a9fe]/", "embedding a cloud metadata"),
    ("http://224.0.0.1/", "multicast"),
    ("http://localhost:8080/", "names this host"),
    ("http://api.localhost/", "names this host"),
    ("http://metadata.google.internal/computeMetadata/v1/", "metadata service"),
    ("http://2130706433/", "numeric host form"),
    ("http://0x7f000001/", "numeric host form"),
    ("http://127.1/", "numeric host form"),
    ("ftp://example.com/x", "only http"),
    ("file:///etc/passwd", "only http"),
    ("http:///nohost", "no host"),
    ("http://example.com:99999/", "malformed"),
]


@pytest.mark.parametrize(("url", "why"), REFUSED)
def test_unsafe_urls_are_refused_with_a_clear_error(url: str, why: str) -> None:
    with pytest.raises(WebhookURLRefusedError, match=why) as info:
        check_webhook_url(url, ())
    # an invalid task at submission, with the wire error code producers branch on
    assert isinstance(info.value, InvalidTaskError)
    assert info.value.code.value == "invalid_event"


@pytest.mark.parametrize(
    "url",
    ["https://example.com/hook", "http://hooks.example.org:8443/a?b=c", "http://93.184.216.34/",
     "https://[2606:4700:4700::1111]/x", "http://internal-service/"],
)  # fmt: skip
def test_public_urls_pass(url: str) -> None:
    # a single-label name passes here: it is vetted when it is resolved, at delivery
    check_webhook_url(url, ())


@pytest.mark.parametrize(
    ("url", "allow"),
    [
        ("http://127.0.0.1:8080/", ["127.0.0.1"]),
        ("http://10.1.2.3/", ["10.0.0.0/8"]),
        ("http://[::1]:9/", ["[::1]"]),
        ("http://localhost:8080/", ["LOCALHOST"]),
        ("http://hooks.corp.internal/", [".corp.internal"]),
        ("http://169.254.169.254/", ["169.254.169.254/32"]),
    ],
)
def test_allow_list_lifts_the_guard(url: str, allow: list[str]) -> None:
    check_webhook_url(url, allow)


def test_allow_list_is_exact() -> None:
    with pytest.raises(WebhookURLRefusedError):
        check_webhook_url("http://10.0.0.2/", ["10.0.0.1"])
    with pytest.raises(WebhookURLRefusedError):
        check_webhook_url("http://[::ffff:127.0.0.1]/", ["127.0.0.1"])
    with pytest.raises(ValueError, match="invalid network"):
        AllowList.parse(["10.0.0.0/33"])


@given(
    st.one_of(
        st.ip_addresses(network="10.0.0.0/8"), st.ip_addresses(network="127.0.0.0/8"),
        st.ip_addresses(network="172.16.0.0/12"), st.ip_addresses(network="192.168.0.0/16"),
        st.ip_addresses(network="169.254.0.0/16"), st.ip_addresses(network="100.64.0.0/10"),
        st.ip_addresses(network="fc00::/7"), st.ip_addresses(network="fe80::/10"),
        st.ip_addresses(network="::ffff:0:0/96"), st.ip_addresses(network="::1/128"),
    )
)  # fmt: skip
def test_every_internal_address_is_unsafe(addr: IPAddress) -> None:
    assert unsafe_reason(addr) is not None


def test_any_unsafe_address_refuses_the_host() -> None:
    public, private = ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.0.0.1")
    vet_addresses("ok.example", [public], ())
    refused = r"mixed\.example \(10\.0\.0\.1\) is a private"
    with pytest.raises(WebhookURLRefusedError, match=refused):
        vet_addresses("mixed.example", [public, private], ())
    with pytest.raises(WebhookURLRefusedError, match="no address"):
        vet_addresses("empty.example", [], ())


def fake_dns(table: dict[str, list[str]]) -> GuardedResolver:
    async def lookup(host: str, port: int, family: int) -> list[IPAddress]:
        return [ipaddress.ip_address(a) for a in table[host]]

    return GuardedResolver(allow=AllowList.parse(["203.0.113.0/24"]), lookup=lookup)


async def test_resolver_returns_only_vetted_addresses() -> None:
    resolver = fake_dns({"hooks.example": ["93.184.216.34", "2606:4700::1"]})
    got = await resolver.resolve("hooks.example", 443, socket.AF_UNSPEC)
    assert [(r["hostname"], r["host"], r["port"]) for r in got] == [
        ("hooks.example", "93.184.216.34", 443),
        ("hooks.example", "2606:4700::1", 443),
    ]
    assert got[1]["family"] == socket.AF_INET6


@pytest.mark.parametrize(
    "addrs", [["10.0.0.1"], ["93.184.216.34", "127.0.0.1"], ["169.254.169.254"], ["::1"]]
)
async def test_resolver_refuses_a_name_with_any_internal_address(addrs: list[str]) -> None:
    with pytest.raises(WebhookURLRefusedError):
        await fake_dns({"rebind.example": addrs}).resolve("rebind.example", 80)


async def test_resolver_honours_the_allowed_network() -> None:
    got = await fake_dns({"lab.example": ["203.0.113.7"]}).resolve("lab.example", 80)
    assert got[0]["host"] == "203.0.113.7"


async def test_a_name_resolving_to_loopback_is_refused() -> None:
    # the real system resolver (localhost is answered locally, no traffic)
    addrs = await system_lookup("localhost", 80, socket.AF_UNSPEC)
    assert addrs and all(a.is_loopback for a in addrs)
    with pytest.raises(WebhookURLRefusedError, match="loopback"):
        vet_addresses("localhost", addrs, ())
    vet_addresses("localhost", addrs, ["127.0.0.0/8", "::1"])


async def test_localhost_is_refused_through_aiohttp_before_connecting(
    connects: list[object],
) -> None:
    # refused by name before any lookup, and a rebinding name after its lookup: no connect
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(), use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(WebhookURLRefusedError, match="localhost"):
            await session.post("http://localhost:9/hook", data=b"{}")
    evil = fake_dns({"evil.example": ["10.0.0.1"]})
    c2 = aiohttp.TCPConnector(resolver=evil, use_dns_cache=False)
    async with aiohttp.ClientSession(connector=c2) as s2:
        with pytest.raises(WebhookURLRefusedError, match="private"):
            await s2.post("http://evil.example/hook", data=b"{}")
    assert connects == []
