"""Worker leases and reclaiming.

Each worker keeps ``{ns}:worker:<consumer>`` alive with a TTL (renewed by a background loop,
so a long generation keeps it alive). Entries pending for a consumer whose lease has expired
are claimed by a live worker: an entry is never taken merely because it is idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence, Set
from typing import Any

from redis.asyncio import Redis

from sop_llm.streams.entries import Entry, text
from sop_llm.streams.errors import INCIDENTS, TRANSIENT_ERRORS, describe
from sop_llm.streams.keys import PARKED_CONSUMER, TASK_GROUP, Keys
from sop_llm.streams.topology import Backoff, ensure_groups

log = logging.getLogger(__name__)

# an entry just claimed by another live reclaimer has an idle time below this, so two
# reclaimers racing for the same dead worker's entry cannot both take it
_CLAIM_MIN_IDLE_MS = 200
# a worker whose lease lapsed this long ago leaves the list of workers
_FORGET_LAPSED_MS = 3_600_000


class Lease:
    def __init__(
        self, *, client: Redis, keys: Keys, consumer: str, ttl_ms: int, info: dict[str, str]
    ) -> None:
        self._client = client
        self._key = keys.worker(consumer)
        self._consumer = consumer
        self._workers = keys.workers
        self._ttl_ms = ttl_ms
        self._fields = dict(info)
        self._info = json.dumps(self._fields)
        self._held = False

    async def renew(self) -> None:
        now = int(time.time() * 1000)
        pipe = self._client.pipeline(transaction=False)
        pipe.set(self._key, self._info, px=self._ttl_ms)
        pipe.zadd(self._workers, {self._consumer: now + self._ttl_ms})
        pipe.zremrangebyscore(self._workers, "-inf", now - _FORGET_LAPSED_MS)
        await pipe.execute()
        self._held = True

    async def update(self, **fields: object) -> None:
        """Change what the lease says about the worker; held leases say it at once (best
        effort: the renewal loop says it at the latest a third of the TTL later)."""
        self._fields.update({k: str(v) for k, v in fields.items()})
        self._info = json.dumps(self._fields)
        if self._held:
            with contextlib.suppress(*TRANSIENT_ERRORS):
                async with asyncio.timeout(2):
                    await self.renew()

    async def run(self, stop: asyncio.Event) -> None:
        """Renew every third of the TTL until ``stop`` is set. Every failure is retried: a
        refused renewal (out of memory, say) must not end the worker that holds the lease."""
        backoff = Backoff(base=0.1, cap=self._ttl_ms / 3000)
        while not stop.is_set():
            try:
                async with asyncio.timeout(self._ttl_ms / 3000):
                    await self.renew()
                backoff.reset()
                INCIDENTS.recovered()
                delay = self._ttl_ms / 3000
            except TRANSIENT_ERRORS as exc:
                INCIDENTS.trouble(exc, "lease renewal")
                delay = backoff.next_delay()
            except Exception:
                # the lease loop's guard: a refusal is logged with its traceback, then retried
                log.exception("lease renewal refused")
                delay = backoff.next_delay()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    async def release(self) -> None:
        self._held = False
        pipe = self._client.pipeline(transaction=False)
        pipe.delete(self._key)
        pipe.zrem(self._workers, self._consumer)
        await pipe.execute()

    async def join(self, streams: Sequence[str], group: str, stop: asyncio.Event) -> bool:
        """Create ``group`` on ``streams`` and take the lease, retrying with backoff while Redis
        is away (one warning per outage). ``False`` when ``stop`` came first."""
        backoff = Backoff(base=0.1, cap=5.0)
        while not stop.is_set():
            try:
                async with asyncio.timeout(10):
                    await ensure_groups(self._client, streams, group)
                    await self.renew()
                return True
            except TRANSIENT_ERRORS as exc:
                if backoff.failures == 0:
                    log.warning(
                        "redis unavailable at start, retrying", extra={"error": describe(exc)}
                    )
                await backoff.sleep(stop)
        return False

    async def leave(self) -> None:
        """Drop the lease at once (best effort): what this consumer leaves pending becomes
        claimable by others without waiting for the lease to expire."""
        with contextlib.suppress(*TRANSIENT_ERRORS):
            async with asyncio.timeout(2):
                await self.release()


class Reclaimer:
    def __init__(
        self,
        *,
        client: Redis,
        keys: Keys,
        streams: Sequence[str],
        consumer: str,
        group: str = TASK_GROUP,
    ) -> None:
        self._client = client
        self._keys = keys
        self._streams = list(streams)
        self._consumer = consumer
        self._group = group

    async def reclaim(self, free: int) -> list[Entry]:
        """Claim up to ``free`` entries pending for consumers whose lease has expired, highest
        partition first. Consumers with an expired lease and nothing pending are removed."""
        claimed: list[Entry] = []
        for stream in self._streams:
            if free - len(claimed) <= 0:
                break
            try:
                consumers = await self._client.xinfo_consumers(stream, self._group)
            except Exception as exc:  # a stream or group that does not exist (yet)
                if "NOGROUP" in str(exc) or "no such key" in str(exc).lower():
                    continue
                raise
            # parked entries wait for a slot of their model, taken only through the parked sets
            others = [
                (text(c["name"]), int(c["pending"]))
                for c in consumers
                if text(c["name"]) not in (self._consumer, PARKED_CONSUMER)
            ]
            if not others:
                continue
            pipe = self._client.pipeline(transaction=False)
            for name, _ in others:
                pipe.exists(self._keys.worker(name))
            alive = await pipe.execute()
            for (name, pending), is_alive in zip(others, alive, strict=True):
                if is_alive:
                    continue
                if pending == 0:
                    await self._client.xgroup_delconsumer(stream, self._group, name)
                    continue
                claimed.extend(await self._claim_from(stream, name, free - len(claimed)))
                if free - len(claimed) <= 0:
                    break
        return claimed

    async def orphans(
        self, free: int, busy: Set[tuple[str, str]], *, min_idle_ms: int
    ) -> list[Entry]:
        """Entries pending for *this* consumer that it is not running: delivered while the link
        to Redis broke (the reply or the start never came back). Nobody else would take them
        while this worker's lease lives, so it takes them again itself, once idle for
        ``min_idle_ms``. ``busy`` holds the ``(stream, entry id)`` of what runs here."""
        adopted: list[Entry] = []
        for stream in self._streams:
            if free - len(adopted) <= 0:
                break
            rows: list[Any] = await self._client.xpending_range(
                stream, self._group, min="-", max="+", count=free - len(adopted) + len(busy),
                consumername=self._consumer, idle=min_idle_ms,
            )  # fmt: skip
            ids = {i: n for i, n in _deliveries(rows).items() if (stream, i) not in busy}
            if ids:
                wanted = dict(list(ids.items())[: free - len(adopted)])
                adopted.extend(await self._claim_ids(stream, wanted, min_idle_ms))
        if adopted:
            log.warning("adopted own orphaned entries", extra={"count": len(adopted)})
        return adopted

    async def _claim_from(self, stream: str, owner: str, count: int) -> list[Entry]:
        rows: list[Any] = await self._client.xpending_range(
            stream, self._group, min="-", max="+", count=count, consumername=owner
        )
        entries = await self._claim_ids(stream, _deliveries(rows), _CLAIM_MIN_IDLE_MS)
        if entries:
            log.warning(
                "reclaimed entries of an expired worker",
                extra={"stream": stream, "owner": owner, "count": len(entries)},
            )
        return entries

    async def _claim_ids(self, stream: str, ids: dict[str, int], min_idle_ms: int) -> list[Entry]:
        """Claim ``ids`` (id → times delivered so far); each entry comes back with its count,
        this claim included."""
        if not ids:
            return []
        claim: list[str | bytes | int | memoryview] = list(ids)
        reply: Any = await self._client.xclaim(
            stream, self._group, self._consumer, min_idle_ms, claim
        )
        entries = []
        deleted = []
        for item in reply or []:
            if item is None:
                continue
            eid, fields = item
            if fields is None:
                # trimmed or deleted while pending (Redis 6.2 reports it; 7.x drops it itself)
                deleted.append(text(eid))
                continue
            entry = Entry.from_reply(stream, eid, fields)
            entry.deliveries = ids.get(entry.entry_id, 0) + 1
            entries.append(entry)
        if deleted:
            await self._client.xack(stream, self._group, *deleted)
        return entries


def _deliveries(rows: list[Any]) -> dict[str, int]:
    """Entry id → times delivered, from an XPENDING range."""
    return {text(r["message_id"]): int(r["times_delivered"]) for r in rows}
