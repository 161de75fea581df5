"""Pull-when-ready reading across priority partitions.

A worker calls :meth:`PriorityReader.read` only with slots already free, and gets at most that
many entries, so nothing waits in a local buffer and its pending list never exceeds its slots.

Order: strict priority (``high`` before ``normal`` before ``low``; pools interleaved within a
partition). **Aging rule:** when the next waiting entry of a lower partition has waited longer
than ``aging_ms``, each read takes one entry from that partition first and fills the remaining
slots in priority order, until its next entry is younger than the limit. So a low task waits
at most about ``aging_ms`` plus one task per read, whatever the load above it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from streams.cancellation import raise_if_cancelled
from streams.entries import Entry, entries_from_read, text
from streams.keys import TASK_GROUP
from streams.link import Link
from streams.scripts import HEADS_SCRIPT, READ_SCRIPT
from streams.topology import ensure_groups, is_missing_group

log = logging.getLogger(__name__)


class PriorityReader:
    def __init__(
        self,
        *,
        client: Redis,
        streams: Sequence[str],
        consumer: str,
        block_ms: int = 1000,
        aging_ms: int = 30_000,
        aging_check_ms: int = 1_000,
        group: str = TASK_GROUP,
        link: Link | None = None,
    ) -> None:
        """``streams`` are the task partitions in priority order, highest first. With a
        ``link`` (``streams/link.py``), the reads go through it instead of ``client``."""
        if not streams:
            raise ValueError("at least one stream is required")
        self._client = client
        self._link = link
        self._streams = list(streams)
        self._consumer = consumer
        self._group = group
        self._block_ms = block_ms
        self._aging_ms = aging_ms
        self._aging_check_s = aging_check_ms / 1000
        self._next_aging_check = 0.0
        self._promoted: str | None = None
        # the last read took fewer entries than it could: the partitions were empty then, so
        # the next read may block at once (XREADGROUP answers at once when entries wait)
        self._drained = False

    @property
    def streams(self) -> list[str]:
        return list(self._streams)

    @property
    def block_ms(self) -> int:
        return self._block_ms

    @property
    def drained(self) -> bool:
        """The last read took fewer entries than it could: the partitions were empty then."""
        return self._drained

    @property
    def promoted(self) -> str | None:
        """The partition the aging rule currently serves first, if any."""
        return self._promoted

    async def read(self, free: int) -> list[Entry]:
        """Up to ``free`` new entries, highest priority first; blocks up to ``block_ms`` when
        there are none. Groups missing after a restart or FLUSHALL are created again."""
        if free <= 0:
            return []
        try:
            await self._check_aging()
            blocks = self._block_ms > 0 and free >= len(self._streams)
            if self._drained and blocks and self._promoted is None:
                entries = await self._block(free)
                self._drained = len(entries) < self._block_count(free)
                return entries
            entries, last_ids = await self._read_now(free)
            if entries or self._block_ms <= 0:
                self._drained = len(entries) < free
                return entries
            entries = await self._wait(free, last_ids)
            self._drained = len(entries) < self._block_count(free)
            return entries
        except Exception as exc:
            self._drained = False
            if not is_missing_group(exc):
                raise
            log.warning("consumer group missing, creating it again", extra={"group": self._group})
            await ensure_groups(self._client, self._streams, self._group)
            return []

    async def read_now(self, free: int) -> tuple[list[Entry], list[str]]:
        """Up to ``free`` entries without blocking, and (when there are none) the newest id of
        each stream, to wait for what comes next with a plain XREAD."""
        try:
            await self._check_aging()
            return await self._read_now(free)
        except Exception as exc:
            if not is_missing_group(exc):
                raise
            log.warning("consumer group missing, creating it again", extra={"group": self._group})
            await ensure_groups(self._client, self._streams, self._group)
            return [], ["0-0"] * len(self._streams)

    async def _read_now(self, free: int) -> tuple[list[Entry], list[str]]:
        order = self._streams
        first_limit = 0
        if self._promoted is not None:
            order = [self._promoted, *(s for s in self._streams if s != self._promoted)]
            first_limit = 1
        reply = await READ_SCRIPT(
            self._link or self._client, order, [self._group, self._consumer, free, first_limit]
        )
        found, last = reply
        entries: list[Entry] = []
        for index, items in found:
            stream = order[int(index) - 1]
            entries.extend(Entry.from_reply(stream, eid, fields) for eid, fields in items)
        # last ids come in `order`; map them back to streams
        last_by_stream = dict(zip(order, (text(x) for x in last), strict=False))
        return entries, [last_by_stream.get(s, "0-0") for s in self._streams]

    async def _wait(self, free: int, last_ids: list[str]) -> list[Entry]:
        streams = self._streams
        if free >= len(streams):
            return await self._block(free)
        # fewer slots than partitions: wait without reading (XREAD from the newest ids seen),
        # then take the entries in priority order through the script
        reply = await self._client.xread(
            dict(zip(streams, last_ids, strict=True)), count=1, block=self._block_ms
        )
        raise_if_cancelled()
        if not reply:
            return []
        entries, _ = await self._read_now(free)
        return entries

    def _block_count(self, free: int) -> int:
        return max(1, free // len(self._streams))

    async def _block(self, free: int) -> list[Entry]:
        # a blocked XREADGROUP is served by the first stream that receives an entry, and
        # answers at once with at most COUNT from each stream that already has some: never
        # more than `free` entries
        count = self._block_count(free)
        reply: Any
        if self._link is not None:
            n = len(self._streams)
            reply = await self._link.execute(
                "XREADGROUP", "GROUP", self._group, self._consumer, "COUNT", count,
                "BLOCK", self._block_ms, "STREAMS", *self._streams, *(">",) * n,
                timeout_s=self._block_ms / 1000 + self._link.timeout_s,
            )  # fmt: skip
        else:
            reply = await self._client.xreadgroup(
                self._group,
                self._consumer,
                dict.fromkeys(self._streams, ">"),
                count=count,
                block=self._block_ms,
            )
            raise_if_cancelled()
        return entries_from_read(reply)

    async def _check_aging(self) -> None:
        if self._aging_ms <= 0 or len(self._streams) < 2:
            return
        now = time.monotonic()
        if now < self._next_aging_check:
            return
        self._next_aging_check = now + self._aging_check_s
        lower = self._streams[1:]
        reply: list[Any] = await HEADS_SCRIPT(self._client, lower, [self._group])
        server_ms = int(text(reply[0]))
        oldest: tuple[int, str] | None = None
        for stream, head in zip(lower, reply[1:], strict=True):
            head_id = text(head)
            if not head_id:
                continue
            age = server_ms - int(head_id.split("-", 1)[0])
            if age > self._aging_ms and (oldest is None or age > oldest[0]):
                oldest = (age, stream)
        promoted = oldest[1] if oldest else None
        if promoted != self._promoted:
            log.info(
                "aging rule", extra={"promoted": promoted, "age_ms": oldest[0] if oldest else 0}
            )
        self._promoted = promoted
