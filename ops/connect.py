"""The Redis client every sop-llm process uses: one server, Redis Sentinel or Redis Cluster.

The choice follows the settings, nothing else:

* **Cluster** when ``SOP_REDIS_URL`` starts with ``redis+cluster://`` (or ``rediss+cluster://``)
  or ``SOP_REDIS_CLUSTER=true``: a :class:`~redis.asyncio.cluster.RedisCluster` that finds the
  other nodes from the one in the URL. Every key of a namespace carries the hash tag
  ``{<namespace>}``, so a namespace lives in one slot and its multi-key scripts, pipelines and
  multi-stream reads all go to one node.
* **Sentinel** when ``SOP_REDIS_SENTINELS=host:port,...`` and ``SOP_REDIS_SENTINEL_MASTER`` are
  set: the master the sentinels name, found again after a failover. ``SOP_REDIS_URL`` is then
  optional and only lends its user name, password, database and ``rediss`` scheme (its host is
  ignored), e.g. ``redis://:secret@sentinel/0``.
* Otherwise the **one server** of ``SOP_REDIS_URL``.

Every mode gets the same timeouts, sized so that a frozen or vanished server is noticed within
seconds: a socket timeout 4 s above the longest blocking read the process makes (6 s with the
defaults: sop-llm's own blocking reads wait at most ``SOP_BLOCK_MS`` or 2 s), TCP keepalive
probes on idle links, 5 s to connect and a health check on links idle for 15 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, cast
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import SecretStr
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import AuthenticationError

from sop_llm.ops.settings import redact_url
from sop_llm.schemas.errors import BrokerUnavailableError
from sop_llm.streams.errors import TRANSIENT_ERRORS, describe
from sop_llm.streams.topology import Backoff

MAX_CONNECTIONS: Final = 64
POOL_TIMEOUT_S: Final = 20.0
LONGEST_CLIENT_BLOCK_S: Final = 2.0
"""The longest blocking read of the SDK, the sidecar and the CLI (they loop on shorter reads)."""
READ_MARGIN_S: Final = 4.0
"""A reply may come this long after a blocking read's end before the link counts as dead."""
SOCKET_TIMEOUT_S: Final = LONGEST_CLIENT_BLOCK_S + READ_MARGIN_S
CONNECT_TIMEOUT_S: Final = 5.0
HEALTH_CHECK_S: Final = 15

_CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# an idle link to a host that vanished is found dead after about 5 + 3 * 2 s
_KEEPALIVE: Final[dict[int, int]] = {
    option: value
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3))
    if (option := getattr(socket, name, None)) is not None
}


def _timeouts(socket_timeout_s: float) -> dict[str, Any]:
    return {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        "socket_keepalive_options": _KEEPALIVE,
        "health_check_interval": HEALTH_CHECK_S,
    }


def socket_timeout_for(settings: object) -> float:
    """The socket timeout for a process with these settings: :data:`READ_MARGIN_S` above its
    longest wait on Redis (the worker's ``block_ms``, the replicas' wait, the clients' reads)."""
    block_s = int(getattr(settings, "block_ms", 0)) / 1000
    replicas = int(getattr(settings, "durability_replicas", 0))
    wait_s = int(getattr(settings, "durability_timeout_ms", 0)) / 1000 if replicas else 0.0
    return max(LONGEST_CLIENT_BLOCK_S, block_s, wait_s) + READ_MARGIN_S


Mode = Literal["single", "sentinel", "cluster"]


