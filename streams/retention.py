"""Retention: trimming streams by age, never past an entry still pending or not yet delivered."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sop_llm.streams.entries import text
from sop_llm.streams.keys import TASK_GROUP, WEBHOOK_GROUP, Keys

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Retention:
    tasks_ms: int = 7 * 86_400_000
    results_ms: int = 7 * 86_400_000
    dead_ms: int = 30 * 86_400_000


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def safe_min_id(
    client: Redis, stream: str, cutoff_ms: int, *, keep_undelivered: Iterable[str] = ()
) -> str:
    """The lowest id a trim may keep: the age cutoff, lowered to the oldest entry pending in any
    group, and (for the groups named in ``keep_undelivered``) to the next undelivered entry."""
    floor = f"{cutoff_ms}-0"
    try:
        groups: list[Any] = await client.xinfo_groups(stream)
    except ResponseError:
        return floor  # no such stream
    protect = set(keep_undelivered)
    for g in groups:
        name = text(g["name"])
        if int(g["pending"]):
            summary = await client.xpending(stream, name)
            oldest = text(summary["min"])
            if _id_key(oldest) < _id_key(floor):
                floor = oldest
        if name in protect:
            last = text(g["last-delivered-id"])
            # everything after `last` is still to be read: the trim must stop at `last`
            if _id_key(last) < _id_key(floor):
                floor = last
    return floor


async def trim_stream(
    client: Redis,
    stream: str,
    retention_ms: int,
    now_ms: int,
    *,
    keep_undelivered: Iterable[str] = (),
) -> int:
    """Trim entries older than ``retention_ms`` (``XTRIM MINID``); returns how many went."""
    min_id = await safe_min_id(
        client, stream, now_ms - retention_ms, keep_undelivered=keep_undelivered
    )
    return int(await client.xtrim(stream, minid=min_id, approximate=False))


async def trim_all(
    client: Redis, keys: Keys, task_streams: Iterable[str], retention: Retention, now_ms: int
) -> int:
    """One retention pass over every stream of the namespace."""
    removed = 0
    for stream in task_streams:
        removed += await trim_stream(
            client, stream, retention.tasks_ms, now_ms, keep_undelivered=[TASK_GROUP]
        )
    removed += await trim_stream(
        client, keys.webhooks, retention.tasks_ms, now_ms, keep_undelivered=[WEBHOOK_GROUP]
    )
    removed += await trim_stream(client, keys.results, retention.results_ms, now_ms)
    for name in await client.smembers(keys.reply_streams):
        removed += await trim_stream(
            client, keys.results_for(text(name)), retention.results_ms, now_ms
        )
    removed += await trim_stream(client, keys.dead, retention.dead_ms, now_ms)
    removed += await trim_stream(client, keys.webhooks_dead, retention.dead_ms, now_ms)
    removed += await trim_stream(client, keys.control, retention.results_ms, now_ms)
    if removed:
        log.info("streams trimmed", extra={"removed": removed})
    return removed


async def trim_if_due(
    client: Redis,
    keys: Keys,
    task_streams: Iterable[str],
    retention: Retention,
    now_ms: int,
    *,
    holder: str,
    interval_s: float,
) -> int:
    """:func:`trim_all`, by one worker of the fleet per ``interval_s`` (a lock taken with
    ``SET NX``); 0 when another holds the turn."""
    if not await client.set(keys.trim_lock, holder, nx=True, ex=max(5, int(interval_s))):
        return 0
    return await trim_all(client, keys, task_streams, retention, now_ms)
