"""When each outstanding Redis call began: what tells a stalled worker from a busy one.

A worker waiting on its model holds no Redis call; one whose calls do not come back (a frozen
master, a half-open connection, a pool whose every connection hangs) does. The sidecar's
readiness asks :meth:`CallClock.oldest` and says "worker stalled" once a call has been out
longer than its bound, before the socket timeout ends it.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Awaitable, Iterator
from typing import TypeVar

T = TypeVar("T")


class CallClock:
    def __init__(self) -> None:
        self._out: dict[int, tuple[str, float]] = {}
        self._ids = itertools.count()

    @contextlib.contextmanager
    def timing(self, what: str) -> Iterator[None]:
        """Count the block's time as one outstanding call named ``what``."""
        call = next(self._ids)
        self._out[call] = (what, time.monotonic())
        try:
            yield
        finally:
            del self._out[call]

    async def timed(self, what: str, call: Awaitable[T]) -> T:
        """Await ``call`` as one outstanding call named ``what``."""
        with self.timing(what):
            return await call

    def oldest(self) -> tuple[str, float] | None:
        """The longest-outstanding call's name and age in seconds; ``None`` when none is out."""
        if not self._out:
            return None
        what, since = min(self._out.values(), key=lambda item: item[1])
        return what, time.monotonic() - since