class ConnectSettings(Protocol):
    """What this module reads from :class:`~ops.settings.Settings`. The deployment fields
    (``redis_cluster``, ``redis_sentinels``, ``redis_sentinel_master``) are read with
    ``getattr`` and their defaults, so a settings object without them means one server."""

    @property
    def redis_url(self) -> SecretStr | None: ...

    @property
    def redis_url_value(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Target:
    """Where to connect, decided from the settings (no I/O)."""

    mode: Mode
    url: str | None
    """``single``/``cluster``: the URL with a plain ``redis``/``rediss`` scheme; ``sentinel``:
    the optional URL that lends credentials and the database."""
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""

    def describe(self) -> str:
        """For logs: the mode and where, with any password hidden."""
        if self.mode == "sentinel":
            nodes = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"sentinel {self.master}@{nodes}"
        assert self.url is not None
        where = redact_url(self.url)
        return f"cluster {where}" if self.mode == "cluster" else where


def parse_sentinels(value: object) -> tuple[tuple[str, int], ...]:
    """``"h1:26379,h2:26379"`` (or a sequence of ``host:port``) as address pairs.

    Raises :class:`ValueError` on an entry without a valid port."""
    items = value.split(",") if isinstance(value, str) else list(cast("list[str]", value or ()))
    out: list[tuple[str, int]] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"SOP_REDIS_SENTINELS: {item!r} is not host:port")
        out.append((host.strip("[]"), int(port)))
    return tuple(out)


def target_for(settings: ConnectSettings) -> Target:
    """Decide the mode. Raises :class:`ValueError` on a half-configured Sentinel (sentinels
    without a master name or the reverse), on Sentinel combined with Cluster, and when no URL
    is set outside Sentinel mode."""
    sentinels = parse_sentinels(getattr(settings, "redis_sentinels", ()))
    master = getattr(settings, "redis_sentinel_master", None) or ""
    if bool(sentinels) != bool(master):
        raise ValueError("Sentinel needs both SOP_REDIS_SENTINELS and SOP_REDIS_SENTINEL_MASTER")
    secret = settings.redis_url
    raw = secret.get_secret_value() if secret is not None else None
    scheme = urlsplit(raw).scheme.lower() if raw else ""
    cluster = bool(getattr(settings, "redis_cluster", False)) or scheme in _CLUSTER_SCHEMES
    if sentinels:
        if cluster:
            raise ValueError("choose Redis Sentinel or Redis Cluster, not both")
        return Target("sentinel", raw, sentinels, master)
    url = raw if raw is not None else settings.redis_url_value
    scheme = urlsplit(url).scheme.lower()
    cluster = cluster or scheme in _CLUSTER_SCHEMES
    if scheme in _CLUSTER_SCHEMES:
        url = urlunsplit(urlsplit(url)._replace(scheme=_CLUSTER_SCHEMES[scheme]))
    return Target("cluster" if cluster else "single", url)


def redis_client(
    url: str,
    *,
    max_connections: int = MAX_CONNECTIONS,
    socket_timeout_s: float = SOCKET_TIMEOUT_S,
) -> Redis:
    """One server. The pool makes callers wait for a free connection (up to 20 s) instead of
    failing when a burst needs more than ``max_connections``."""
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=POOL_TIMEOUT_S, **_timeouts(socket_timeout_s)
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def cluster_client(url: str, *, socket_timeout_s: float = SOCKET_TIMEOUT_S) -> Redis:
    """A Redis Cluster client, typed as :class:`Redis` for the code that takes one.

    ``RedisCluster`` is not a ``Redis`` subclass but offers the same commands, pipelines
    (``transaction=False`` is split per node; ``transaction=True`` needs one slot, which a
    namespace's hash tag gives) and ``aclose()``; everything sop-llm calls on a client works
    on it (tests/ops/test_connect.py runs a worker on a real cluster). Its connections are not
    capped per node: redis-py's cluster pool fails instead of waiting when a cap is reached."""
    return cast(Redis, RedisCluster.from_url(url, **_timeouts(socket_timeout_s)))


class _SerialSentinel(Sentinel):
    """redis-py's ``Sentinel`` with its master lookups taken one at a time. Its lookup moves the
    sentinel that answered to the front of the list with an ``await`` between reading the list
    and writing it, so lookups racing through a failover could leave one sentinel in the list
    twice and drop another (no longer asked, and never closed)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call, unused-ignore]
        self._lookup = asyncio.Lock()
        self._every = list(self.sentinels)

    async def discover_master(self, service_name: str) -> Any:
        async with self._lookup:
            return await super().discover_master(service_name)  # type: ignore[no-untyped-call, unused-ignore]

    async def aclose(self) -> None:
        self.sentinels = list(self._every)  # every one, whatever order lookups left
        await super().aclose()


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The master's pool: waits for a free connection like the one-server pool, and closes the
    sentinel connections with its own (the client owns both)."""

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()


