"""Pull-when-ready reading of one pool, per model, in priority order.

A worker reads only while some model of the pool has a free slot on it, and at most as many
entries as it has free slots (``handlers/tasks/slots.py``). What it reads it starts at once
when the entry's model has a free slot here; otherwise it *parks* the entry: the entry moves in
the group's pending list to the consumer :data:`~streams.keys.PARKED_CONSUMER` and into its
model's parked set, and every worker of the pool whose slot for that model frees takes the best
parked entry before anything new. So nothing waits in one worker that another could start, a
task is ``running`` only once its model starts it, and a task waiting for its model waits in
priority order, never first come first served.

**Order.** Entries are read partition by partition (``high`` before ``normal`` before
``low``), and parked entries are taken in the same order (partition, then age). **Aging rule:**
when the next waiting entry of a lower partition has waited longer than ``aging_ms``, each read
takes one entry from that partition first and fills the rest in priority order; likewise each
take of a model's parked entries takes the oldest one that has waited past ``aging_ms`` in a
lower partition first. So a low task waits at most about ``aging_ms`` plus one task per read,
whatever the load above it. With ``aging_ms`` 0 the order is strict.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from sop_llm.streams.cancellation import raise_if_cancelled
from sop_llm.streams.entries import Entry, entries_from_read, text
from sop_llm.streams.keys import PARKED_CONSUMER, TASK_GROUP, Keys
from sop_llm.streams.scripts import HEADS_SCRIPT, PARK_SCRIPT, READ_SCRIPT, EncodableT
from sop_llm.streams.topology import ensure_groups, is_missing_group

log = logging.getLogger(__name__)

BLOCK_COUNT = 2
"""Entries a blocked read takes per partition: a partition that gave this many may have more
(then a read follows), one that gave fewer was drained."""

RANK_MS = 1 << 42
"""A parked entry's score is ``rank * RANK_MS + entry time``: partition first, then age."""


@dataclass(slots=True)
class Read:
    entries: list[Entry]
    """Parked entries taken for the models asked for, then new ones, in priority order."""
    wake_id: str | None
    """When the read took less than it asked for (the partitions and the parked sets asked for
    were drained): the newest id of the wake stream, to wait for the next park from."""
    drained: set[str]
    """The models asked for whose parked sets were emptied by this read."""


