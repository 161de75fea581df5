"""The cancellation feed a worker reads (``streams/control.py``) against a real Redis: events
from now on, nothing else, and an end once stopped."""

from __future__ import annotations

import asyncio
import json

from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from sop_llm.streams.control import control_events
from sop_llm.streams.keys import Keys


def cancel(task_id: str) -> dict[FieldT, EncodableT]:
    return {"type": "task.cancel", "data": json.dumps({"task_id": task_id})}


async def test_cancels_from_now_on_and_an_end_once_stopped(client: Redis, keys: Keys) -> None:
    await client.xadd(keys.control, cancel("before"))  # published before: not seen
    stop = asyncio.Event()
    seen: list[str] = []

    async def read() -> None:
        async for task_id in control_events(client, keys, block_ms=100, stop=stop):
            seen.append(task_id)

    reader = asyncio.create_task(read())
    async with asyncio.timeout(5):
        # the reader is reading once a probe published now comes through
        while "probe" not in seen:
            await client.xadd(keys.control, cancel("probe"))
            await asyncio.sleep(0.02)
    await client.xadd(keys.control, cancel("c1"))
    await client.xadd(keys.control, {"type": "task.other", "data": "{}"})
    await client.xadd(keys.control, {"type": "task.cancel", "data": "not json"})
    await client.xadd(keys.control, {"type": "task.cancel", "data": json.dumps({"task_id": 7})})
    await client.xadd(keys.control, cancel("c2"))
    async with asyncio.timeout(5):
        while seen[-2:] != ["c1", "c2"]:
            await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(reader, 1.0)  # within one blocking read, with no cancellation
    assert "before" not in seen
    assert [t for t in seen if t != "probe"] == ["c1", "c2"]
