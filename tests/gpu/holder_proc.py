"""A stand-in worker for the two-process semaphore test (not the whole sop-llm worker).

Argument: one JSON object (redis url, device keys, the list to record on, name, hold time,
rounds). Each round takes the device's only permit, holds it ``hold_s`` and records
``[name, start, end]`` (``time.time()``) on the list before giving it back. After ``rounds``
rounds (when given) it takes the permit once more, records ``[name, start, null]`` and holds it
until it is killed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from redis.asyncio import Redis

from sop_llm.gpu.semaphore import Device, DeviceKeys, GpuSemaphore, SemaphoreConfig


async def main(spec: dict[str, Any]) -> None:
    client = Redis.from_url(spec["redis_url"], socket_timeout=5)
    sem = GpuSemaphore(
        client=client,
        keys=DeviceKeys(**spec["keys"]),
        device=Device(spec["host"], 0),
        config=SemaphoreConfig(permits=1, lease_ms=spec["lease_ms"], poll_s=0.05),
    )
    name, out, rounds = spec["name"], spec["out"], spec.get("rounds")
    i = 0
    while True:
        async with sem.slot(priority=1, holder_id=name, timeout=30):
            start = time.time()
            if rounds is not None and i >= rounds:
                await client.rpush(out, json.dumps([name, start, None]))
                await asyncio.sleep(3600)
            await asyncio.sleep(spec["hold_s"])
            end = time.time()
            await client.rpush(out, json.dumps([name, start, end]))
        i += 1


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
