"""Queue figures per task partition: depth, lag, pending and the oldest pending entry's age.

Read in one pipelined round trip (``XLEN``, ``XINFO GROUPS``, ``XPENDING`` per partition) for
``GET /v1/queue``, the Prometheus gauges and ``sop-llm inspect``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import Redis

from sop_llm.streams.entries import text
from sop_llm.streams.keys import TASK_GROUP, Keys


@dataclass(frozen=True, slots=True)
class PartitionStats:
    """One task partition as Redis sees it now.

    ``group``: the ``workers`` group exists (without it the rest but ``length`` is empty).
    ``lag``: entries not yet delivered to the group (``None`` when Redis cannot tell).
    ``pending``: delivered and not yet acknowledged. ``oldest_pending_age_ms``: how long ago
    the oldest pending entry was added (``None``: nothing pending).
    """

    stream: str
    pool: str
    partition: str
    length: int = 0
    group: bool = False
    pending: int = 0
    lag: int | None = None
    oldest_pending_age_ms: int | None = None
    consumers: int = 0
    last_delivered_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The JSON row of ``GET /v1/queue`` (``last_delivered_id`` only when the group exists)."""
        row: dict[str, Any] = {
            "stream": self.stream,
            "pool": self.pool,
            "partition": self.partition,
            "length": self.length,
            "group": self.group,
            "pending": self.pending,
            "lag": self.lag,
            "oldest_pending_age_ms": self.oldest_pending_age_ms,
            "consumers": self.consumers,
        }
        if self.last_delivered_id is not None:
            row["last_delivered_id"] = self.last_delivered_id
        return row


async def read_partition_stats(
    client: Redis, keys: Keys, *, pools: Sequence[str], partitions: Sequence[str]
) -> list[PartitionStats]:
    """The figures of the task stream of each pool and partition, partition by partition in the
    order given. A stream or group that does not exist reads as empty; connection trouble
    raises (one of ``streams.errors.TRANSIENT_ERRORS``)."""
    rows = [(pool, part, keys.tasks(pool, part)) for part in partitions for pool in pools]
    pipe = client.pipeline(transaction=False)
    for _, _, stream in rows:
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
        pipe.xpending(stream, TASK_GROUP)
    replies = await pipe.execute(raise_on_error=False)
    now = int(time.time() * 1000)
    return [
        _stats(PartitionStats(stream, pool, part), replies[3 * i : 3 * i + 3], now)
        for i, (pool, part, stream) in enumerate(rows)
    ]


def _stats(base: PartitionStats, replies: Sequence[Any], now: int) -> PartitionStats:
    length, groups, pending = replies
    stats = replace(base, length=0 if isinstance(length, Exception) else int(length))
    group = None
    if not isinstance(groups, Exception):
        group = next((g for g in groups if text(g["name"]) == TASK_GROUP), None)
    if group is not None:
        lag = group.get("lag")
        stats = replace(
            stats, group=True, consumers=int(group["consumers"]),
            lag=int(lag) if lag is not None else None,
            last_delivered_id=text(group["last-delivered-id"]),
        )  # fmt: skip
    if not isinstance(pending, Exception) and pending and pending.get("pending"):
        oldest = text(pending["min"])
        stats = replace(
            stats, pending=int(pending["pending"]),
            oldest_pending_age_ms=max(0, now - int(oldest.split("-", 1)[0])),
        )  # fmt: skip
    return stats
