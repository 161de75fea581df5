"""Pools have their own slot budgets: a stuck pool never takes another pool's slots."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from sop_llm.providers.echo import EchoProvider
from sop_llm.providers.registry import ModelRegistry
from sop_llm.schemas.result import TaskState
from sop_llm.streams.entries import text
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.fakes import ScriptedProvider
from tests.harness import running_worker


async def test_a_hanging_pool_does_not_block_another(client: Redis, keys: Keys) -> None:
    registry = ModelRegistry()
    hanging = ScriptedProvider([" ".join(["tok"] * 10_000)], per_token_s=1.0)  # never ends in time
    registry.register("stuck", hanging, pool="slow")
    registry.register("echo", EchoProvider())
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(
        client, keys, registry=registry, pools=("slow", "fast"), slots=4,
        pool_slots={"slow": 2, "fast": 4}, shutdown_grace_s=0.1,
    ):  # fmt: skip
        for i in range(10):  # five times the slow pool's slots, published first
            await p.submit("stuck", f"wait {i}", pool="slow")
        fast = [await p.submit("echo", f"quick {i}", pool="fast") for i in range(8)]
        async with asyncio.timeout(5):
            done = [await p.wait(t, timeout=5) for t in fast]
        held = {
            text(c["name"]): int(c["pending"])
            for c in await client.xinfo_consumers(keys.tasks("slow", "normal"), "workers")
        }
    assert all(r.state == TaskState.COMPLETED for r in done)
    assert held.get("w1") == 2  # the slow pool holds exactly its own two slots
    assert len(hanging.calls) == 2


async def test_one_pool_blocking_path_still_strict_priority(client: Redis, keys: Keys) -> None:
    # several pools: a high task of either pool goes before normal ones
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    registry = ModelRegistry()
    registry.register("echo", EchoProvider(tokens_per_s=50, slots=8))  # the model is not the limit
    async with running_worker(
        client, keys, registry=registry, pools=("a", "b"), slots=1, pool_slots={"a": 1, "b": 1}
    ):
        first = await p.submit("echo", "x y", pool="a", max_tokens=20)
        others = [await p.submit("echo", "n", pool="a", max_tokens=1) for _ in range(3)]
        high = await p.submit("echo", "h", pool="a", priority="high", max_tokens=1)
        b = await p.submit("echo", "b", pool="b", max_tokens=1)
        results = {t: await p.wait(t, timeout=10) for t in [first, *others, high, b]}
    order = sorted(results, key=lambda t: results[t].finished_at)
    assert order.index(high) < min(order.index(t) for t in others), [
        (order.index(t), results[t].queued_ms) for t in [first, *others, high]
    ]
    assert results[b].finished_at < results[first].finished_at  # pool b did not wait for pool a
