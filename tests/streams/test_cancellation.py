"""Reading loops end when cancelled even if the Redis client loses the cancellation.

redis-py's asyncio client sometimes swallows the ``CancelledError`` of a blocking read (about once
in 300 cancels of an ``XREAD BLOCK`` on a busy pool, redis-py 8.1.0): too rare to meet in a test
run, so ``Swallowing`` does it every time. It is a real client whose blocking reads, when
cancelled, return as if their block had run out; everything else goes to the real Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from sop_llm.streams.control import control_events
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from sop_llm.streams.tokens import read_tokens


class Swallowing(Redis):
    async def xread(self, *args: Any, block: int | None = None, **kwargs: Any) -> Any:
        try:
            await asyncio.sleep((block or 0) / 1000)
        except asyncio.CancelledError:
            return []  # the cancellation is lost, as in redis-py
        return await super().xread(*args, **kwargs)  # the block has run out: read at once

    async def xreadgroup(self, *args: Any, block: int | None = None, **kwargs: Any) -> Any:
        try:
            await asyncio.sleep((block or 0) / 1000)
        except asyncio.CancelledError:
            return []
        return await super().xreadgroup(*args, **kwargs)


@pytest.fixture
async def swallowing(redis_url: str) -> AsyncIterator[Swallowing]:
    c = cast(Swallowing, Swallowing.from_url(redis_url))
    yield c
    await c.aclose()


async def drain(gen: AsyncIterator[Any]) -> None:
    async for _ in gen:
        pass


async def ends_when_cancelled(work: Awaitable[Any]) -> None:
    task = asyncio.ensure_future(work)
    await asyncio.sleep(0.1)  # inside a blocking read
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    assert done, "the loop read on after its cancellation was lost"
    assert task.cancelled()


async def test_a_swallowed_cancel_really_is_swallowed(swallowing: Swallowing, keys: Keys) -> None:
    reading = True

    async def unguarded() -> None:
        while reading:
            await swallowing.xread({keys.control: "$"}, count=1, block=50)

    task = asyncio.ensure_future(unguarded())
    await asyncio.sleep(0.1)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.5)
    assert not done  # what a loop without the guard does: it reads on
    reading = False
    await asyncio.wait_for(task, 1)


async def test_the_cancellation_feed(swallowing: Swallowing, keys: Keys) -> None:
    await ends_when_cancelled(drain(control_events(swallowing, keys, block_ms=50)))


async def test_waiting_for_a_result(swallowing: Swallowing, keys: Keys) -> None:
    producer = Producer(ProducerConfig(namespace=keys.namespace), client=swallowing)
    await ends_when_cancelled(producer.wait("never", timeout=30))


@pytest.mark.parametrize("group", [None, "g"])
async def test_reading_results(swallowing: Swallowing, keys: Keys, group: str | None) -> None:
    producer = Producer(ProducerConfig(namespace=keys.namespace), client=swallowing)
    await ends_when_cancelled(drain(producer.results(group=group, block_ms=50)))


async def test_reading_tokens(swallowing: Swallowing, keys: Keys) -> None:
    await ends_when_cancelled(drain(read_tokens(swallowing, keys, "never", block_ms=50)))
