"""Priority holds per model: models of different capacity in one pool (the default layout, a
one-slot model beside echo) never turn priority into first come, first served."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from pathlib import Path

from redis.asyncio import Redis

from sop_llm.providers.echo import EchoProvider
from sop_llm.providers.registry import ModelRegistry
from sop_llm.schemas.result import TaskState
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import spawn_cli, terminating, wait_for, worker_env
from tests.fakes import ScriptedProvider
from tests.harness import running_worker


def _registry(one: ScriptedProvider) -> ModelRegistry:
    registry = ModelRegistry()
    registry.register("echo", EchoProvider(slots=64))
    registry.register("one", one)  # one task at a time
    return registry


async def _parked(client: Redis, keys: Keys, model: str) -> int:
    return int(await client.zcard(keys.parked("default", model)))


async def test_a_high_task_goes_next_on_a_busy_one_slot_model(client: Redis, keys: Keys) -> None:
    one = ScriptedProvider(["a b c d e f g h i j"], per_token_s=0.05, slots=1)
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys, registry=_registry(one), slots=None):
        first = await p.submit("one", "first")
        await wait_for(lambda: len(one.calls) == 1, 5)
        lows = [await p.submit("one", f"low {i}", priority="low") for i in range(8)]
        # the worker read them (echo has free slots) and parked them: none is running
        await wait_for(lambda: _parked_all(client, keys, 8), 5)
        states = {(await p.status(t)).state for t in lows}  # type: ignore[union-attr]
        assert states == {TaskState.QUEUED}
        high = await p.submit("one", "the high one", priority="high")
        done = {t: await p.wait(t, timeout=20) for t in [first, *lows, high]}
    assert all(r.state == TaskState.COMPLETED for r in done.values())
    prompts = [r.prompt for r in one.requests]
    assert prompts[0] == "first"
    assert prompts[1] == "the high one"  # next, before the eight lows read before it
    assert prompts[2:] == [f"low {i}" for i in range(8)]  # then the lows, oldest first


async def _parked_all(client: Redis, keys: Keys, n: int) -> bool:
    return await _parked(client, keys, "one") == n


async def test_echo_flows_at_full_slots_beside_a_busy_one_slot_model(
    client: Redis, keys: Keys
) -> None:
    one = ScriptedProvider([" ".join(["t"] * 100)], per_token_s=0.1, slots=1)  # 10 s each
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys, registry=_registry(one), slots=None):
        slow = [await p.submit("one", f"slow {i}") for i in range(6)]
        await wait_for(lambda: len(one.calls) == 1, 5)
        started = time.monotonic()
        echoes = [await p.submit("echo", f"quick {i}", max_tokens=4) for i in range(300)]
        done = [await p.wait(t, timeout=10) for t in echoes]
        elapsed = time.monotonic() - started
        assert len(one.calls) == 1  # the one-slot model is still on its first task
        for t in slow:  # end them (the running one between tokens), so nothing is cut at stop
            await p.cancel(t)
        ended = [await p.wait(t, timeout=10) for t in slow]
    assert all(r.state == TaskState.COMPLETED for r in done)
    assert elapsed < 6.0, elapsed  # not held up by the five tasks waiting for "one"
    assert {r.state for r in ended} == {TaskState.CANCELLED}


async def test_two_workers_both_busy_until_the_queue_is_empty(
    client: Redis, keys: Keys, redis_url: str, tmp_path: Path
) -> None:
    """Two worker processes, each able to run one task of a one-slot model at a time, ten
    tasks of about 1 s: both stay busy until the queue is empty."""
    models = tmp_path / "models.toml"
    models.write_text('[models.slow]\nprovider = "echo"\nconcurrency = 1\n')
    env = worker_env(
        redis_url, keys.namespace, echo_tokens_per_s=10, models_file=models, block_ms=200,
        reclaim_interval_ms=200, lease_ttl_ms=2000,
    )  # fmt: skip
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    w1 = spawn_cli(["worker"], {**env, "SOP_WORKER_NAME": "w1"}, tmp_path / "1.log")
    w2 = spawn_cli(["worker"], {**env, "SOP_WORKER_NAME": "w2"}, tmp_path / "2.log")
    with terminating(w1) as a, terminating(w2) as b:
        await wait_for(lambda: _workers_up(client, keys, 2), 20)
        started = time.monotonic()
        tasks = [await p.submit("slow", f"t{i}", max_tokens=10) for i in range(10)]  # 1 s each
        done = [await p.wait(t, timeout=30) for t in tasks]
        wall = time.monotonic() - started
        for proc in (a, b):
            proc.send_signal(signal.SIGTERM)
        for proc in (a, b):
            await asyncio.to_thread(proc.wait, 15)
    assert all(r.state == TaskState.COMPLETED for r in done)
    by_worker = [sum(r.worker == w for r in done) for w in ("w1", "w2")]
    assert by_worker == [5, 5], by_worker
    assert wall < 6.5, wall  # ideal 5 s: no task waited in one worker while the other was free
    # no overlap on a worker: each ran its five one after another
    for w in ("w1", "w2"):
        spans = sorted((r.finished_at - r.run_ms, r.finished_at) for r in done if r.worker == w)
        assert all(x[1] <= y[0] + 50 for x, y in itertools.pairwise(spans)), spans


async def _workers_up(client: Redis, keys: Keys, n: int) -> bool:
    names = [k async for k in client.scan_iter(match=keys.worker("*"))]
    return len(names) >= n


async def test_parked_entries_of_a_removed_model_end_model_not_found(
    client: Redis, keys: Keys
) -> None:
    one = ScriptedProvider(["a b c d e f g h i j"], per_token_s=0.05, slots=1)
    registry = _registry(one)
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(
        client, keys, registry=registry, slots=None, unknown_model_grace_s=0.2
    ):
        first = await p.submit("one", "first")
        await wait_for(lambda: len(one.calls) == 1, 5)
        waiting = [await p.submit("one", f"waiting {i}") for i in range(3)]
        await wait_for(lambda: _parked_all(client, keys, 3), 5)
        registry.unregister("one")  # removed while its entries wait for it
        ended = [await p.wait(t, timeout=10) for t in waiting]
        assert (await p.wait(first, timeout=10)).state == TaskState.COMPLETED
    assert all(r.state == TaskState.FAILED for r in ended)
    assert {r.error.code.value for r in ended if r.error} == {"model_not_found"}
    assert await _parked(client, keys, "one") == 0
