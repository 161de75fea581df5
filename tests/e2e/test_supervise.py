"""`sop-llm worker --processes N`: N worker processes, each a consumer of its own; one that dies
is started again; a stop drains them all."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from redis.asyncio import Redis

from sop_llm.ops.supervise import child_env
from sop_llm.schemas.result import TaskState
from sop_llm.streams.keys import Keys
from sop_llm.streams.models import worker_models
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import spawn_cli, terminating, wait_for, worker_env


async def _workers(client: Redis, keys: Keys) -> list[str]:
    return [w.consumer for w in await worker_models(client, keys) if w.pools]


async def test_processes_share_the_work_come_back_and_stop_together(
    client: Redis, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    keys = Keys(namespace)
    env = worker_env(redis_url, namespace, echo_tokens_per_s=50, block_ms=200, lease_ttl_ms=2000)
    log = tmp_path / "w.log"
    with terminating(spawn_cli(["worker", "--processes", "2"], env, log)) as parent:
        await wait_for(lambda: _count(client, keys, 2), 30)
        first = await _workers(client, keys)
        p = Producer(ProducerConfig(namespace=namespace), client=client)
        ids = [await p.submit("echo", "a b c d e", max_tokens=5) for _ in range(20)]
        done = [await p.wait(t, timeout=30) for t in ids]
        assert all(r.state == TaskState.COMPLETED for r in done)
        assert {r.worker for r in done} == set(first)  # both took work

        # a child killed from outside is started again, as a new consumer
        victim = int(first[0].split("-")[-2])
        os.kill(victim, signal.SIGKILL)
        await wait_for(lambda: _replaced(client, keys, first[0]), 30)
        assert "worker process exited, starting it again" in log.read_text()

        parent.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(parent.wait, 30)
    assert code == 0, log.read_text()[-2000:]
    assert await _workers(client, keys) == []  # both drained and dropped their leases


async def _count(client: Redis, keys: Keys, n: int) -> bool:
    return len(await _workers(client, keys)) == n


async def _replaced(client: Redis, keys: Keys, gone: str) -> bool:
    now = await _workers(client, keys)
    return gone not in now and len(now) == 2


def test_each_child_gets_a_metrics_port_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOP_METRICS_PORT", "9464")
    assert [child_env(i)["SOP_METRICS_PORT"] for i in range(3)] == ["9464", "9465", "9466"]
    monkeypatch.delenv("SOP_METRICS_PORT")
    assert "SOP_METRICS_PORT" not in child_env(1)
