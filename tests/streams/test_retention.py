from __future__ import annotations

import time

from redis.asyncio import Redis

from sop_llm.streams.entries import entries_from_range, text
from sop_llm.streams.keys import TASK_GROUP, Keys
from sop_llm.streams.retention import Retention, trim_all, trim_stream
from sop_llm.streams.topology import ensure_groups


async def test_trim_by_age_never_past_pending_or_undelivered(client: Redis, keys: Keys) -> None:
    stream = keys.tasks("default", "normal")
    await ensure_groups(client, [stream], TASK_GROUP)
    ids = [text(await client.xadd(stream, {"n": str(i)})) for i in range(6)]
    # 0,1 delivered and acked; 2 delivered and still pending; 3 acked; 4,5 never delivered
    await client.xreadgroup(TASK_GROUP, "c", {stream: ">"}, count=4)
    await client.xack(stream, TASK_GROUP, ids[0], ids[1], ids[3])
    future = int(time.time() * 1000) + 60_000  # everything is "old" by then
    assert await trim_stream(client, stream, 1, future, keep_undelivered=[TASK_GROUP]) == 2
    assert await _ids(client, stream) == ids[2:]
    await client.xack(stream, TASK_GROUP, ids[2])
    await trim_stream(client, stream, 1, future, keep_undelivered=[TASK_GROUP])
    # acked up to the last delivered one; the undelivered ones stay
    assert await _ids(client, stream) == ids[3:]


async def _ids(client: Redis, stream: str) -> list[str]:
    return [e.entry_id for e in entries_from_range(stream, await client.xrange(stream))]


async def test_young_entries_stay_and_every_stream_is_covered(client: Redis, keys: Keys) -> None:
    for name in (keys.results, keys.results_for("svc"), keys.dead):
        await client.xadd(name, {"type": "x", "data": "{}"})
    await client.sadd(keys.reply_streams, "svc")
    now = int(time.time() * 1000)
    day = 86_400_000
    assert (
        await trim_all(client, keys, [], Retention(tasks_ms=day, results_ms=day, dead_ms=day), now)
        == 0
    )
    removed = await trim_all(
        client, keys, [], Retention(tasks_ms=day, results_ms=day, dead_ms=day), now + 2 * day
    )
    assert removed == 3
