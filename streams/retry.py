"""Moving due retries from the delayed set back to their partitions."""

from __future__ import annotations

import json

from redis.asyncio import Redis

from sop_llm.streams.keys import Keys
from sop_llm.streams.scripts import MOVE_SCRIPT, ScriptCall, run_batch


async def move_due(client: Redis, keys: Keys, now_ms: int, *, limit: int = 100) -> int:
    """Re-publish retries whose time has come (each once, whichever worker moves it first).
    Returns how many were moved."""
    members: list[bytes] = await client.zrangebyscore(  # type: ignore[assignment]
        keys.tasks_delayed, "-inf", now_ms, start=0, num=limit
    )
    calls: list[ScriptCall] = []
    for member in members:
        job = json.loads(member)
        calls.append(
            (
                MOVE_SCRIPT,
                [keys.tasks_delayed, job["stream"], keys.task(job["task_id"])],
                [member, job["data"], job.get("traceparent", "")],
            )
        )
    if not calls:
        return 0
    replies = await run_batch(client, calls)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return sum(1 for r in replies if r)
