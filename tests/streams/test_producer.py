from __future__ import annotations

import asyncio

import pytest
import redis.exceptions
from redis.asyncio import Redis

from sop_llm.schemas.errors import (
    BrokerError,
    BrokerUnavailableError,
    DuplicateTaskIdError,
    IdempotencyConflictError,
    InvalidTaskError,
    SopError,
    WaitTimeoutError,
)
from sop_llm.schemas.result import TaskState
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import free_port
from tests.harness import running_worker, stream_entries, wait_results


@pytest.fixture
async def producer(client: Redis, namespace: str) -> Producer:
    return Producer(ProducerConfig(namespace=namespace), client=client)


async def test_submit_writes_entry_and_queued_status(
    producer: Producer, client: Redis, keys: Keys
) -> None:
    task_id = await producer.submit("echo", "hello", priority="high", temperature=0)
    entries = await stream_entries(client, keys.tasks("default", "high"))
    assert len(entries) == 1
    assert entries[0].type == "task.submitted"
    assert b'"temperature":0.0' in (entries[0].data or b"")
    record = await producer.status(task_id)
    assert record is not None
    assert record.state == TaskState.QUEUED
    assert record.entry_id == entries[0].entry_id


async def test_fifty_concurrent_submissions_with_one_key_make_one_task(
    producer: Producer, client: Redis, keys: Keys
) -> None:
    ids = await asyncio.gather(
        *(producer.submit("echo", "same", idempotency_key="order-42") for _ in range(50))
    )
    assert len(set(ids)) == 1
    assert await client.xlen(keys.tasks("default", "normal")) == 1
    async with running_worker(client, keys):
        found = await wait_results(client, keys, 1)
        # give a second (wrong) result every chance to appear before counting
        more = await producer.submit("echo", "same", idempotency_key="order-42")
        assert more == ids[0]
        assert (await producer.wait(ids[0], timeout=5)).state == TaskState.COMPLETED
    assert [r.task_id for r in found] == [ids[0]]
    assert await client.xlen(keys.results) == 1


async def test_same_key_other_payload_is_refused(producer: Producer) -> None:
    first = await producer.submit("echo", "one", idempotency_key="k1")
    with pytest.raises(IdempotencyConflictError, match="k1") as info:
        await producer.submit("echo", "two", idempotency_key="k1")
    assert first not in str(info.value)  # the key is bound; to which task is not said


async def test_task_id_reuse_is_refused(producer: Producer, client: Redis, keys: Keys) -> None:
    """Another payload under a used task id is refused; the same payload again (a resend after
    a reply lost to a failover or a timeout) is accepted once, not published twice."""
    assert await producer.submit("echo", "one", task_id="fixed-1") == "fixed-1"
    with pytest.raises(DuplicateTaskIdError):
        await producer.submit("echo", "two", task_id="fixed-1")
    assert await producer.submit("echo", "one", task_id="fixed-1") == "fixed-1"
    assert await client.xlen(keys.tasks("default", "normal")) == 1


async def test_bad_input_is_refused_before_publishing(
    producer: Producer, client: Redis, keys: Keys
) -> None:
    with pytest.raises(InvalidTaskError, match="temperature"):
        await producer.submit("echo", "x", temperature=9)
    with pytest.raises(InvalidTaskError, match="priority: 'urgent' is not a partition"):
        await producer.submit("echo", "x", priority="urgent")
    with pytest.raises(InvalidTaskError, match="over the limit"):
        await Producer(
            ProducerConfig(namespace=keys.namespace, max_prompt_bytes=4), client=client
        ).submit("echo", "hello")
    assert await client.exists(keys.tasks("default", "normal")) == 0


async def test_wait_times_out_clearly(producer: Producer) -> None:
    task_id = await producer.submit("echo", "nobody runs this")
    with pytest.raises(WaitTimeoutError, match=task_id):
        await producer.wait(task_id, timeout=0.3)


async def test_results_through_a_group_and_reply_to(
    producer: Producer, client: Redis, keys: Keys
) -> None:
    mine = await producer.submit("echo", "mine", reply_to="billing")
    other = await producer.submit("echo", "other")
    async with running_worker(client, keys):
        await wait_results(client, keys, 2)
        seen = []
        async with asyncio.timeout(5):
            async for result in producer.results(reply_to="billing", group="svc", block_ms=100):
                seen.append(result.task_id)
                break
        # left the loop without asking for more: still pending, delivered again first
        assert (await client.xpending(keys.results_for("billing"), "svc"))["pending"] == 1
        async with asyncio.timeout(5):
            stream = producer.results(reply_to="billing", group="svc", block_ms=100)
            again = await anext(stream)
            seen.append(again.task_id)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await anext(stream)  # asking for the next acknowledges the previous one
            await stream.aclose()
    assert seen == [mine, mine]
    assert other != mine
    assert (await client.xpending(keys.results_for("billing"), "svc"))["pending"] == 0


async def test_an_unreachable_redis_raises_our_error_with_redis_pys_as_cause(
    namespace: str,
) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    config = ProducerConfig(redis_url=closed, namespace=namespace, socket_timeout_s=1)
    async with Producer(config) as p:
        with pytest.raises(BrokerUnavailableError, match="redis is unavailable") as info:
            await p.submit("echo", "hello")
        assert isinstance(info.value, SopError)
        assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)
        with pytest.raises(BrokerUnavailableError):
            await p.status("t-1")
        with pytest.raises(BrokerUnavailableError):
            await p.wait("t-1", timeout=1)
        with pytest.raises(BrokerUnavailableError):
            await anext(p.results())
        with pytest.raises(BrokerUnavailableError):
            await anext(p.stream("t-1"))


async def test_a_refused_command_raises_broker_error(
    producer: Producer, client: Redis, keys: Keys
) -> None:
    await client.set(keys.task("t-odd"), "not a hash")
    with pytest.raises(BrokerError) as info:
        await producer.status("t-odd")
    assert not isinstance(info.value, BrokerUnavailableError)  # retrying will not help
    assert isinstance(info.value.__cause__, redis.exceptions.ResponseError)
    assert "WRONGTYPE" in str(info.value)
