"""The cancellation feed a worker reads (``streams/control.py``), over a link and over redis-py,
against a real Redis: events from now on, nothing else, and an end once stopped."""

from __future__ import annotations

import asyncio
import json

import pytest
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from streams.control import control_events
from streams.keys import Keys
from streams.link import Link


def cancel(task_id: str) -> dict[FieldT, EncodableT]:
    return {"type": "task.cancel", "data": json.dumps({"task_id": task_id})}


@pytest.mark.parametrize("via_link", [True, False], ids=["link", "redis-py"])
async def test_cancels_from_now_on_and_an_end_once_stopped(
    client: Redis, keys: Keys, via_link: bool
) -> None:
    await client.xadd(keys.control, cancel("before"))  # published before: not seen
    link = Link.of(client) if via_link else None
    stop = asyncio.Event()
    seen: list[str] = []

    async def read() -> None:
        async for task_id in control_events(link or client, keys, block_ms=100, stop=stop):
            seen.append(task_id)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.1)
    await client.xadd(keys.control, cancel("c1"))
    await client.xadd(keys.control, {"type": "task.other", "data": "{}"})
    await client.xadd(keys.control, {"type": "task.cancel", "data": "not json"})
    await client.xadd(keys.control, {"type": "task.cancel", "data": json.dumps({"task_id": 7})})
    await client.xadd(keys.control, cancel("c2"))
    async with asyncio.timeout(5):
        while seen != ["c1", "c2"]:
            await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(reader, 1.0)  # within one blocking read, with no cancellation
    assert seen == ["c1", "c2"]
    if link is not None:
        await link.aclose()
