"""A model registered at run time: its tasks wait (bounded) for the workers to load it instead
of failing, and the workers' leases tell a waiting `models add --wait` when they have it."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from sop_llm.providers.echo import EchoProvider
from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.models import ModelSpec
from sop_llm.schemas.result import TaskState
from sop_llm.streams.keys import Keys
from sop_llm.streams.models import ModelStore, pickup, wait_pickup
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import wait_for
from tests.harness import echo_registry, running_worker


def _spec(name: str, pool: str = "default") -> ModelSpec:
    return ModelSpec(name=name, provider="echo", pool=pool)


async def test_a_task_for_a_model_registered_but_not_loaded_yet_waits_for_it(
    client: Redis, keys: Keys
) -> None:
    store = ModelStore(client=client, keys=keys)
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    registry = echo_registry()
    async with running_worker(client, keys, registry=registry) as worker:
        version = await store.put(_spec("late"))
        task_id = await p.submit("late", "wait for me", max_tokens=3)
        # read, then parked: queued, not failed
        await wait_for(lambda: _parked(client, keys, "late"), 5)
        record = await p.status(task_id)
        assert record is not None and record.state == TaskState.QUEUED
        # the worker's registry takes the spec (what the model watcher does)
        registry.register("late", EchoProvider())
        await worker.models_changed(version)
        result = await p.wait(task_id, timeout=10)
    assert result.state == TaskState.COMPLETED
    assert result.text == "wait for me"


async def test_the_wait_is_bounded_for_a_model_no_worker_loads(client: Redis, keys: Keys) -> None:
    store = ModelStore(client=client, keys=keys)
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys, unknown_model_grace_s=0.5):
        await store.put(_spec("never"))
        task_id = await p.submit("never", "nobody loads it")
        result = await p.wait(task_id, timeout=10)
    assert result.state == TaskState.FAILED
    assert result.error is not None and result.error.code == ErrorCode.MODEL_NOT_FOUND


async def test_a_model_nobody_registered_fails_at_once(client: Redis, keys: Keys) -> None:
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys, unknown_model_grace_s=60):
        task_id = await p.submit("typo", "no such model")
        result = await p.wait(task_id, timeout=5)  # not the 60 s grace
    assert result.state == TaskState.FAILED
    assert result.error is not None and result.error.code == ErrorCode.MODEL_NOT_FOUND


async def test_leases_say_which_workers_took_a_change(client: Redis, keys: Keys) -> None:
    store = ModelStore(client=client, keys=keys)
    registry = echo_registry()
    async with (
        running_worker(client, keys, registry=registry, consumer="a") as a,
        running_worker(client, keys, registry=echo_registry(), consumer="b") as b,
        running_worker(client, keys, consumer="other-pool", pools=("batch",)),
    ):
        version = await store.put(_spec("new"))
        state = await pickup(client, keys, "new", "default", version)
        assert state.pending == ("a", "b") and not state.settled
        with pytest.raises(TimeoutError, match="a, b"):
            await wait_pickup(client, keys, "new", "default", version, timeout_s=0.3)
        registry.register("new", EchoProvider())
        await a.models_changed(version)
        await b.models_changed(version)  # b's load failed: it took the version without it
        state = await wait_pickup(client, keys, "new", "default", version, timeout_s=5)
    assert state.serving == ("a",)
    assert state.refused == ("b",)
    assert state.settled


async def _parked(client: Redis, keys: Keys, model: str) -> bool:
    return bool(await client.zcard(keys.parked("default", model)))
