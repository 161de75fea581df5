"""The opt-in durability level against a real master and replica: a submission counts only once
a replica holds it, and the producer is told when none did in time."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from sop_llm.schemas.errors import NotReplicatedError
from sop_llm.schemas.result import TaskState
from sop_llm.streams.durability import Durability
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import RedisServer, free_port, wait_for
from tests.harness import running_worker


@pytest.fixture
def replica(private_redis: RedisServer, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    exe = shutil.which("redis-server")
    assert exe
    (tmp_path / "replica").mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path / "replica"), "--replicaof", "127.0.0.1", str(private_redis.port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    proc.port = port  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(10)


async def _replica_linked(master: Redis) -> bool:
    """The replica finished its first sync (before that, WAIT does not count it)."""
    info = await master.info("replication")
    replica = info.get("slave0")
    return isinstance(replica, dict) and replica.get("state") == "online"


async def test_a_submission_counts_once_a_replica_holds_it(
    private_redis: RedisServer, replica: subprocess.Popen[bytes], namespace: str
) -> None:
    master = Redis.from_url(private_redis.url, socket_timeout=15)
    keys = Keys(namespace)
    durability = Durability(replicas=1, timeout_ms=300)
    p = Producer(ProducerConfig(namespace=namespace, durability=durability), client=master)
    try:
        await wait_for(lambda: _replica_linked(master), 15)
        kept = await p.submit("echo", "on two servers", max_tokens=2)  # the replica has it
        replica.send_signal(signal.SIGSTOP)  # a lagging replica
        try:
            started = time.monotonic()
            with pytest.raises(NotReplicatedError) as info:
                await p.submit("echo", "on the master only", max_tokens=2)
            assert time.monotonic() - started < 2  # told within the timeout, not hanging
            unsure = info.value.task_id
            assert "0 of 1 replicas" in str(info.value)
        finally:
            replica.send_signal(signal.SIGCONT)
        # the worker's terminal writes wait for the replica too, and every task ends once
        async with running_worker(client=master, keys=keys, durability=durability):
            assert (await p.wait(kept, timeout=15)).state == TaskState.COMPLETED
            assert (await p.wait(unsure, timeout=15)).state == TaskState.COMPLETED
        assert await master.xlen(keys.results) == 2
    finally:
        await master.aclose()