class PoolReader:
    def __init__(
        self,
        *,
        client: Redis,
        keys: Keys,
        pool: str,
        partitions: Sequence[str],
        consumer: str,
        block_ms: int = 1000,
        aging_ms: int = 30_000,
        aging_check_ms: int = 1_000,
        max_entry_bytes: int = 4 << 20,
        read_budget_bytes: int = 16 << 20,
        group: str = TASK_GROUP,
    ) -> None:
        """An entry over ``max_entry_bytes`` is returned as a stub (``Entry.oversize``) instead
        of its content; a read stops once its entries add up to ``read_budget_bytes``."""
        if not partitions:
            raise ValueError("at least one partition is required")
        if consumer == PARKED_CONSUMER:
            raise ValueError(f"{PARKED_CONSUMER!r} is reserved for parked entries")
        self._client = client
        self._keys = keys
        self.pool = pool
        self.streams = [keys.tasks(pool, p) for p in partitions]
        self._ranks = {s: i for i, s in enumerate(self.streams)}
        self._wake = keys.wake(pool)
        self._consumer = consumer
        self._group = group
        self.block_ms = block_ms
        self._aging_ms = aging_ms
        self._max_entry_bytes = max_entry_bytes
        self._read_budget_bytes = read_budget_bytes
        self._aging_check_s = aging_check_ms / 1000
        self._next_aging_check = 0.0
        self._promoted: str | None = None

    @property
    def has_first(self) -> bool:
        """The pool has several partitions, so its first (``high``) is one of a kind."""
        return len(self.streams) > 1

    def first(self, entry: Entry) -> bool:
        """``entry`` is of the first partition (``high``) of a pool that has several."""
        return self.has_first and entry.stream == self.streams[0]

    def score(self, entry: Entry) -> int:
        """The entry's place in line for its model (lower goes first)."""
        rank = self._ranks.get(entry.stream, len(self._ranks))
        return rank * RANK_MS + entry.timestamp_ms

    async def read(
        self,
        count: int,
        parked: Mapping[str, int],
        *,
        first_only: bool = False,
        parked_first: Mapping[str, int] | None = None,
    ) -> Read:
        """Up to ``parked[model]`` parked entries of each model named, then up to ``count`` new
        ones, without blocking (``first_only``: from the first partition only). With
        ``parked_first``, up to that many parked entries of the first partition for each model
        named there (for its reserved slots). Groups missing after a restart or FLUSHALL are
        created again."""
        try:
            await self._check_aging()
            return await self._read(count, parked, first_only, parked_first or {})
        except Exception as exc:
            if not is_missing_group(exc):
                raise
            log.warning("consumer group missing, creating it again", extra={"group": self._group})
            await ensure_groups(self._client, self.streams, self._group)
            return Read([], None, set())

    async def _read(
        self,
        count: int,
        parked: Mapping[str, int],
        first_only: bool,
        parked_first: Mapping[str, int],
    ) -> Read:
        order = self.streams
        first_limit = 0
        if first_only:
            order = self.streams[:1]
        elif self._promoted is not None:
            order = [self._promoted, *(s for s in self.streams if s != self._promoted)]
            first_limit = 1
        models = [m for m, n in parked.items() if n > 0]
        # (count, score bound) per parked set: any member, or the first partition's only
        sets = [(m, parked[m], -1) for m in models]
        sets += [(m, n, RANK_MS) for m, n in parked_first.items() if n > 0 and m not in parked]
        keys = [*order, self._wake, *(self._keys.parked(self.pool, m) for m, _, _ in sets)]
        args: list[EncodableT] = [
            self._group, self._consumer, PARKED_CONSUMER, count, first_limit, len(order),
            RANK_MS, self._aging_ms, self._max_entry_bytes, self._read_budget_bytes,
        ]  # fmt: skip
        for _, n, bound in sets:
            args += [n, bound]
        taken, found, last = await READ_SCRIPT(self._client, keys, args)
        got = dict.fromkeys(models, 0)
        entries = []
        for number, stream, item, deliveries in taken:
            model = sets[int(number) - 1][0]
            got[model] = got.get(model, 0) + 1
            entry = Entry.from_reply(text(stream), *item)
            entry.deliveries = int(deliveries)
            entries.append(entry)
        for index, items in found:
            stream = order[int(index) - 1]
            entries.extend(Entry.from_reply(stream, eid, fields) for eid, fields in items)
        drained = {m for m in models if got[m] < parked[m]}
        if len(entries) - len(taken) >= count or len(drained) < len(models):
            return Read(entries, None, drained)  # there may be more: read again before waiting
        return Read(entries, text(last[-1]), drained)

    async def block(self, *, first_only: bool = False) -> list[Entry]:
        """New entries (``first_only``: of the first partition), blocking up to ``block_ms``
        until one arrives: at most
        :data:`BLOCK_COUNT` from each partition that has some (a blocked read is served by the
        first partition that receives an entry; it cannot be held to a size, so it loads at
        most that many entries per partition, and one over the size limit becomes a stub at
        once). Cancelling it may leave what it was delivered pending here, to be adopted later
        (``Reclaimer.orphans``)."""
        try:
            streams = self.streams[:1] if first_only else self.streams
            reply = await self._client.xreadgroup(
                self._group, self._consumer, dict.fromkeys(streams, ">"), count=BLOCK_COUNT,
                block=self.block_ms,
            )  # fmt: skip
        except Exception as exc:
            # a stream deleted under a blocked read answers UNBLOCKED (Redis 7)
            if not (is_missing_group(exc) or "UNBLOCKED" in str(exc)):
                raise
            log.warning("consumer group missing, creating it again", extra={"group": self._group})
            await ensure_groups(self._client, self.streams, self._group)
            return []
        raise_if_cancelled()
        return [e.capped(self._max_entry_bytes) for e in entries_from_read(reply)]

    async def parked_since(self, wake_id: str) -> None:
        """Block up to ``block_ms`` until an entry of this pool is parked after ``wake_id`` (as
        :meth:`read` gave it). A plain XREAD: safe to cancel."""
        await self._client.xread({self._wake: wake_id}, count=1, block=self.block_ms)
        raise_if_cancelled()

    async def park(self, entries: Sequence[tuple[Entry, str]]) -> int:
        """Park ``(entry, model)`` pairs (entries this consumer holds); returns how many were
        parked (one taken from this consumer meanwhile is left alone)."""
        if not entries:
            return 0
        keys: list[str] = [self._wake, self._keys.parked_models(self.pool)]
        index: dict[str, int] = {}

        def key(name: str) -> int:
            if name not in index:
                keys.append(name)
                index[name] = len(keys)  # Lua indexes from 1
            return index[name]

        args: list[EncodableT] = [self._group, self._consumer, PARKED_CONSUMER]
        for entry, model in entries:
            args += (
                key(entry.stream), key(self._keys.parked(self.pool, model)), entry.entry_id,
                self.score(entry), model,
            )  # fmt: skip
        return int(await PARK_SCRIPT(self._client, keys, args))

    async def parked_models(self) -> dict[str, int]:
        """Models with parked entries in this pool, and how many each has."""
        names = [text(m) for m in await self._client.smembers(self._keys.parked_models(self.pool))]
        if not names:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.zcard(self._keys.parked(self.pool, name))
        counts = await pipe.execute()
        empty = [n for n, c in zip(names, counts, strict=True) if not c]
        if empty:
            # a racing park re-adds its model after this (SADD is in its script)
            await self._client.srem(self._keys.parked_models(self.pool), *empty)
        return {n: int(c) for n, c in zip(names, counts, strict=True) if c}

    async def _check_aging(self) -> None:
        if self._aging_ms <= 0 or len(self.streams) < 2:
            return
        now = time.monotonic()
        if now < self._next_aging_check:
            return
        self._next_aging_check = now + self._aging_check_s
        lower = self.streams[1:]
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