def sentinel_client(
    sentinels: tuple[tuple[str, int], ...],
    master: str,
    url: str | None = None,
    *,
    max_connections: int = MAX_CONNECTIONS,
    socket_timeout_s: float = SOCKET_TIMEOUT_S,
) -> Redis:
    """The current master of ``master`` as the sentinels report it; connections follow a
    failover. ``url`` lends user name, password, database and TLS (``rediss``)."""
    kwargs: dict[str, Any] = {}
    if url:
        parts = urlsplit(url)
        if parts.username:
            kwargs["username"] = unquote(parts.username)
        if parts.password:
            kwargs["password"] = unquote(parts.password)
        db = parts.path.strip("/")
        if db:
            kwargs["db"] = int(db)
        if parts.scheme.lower() == "rediss":
            kwargs["ssl"] = True
    # the sentinels themselves get the timeouts but no credentials (Sentinel ACLs: not used)
    sentinel = _SerialSentinel(
        list(sentinels),
        sentinel_kwargs={
            "socket_timeout": CONNECT_TIMEOUT_S,
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
        },
    )
    client = sentinel.master_for(
        master,
        connection_pool_class=_BlockingSentinelPool,
        max_connections=max_connections,
        timeout=POOL_TIMEOUT_S,
        **_timeouts(socket_timeout_s),
        **kwargs,
    )
    return cast(Redis, client)


def redis_client_for(settings: ConnectSettings) -> Redis:
    """The client the settings ask for (see the module docstring); ``aclose()`` releases every
    connection it opened. Opens nothing yet: the first command connects.

    Raises :class:`ValueError` when the settings are contradictory or name no server."""
    target = target_for(settings)
    timeout_s = socket_timeout_for(settings)
    if target.mode == "sentinel":
        return sentinel_client(
            target.sentinels, target.master, target.url, socket_timeout_s=timeout_s
        )
    assert target.url is not None
    if target.mode == "cluster":
        return cluster_client(target.url, socket_timeout_s=timeout_s)
    return redis_client(target.url, socket_timeout_s=timeout_s)


_log = logging.getLogger(__name__)
_STILL_WAITING_EVERY_S: Final = 10.0


async def wait_for_redis(
    client: Redis, *, stop: asyncio.Event, timeout_s: float, target: str
) -> bool:
    """Wait until Redis answers a PING, retrying with a bounded backoff (one warning when the
    wait starts, one line every 10 s while it lasts, one when it ends). ``False`` when ``stop``
    came first. Raises :class:`BrokerUnavailableError` once ``timeout_s`` (0: never) has passed,
    and lets an authentication failure through at once: waiting cannot fix a wrong password."""
    started = time.monotonic()
    next_note = started + _STILL_WAITING_EVERY_S
    backoff = Backoff(base=0.1, cap=2.0)
    while not stop.is_set():
        try:
            async with asyncio.timeout(5):
                await client.ping()
            if backoff.failures:
                waited = round(time.monotonic() - started, 1)
                _log.info("redis reachable, starting", extra={"redis": target, "waited_s": waited})
            return True
        except AuthenticationError:
            raise
        except TRANSIENT_ERRORS as exc:
            now = time.monotonic()
            if backoff.failures == 0:
                _log.warning(
                    "redis unreachable at start, waiting",
                    extra={"redis": target, "error": describe(exc)},
                )
            elif now >= next_note:
                next_note = now + _STILL_WAITING_EVERY_S
                _log.warning(
                    "still waiting for redis",
                    extra={
                        "redis": target,
                        "error": describe(exc),
                        "waited_s": round(now - started),
                    },
                )
            if timeout_s and now - started >= timeout_s:
                raise BrokerUnavailableError(
                    f"Redis at {target} did not answer for {timeout_s:g} s "
                    f"(SOP_STARTUP_TIMEOUT_S); last error: {describe(exc)}"
                ) from exc
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=backoff.next_delay())
    return False
