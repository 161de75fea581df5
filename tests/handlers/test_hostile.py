"""Hostile input, named cases: no entry harms another task, and every bad entry ends once."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from sop_llm.handlers.tasks import prepare as prepare_module
from sop_llm.handlers.tasks.prepare import Prepared
from sop_llm.handlers.tasks.prepare import prepare as prepare_entry
from sop_llm.providers.errors import ProviderError
from sop_llm.providers.registry import ModelRegistry
from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.result import DeadLetter, TaskResult, TaskState
from sop_llm.streams.entries import Entry
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from sop_llm.streams.urlguard import AllowList
from tests.conftest import wait_for
from tests.fakes import ScriptedProvider
from tests.harness import results, running_worker, stream_entries, xadd_task


def _by_id(done: list[TaskResult]) -> dict[str, list[TaskResult]]:
    out: dict[str, list[TaskResult]] = {}
    for r in done:
        out.setdefault(r.task_id, []).append(r)
    return out


async def _dead(client: Redis, keys: Keys) -> list[DeadLetter]:
    return [
        DeadLetter.model_validate_json(e.data or b"")
        for e in await stream_entries(client, keys.dead)
    ]


async def _results_for(client: Redis, keys: Keys, ids: set[str], timeout: float = 15) -> None:
    async def seen() -> bool:
        return ids <= {r.task_id for r in await results(client, keys)}

    await wait_for(seen, timeout)


async def test_a_task_id_ending_in_tokens_reaches_no_other_task(client: Redis, keys: Keys) -> None:
    """Task ``X`` streams its tokens; task ``X:tokens`` is another task, not its token stream."""
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys, tokens_per_s=200):
        x = await p.submit("echo", "stream me", task_id="coll-x", stream=True, max_tokens=20)
        await wait_for(lambda: client.exists(keys.task_tokens(x)), 5)
        await xadd_task(
            client, keys, {"task_id": "coll-x:tokens", "model": "echo", "prompt": "b c"}
        )
        good = [await p.submit("echo", f"good {i}", max_tokens=2) for i in range(20)]
        await _results_for(client, keys, {x, "coll-x:tokens", *good})
    by_id = _by_id(await results(client, keys))
    assert all(len(rs) == 1 for rs in by_id.values())
    assert by_id["coll-x:tokens"][0].state == TaskState.COMPLETED
    assert by_id[x][0].state == TaskState.COMPLETED
    assert all(by_id[t][0].state == TaskState.COMPLETED for t in good)


async def test_a_malformed_duplicate_never_ends_the_running_task(client: Redis, keys: Keys) -> None:
    slow = ScriptedProvider(["the real output of the task"], per_token_s=0.1, slots=1)
    registry = ModelRegistry()
    registry.register("slow", slow)
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys, registry=registry):
        task_id = await p.submit("slow", "run me")
        await wait_for(lambda: len(slow.calls) == 1, 5)
        # an entry carrying the running task's id, malformed two ways
        await xadd_task(client, keys, {"task_id": task_id, "model": 7})
        await xadd_task(client, keys, {"task_id": task_id}, type_="task.wrong")
        result = await p.wait(task_id, timeout=10)

        async def two_dead() -> bool:
            return len(await _dead(client, keys)) == 2

        await wait_for(two_dead, 5)
    assert result.state == TaskState.COMPLETED
    assert result.text == "the real output of the task"
    mine = [r for r in await results(client, keys) if r.task_id == task_id]
    assert len(mine) == 1  # the malformed entries wrote no outcome over it
    status = await p.status(task_id)
    assert status is not None and status.state == TaskState.COMPLETED
    dead = await _dead(client, keys)
    assert {d.reason for d in dead} == {ErrorCode.INVALID_EVENT}
    assert all(d.task_id == task_id for d in dead)  # each its own dead letter


async def test_an_oversized_batch_is_dead_lettered_by_size_unread(
    client: Redis, keys: Keys
) -> None:
    big = "x" * (3 << 20)  # 3 MiB a prompt, over the 1 MiB entry limit set here
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    for i in range(6):
        await xadd_task(client, keys, {"task_id": f"big-{i}", "model": "echo", "prompt": big})
    good = [await p.submit("echo", f"good {i}", max_tokens=2) for i in range(10)]
    async with running_worker(client, keys, max_entry_bytes=1 << 20, read_budget_bytes=2 << 20):
        await _results_for(client, keys, {*good, *(f"big-{i}" for i in range(6))})
    by_id = _by_id(await results(client, keys))
    assert all(by_id[t][0].state == TaskState.COMPLETED for t in good)
    for i in range(6):
        [r] = by_id[f"big-{i}"]
        assert r.state == TaskState.FAILED and r.error is not None
        assert r.error.code == ErrorCode.INVALID_EVENT
        assert "over the limit of 1048576" in r.error.message
    dead = await _dead(client, keys)
    assert len(dead) == 6
    # dead-lettered by its size: the content never came into the worker
    assert all("data" not in d.fields and int(d.fields["__oversize"]) > 3 << 20 for d in dead)


async def test_a_key_of_the_wrong_type_ends_only_its_own_task(client: Redis, keys: Keys) -> None:
    """The status key of one task is not a hash: that task ends failed (``internal``) and is
    dead-lettered, once; its slot is freed and the others run."""
    await client.set(keys.task("broken"), "not a hash")
    await xadd_task(client, keys, {"task_id": "broken", "model": "echo", "prompt": "a"})
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys, slots=2) as worker:
        good = [await p.submit("echo", f"good {i}", max_tokens=2) for i in range(30)]
        await _results_for(client, keys, {"broken", *good})
        await wait_for(lambda: worker.inflight == 0, 5)
    by_id = _by_id(await results(client, keys))
    [broken] = by_id["broken"]
    assert broken.state == TaskState.FAILED and broken.error is not None
    assert broken.error.code == ErrorCode.INTERNAL and "WRONGTYPE" in broken.error.message
    assert all(len(by_id[t]) == 1 and by_id[t][0].state == TaskState.COMPLETED for t in good)
    assert [d.task_id for d in await _dead(client, keys)] == ["broken"]
    assert (await client.xpending(keys.tasks("default", "normal"), "workers"))["pending"] == 0


async def test_an_entry_delivered_too_often_is_dead_lettered_unread(
    client: Redis, keys: Keys
) -> None:
    """An entry that kept coming back without reaching its start (it might be what kills the
    workers) ends ``max_attempts`` by its delivery count, whatever stage failed."""
    stream = keys.tasks("default", "normal")
    await client.xgroup_create(stream, "workers", id="0", mkstream=True)
    entry_id = await xadd_task(client, keys, {"task_id": "poison", "model": "echo", "prompt": "p"})
    await client.xreadgroup("workers", "ghost", {stream: ">"}, count=1)
    for _ in range(3):  # three more deliveries, each to a worker that died on it
        await client.xclaim(stream, "workers", "ghost", 0, [entry_id])
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys, max_attempts=3):
        good = await p.submit("echo", "fine", max_tokens=2)
        await _results_for(client, keys, {"poison", good})
    by_id = _by_id(await results(client, keys))
    [poison] = by_id["poison"]
    assert poison.state == TaskState.FAILED and poison.error is not None
    assert poison.error.code == ErrorCode.MAX_ATTEMPTS
    assert "delivered 5 times" in poison.error.message
    assert [d.task_id for d in await _dead(client, keys)] == ["poison"]


async def test_a_plain_xadd_webhook_to_an_internal_host_is_refused_at_intake(
    client: Redis, keys: Keys
) -> None:
    await xadd_task(
        client, keys,
        {"task_id": "hook-in", "model": "echo", "prompt": "a", "webhook_url": "http://10.0.0.7/h"},
    )  # fmt: skip
    await xadd_task(
        client, keys,
        {"task_id": "hook-ok", "model": "echo", "prompt": "a", "webhook_url": "http://10.0.0.8/h"},
    )  # fmt: skip
    async with running_worker(client, keys, webhook_allow=AllowList.parse(["10.0.0.8"])):
        await _results_for(client, keys, {"hook-in", "hook-ok"})
    by_id = _by_id(await results(client, keys))
    [refused] = by_id["hook-in"]
    assert refused.state == TaskState.FAILED and refused.error is not None
    assert refused.error.code == ErrorCode.INVALID_EVENT and "10.0.0.7" in refused.error.message
    assert await client.xlen(keys.webhooks) == 1  # the allowed one only
    assert by_id["hook-ok"][0].state == TaskState.COMPLETED


async def test_an_entry_that_cannot_be_read_ends_alone(
    client: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading one entry raises (MemoryError, say): that entry ends ``internal``, the others of
    its read run."""
    real = prepare_entry

    def prepare(entry: Entry, **kw: Any) -> Prepared:
        if b"explode" in (entry.data or b""):
            raise MemoryError("out of memory reading it")
        return real(entry, **kw)

    monkeypatch.setattr(prepare_module, "prepare", prepare)
    await xadd_task(client, keys, {"task_id": "boom", "model": "echo", "prompt": "explode"})
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    good = [await p.submit("echo", f"good {i}", max_tokens=2) for i in range(5)]
    async with running_worker(client, keys):
        await _results_for(client, keys, {"boom", *good})
    by_id = _by_id(await results(client, keys))
    [boom] = by_id["boom"]
    assert boom.state == TaskState.FAILED and boom.error is not None
    assert boom.error.code == ErrorCode.INTERNAL and "MemoryError" in boom.error.message
    assert all(by_id[t][0].state == TaskState.COMPLETED for t in good)


async def test_a_retry_that_redis_refuses_ends_only_its_task(client: Redis, keys: Keys) -> None:
    """The retry schedule's key is not a sorted set: the failed attempt cannot be parked for a
    retry, so the task ends ``internal`` once, dead-lettered, and its slot is freed."""
    await client.set(keys.tasks_delayed, "not a sorted set")
    flaky = ScriptedProvider([ProviderError("busy", code=ErrorCode.OVERLOADED, retryable=True)])
    registry = ModelRegistry()
    registry.register("flaky", flaky)
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys, registry=registry) as worker:
        task_id = await p.submit("flaky", "x")
        result = await p.wait(task_id, timeout=10)
        await wait_for(lambda: worker.inflight == 0, 5)
    assert result.state == TaskState.FAILED and result.error is not None
    assert result.error.code == ErrorCode.INTERNAL and "WRONGTYPE" in result.error.message
    assert [d.task_id for d in await _dead(client, keys)] == [task_id]
