"""Streams and consumer groups: created idempotently, re-created after a restart or FLUSHALL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterable

from redis.asyncio import Redis
from redis.exceptions import ResponseError

log = logging.getLogger(__name__)


async def ensure_groups(client: Redis, streams: Iterable[str], group: str) -> None:
    """Create ``group`` on each stream (MKSTREAM, reading from the start); existing ones stay."""
    pipe = client.pipeline(transaction=False)
    names = list(streams)
    for stream in names:
        pipe.xgroup_create(stream, group, id="0", mkstream=True)
    for stream, reply in zip(names, await pipe.execute(raise_on_error=False), strict=True):
        if isinstance(reply, ResponseError) and "BUSYGROUP" not in str(reply):
            raise reply
        if reply is True:
            log.info("consumer group created", extra={"stream": stream, "group": group})


def is_missing_group(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and "NOGROUP" in str(exc)


class Backoff:
    """Exponential backoff with full jitter, for reconnects and group re-creation."""

    def __init__(self, *, base: float = 0.05, cap: float = 2.0) -> None:
        self._base = base
        self._cap = cap
        self._failures = 0

    @property
    def failures(self) -> int:
        return self._failures

    def reset(self) -> None:
        self._failures = 0

    def next_delay(self) -> float:
        delay = min(self._cap, self._base * (2**self._failures))
        self._failures += 1
        return random.uniform(delay / 2, delay)

    async def sleep(self, stop: asyncio.Event | None = None) -> None:
        delay = self.next_delay()
        if stop is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
