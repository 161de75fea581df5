"""One pool's intake: read what the free slots allow, then start or park each entry.

Each pass reads, in one round trip, the best parked entries of the models that have free slots
here and up to as many new entries as there are free slots (``streams/dispatch.py``). Each
entry is validated (``prepare``); those whose model has a free slot start at once, best first,
and the rest are parked for the next free slot of their model on any worker. With nothing to
read, the pass waits for a new entry, a parked one, or a freed slot of a model that has parked
entries. A worker holds no task for a model beyond that model's slots: all others are parked.

A model's reserved slots (``slots.py``) go to entries of the pool's first partition only: with
every other slot taken, the pass reads only that partition (the others' entries stay in their
streams), so a ``high`` task arriving at a full model starts at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any, TypeVar

from sop_llm.handlers.tasks.config import WorkerConfig
from sop_llm.handlers.tasks.prepare import Prepared, prepare_entry
from sop_llm.handlers.tasks.run import TaskRunner
from sop_llm.handlers.tasks.slots import INVALID_MODEL, ModelSlot, SlotBudget
from sop_llm.providers.registry import ModelRegistry
from sop_llm.streams.clock import CallClock
from sop_llm.streams.dispatch import BLOCK_COUNT, PoolReader
from sop_llm.streams.entries import Entry
from sop_llm.streams.errors import INCIDENTS, TRANSIENT_ERRORS
from sop_llm.streams.keys import Keys
from sop_llm.streams.leases import Reclaimer
from sop_llm.streams.models import ModelStore
from sop_llm.streams.topology import Backoff

log = logging.getLogger(__name__)

T = TypeVar("T")


class PoolIntake:
    def __init__(
        self,
        *,
        keys: Keys,
        reader: PoolReader,
        reclaimer: Reclaimer,
        budget: SlotBudget,
        runner: TaskRunner,
        registry: ModelRegistry,
        store: ModelStore,
        config: WorkerConfig,
    ) -> None:
        """``store``: the models registered at run time, for entries of a model not loaded yet."""
        self.pool = reader.pool
        self._store = store
        self._keys = keys
        self._reader = reader
        self._reclaimer = reclaimer
        self._budget = budget
        self._runner = runner
        self._registry = registry
        self._config = config
        self._maybe_parked: set[str] = set()
        """Models that may have parked entries: a freed slot of one is worth a read."""
        self._wake = asyncio.Event()
        self._freed = asyncio.Event()
        self._unknown_since: dict[str, float] = {}
        self._blocked: asyncio.Future[list[Entry]] | None = None
        self._blocked_first: asyncio.Future[list[Entry]] | None = None
        """A blocked read of the first partition only (while only reserved slots are free)."""
        self._parked: asyncio.Future[None] | None = None
        self._wake_id: str | None = None
        self._must_read = True
        self.ready = False
        self._reached = False
        """A Redis call went through since the last pass ended."""
        self.clock = CallClock()
        """The pool's Redis reads out now (a stalled worker's tell)."""
        budget.listen(self._released)

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        """A Redis call of the intake: timed (a stalled worker's tell), and noted as reached."""
        result = await self.clock.timed(what, call)
        self._reached = True
        return result

    def models_changed(self) -> None:
        """The registry changed: a model just loaded may have parked entries waiting for it."""
        self._maybe_parked.update(self._registry.names())
        self._wake.set()

    def _released(self, slot: ModelSlot) -> None:
        self._freed.set()
        if slot.model in self._maybe_parked:
            self._wake.set()

    def _free(self) -> dict[str, int]:
        """Free slots per model this pool may start now."""
        models = [*self._registry.names(), INVALID_MODEL]
        free = {m: self._budget.free(self.pool, m) for m in models}
        return {m: n for m, n in free.items() if n > 0}

    async def run(self, stop: asyncio.Event, tg: asyncio.TaskGroup) -> None:
        """Read and start until ``stop`` is set."""
        backoff = Backoff(base=0.05, cap=2.0)
        quiet_retry = True
        try:
            while not stop.is_set():
                try:
                    await self._pass(stop, tg)
                    if self._reached:  # not a pass that only waited for a freed slot
                        self._reached = False
                        INCIDENTS.recovered()
                        self.ready = True
                        backoff.reset()
                        quiet_retry = True
                except TRANSIENT_ERRORS as exc:
                    self._must_read = True
                    self._reached = False
                    if quiet_retry and not INCIDENTS.ongoing:
                        # the first error after calls went through (a pooled connection the
                        # server closed while this intake had nothing to read, after a restart)
                        # is tried again at once before it counts as an incident
                        quiet_retry = False
                        continue
                    INCIDENTS.trouble(exc, "read")
                    self.ready = False
                    self._must_read = True
                    await backoff.sleep(stop)
                except Exception:
                    # the intake's guard: log with the traceback, back off, go on
                    log.exception("intake error")
                    self._must_read = True
                    await backoff.sleep(stop)
        finally:
            # the blocked reads end within block_ms: let them (a cut redis-py command costs its
            # connection); what they were delivered stays pending here, and the lease is dropped
            # at shutdown, so another worker takes it at once
            reads = [
                f
                for f in (self._blocked, self._blocked_first, self._parked)
                if f is not None and not f.done()
            ]
            if reads:
                _, late = await asyncio.wait(reads, timeout=self._reader.block_ms / 1000 + 1)
                for f in late:
                    f.cancel()

    async def _pass(self, stop: asyncio.Event, tg: asyncio.TaskGroup) -> None:
        await self._route_blocked(tg)  # first: what it starts takes slots
        self._freed.clear()
        free = self._free()
        # new entries only for the free slots of real models: the slots of invalid entries are
        # extra, kept for the ones that arrive among the others
        count = sum(n for m, n in free.items() if m != INVALID_MODEL)
        if not count:
            reserved = self._reserved_free()
            if reserved:
                await self._first_partition(reserved, stop, tg)
                return
            await _first(stop.wait(), self._freed.wait(), also=self._blocked_reads())
            # the tasks of one terminal write release their slots in the same tick: let them
            # all, so that the next read takes what they freed
            await asyncio.sleep(0)
            return
        if self._must_read or self._wake_id is None:
            self._wake.clear()
            read = await self._call(
                "read", self._reader.read(count, free, parked_first=self._spares_for_parked())
            )
            self.ready = True  # it reached Redis (not only once the pass is over)
            self._maybe_parked -= read.drained
            # what a blocked read brought meanwhile goes into the same choice, best first
            entries = read.entries + self._blocked_entries()
            if entries:
                await self._route(entries, tg)
            if read.wake_id is None:
                return  # there may be more: read again
            self._wake_id, self._must_read = read.wake_id, False
        await self._idle(self._wake_id, stop)

    def _reserved_free(self) -> int:
        """Free reserved slots of this pool's models, when the pool has a first partition to
        keep them for (with one partition they stay unused)."""
        if not self._reader.has_first:
            return 0
        return sum(self._budget.free_reserved(b.name) for b in self._registry.bindings([self.pool]))

    def _spares_for_parked(self) -> dict[str, int]:
        """Free reserved slots of the models that may have parked entries: each takes a parked
        entry of the first partition (the oldest) before a new one."""
        if not self._reader.has_first:
            return {}
        spares = {
            b.name: self._budget.free_reserved(b.name)
            for b in self._registry.bindings([self.pool])
            if b.name in self._maybe_parked
        }
        return {m: n for m, n in spares.items() if n}

    def _blocked_reads(self) -> list[asyncio.Future[list[Entry]]]:
        return [f for f in (self._blocked, self._blocked_first) if f is not None]

    async def _first_partition(
        self, count: int, stop: asyncio.Event, tg: asyncio.TaskGroup
    ) -> None:
        """Only reserved slots are free: read the first partition alone, else wait in a blocked
        read of it (or for a freed slot)."""
        read = await self._call(
            "read",
            self._reader.read(count, {}, first_only=True, parked_first=self._spares_for_parked()),
        )
        if read.entries:
            await self._route(read.entries, tg)
            return
        if self._blocked_first is None:
            self._blocked_first = asyncio.ensure_future(
                self._call("blocking read", self._reader.block(first_only=True))
            )
            self._blocked_first.add_done_callback(_seen)
        await _first(stop.wait(), self._freed.wait(), also=self._blocked_reads())
        await asyncio.sleep(0)

    async def _idle(self, wake_id: str, stop: asyncio.Event) -> None:
        """Nothing to read: block in ``XREADGROUP`` for a new entry (it delivers it at once) and
        in ``XREAD`` for an entry parked elsewhere, and stop waiting as well when a slot frees
        for a model with parked entries. Neither blocked read is cut short (a cancelled command
        costs its connection); what they bring is handled on the next pass."""
        if self._wake.is_set():
            self._must_read = True  # a slot freed for a model with parked entries: read now
            return
        if self._blocked is None:
            self._blocked = asyncio.ensure_future(self._call("blocking read", self._reader.block()))
            self._blocked.add_done_callback(_seen)
        if self._parked is None:
            self._parked = asyncio.ensure_future(
                self._call("blocking read", self._reader.parked_since(wake_id))
            )
            self._parked.add_done_callback(_seen)
        local = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            waits: set[asyncio.Future[Any]] = {self._blocked, self._parked, *local}
            if self._blocked_first is not None:
                waits.add(self._blocked_first)
            await asyncio.wait(
                waits,
                timeout=self._reader.block_ms / 1000 + 5,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for f in local:
                f.cancel()
        if self._wake.is_set():
            self._must_read = True
        if self._parked.done():
            parked, self._parked = self._parked, None
            parked.result()  # raise what the read raised
            # an entry was parked (or the wait timed out): any model with a free slot may find
            # one, so read
            self._maybe_parked.update(self._registry.names())
            self._maybe_parked.add(INVALID_MODEL)
            self._must_read = True

    async def _route_blocked(self, tg: asyncio.TaskGroup) -> None:
        """Route what the blocked read brought, once it is back."""
        entries = self._blocked_entries()
        if entries:
            await self._route(entries, tg)

    def _blocked_entries(self) -> list[Entry]:
        """What the blocked reads brought, once back (then new ones may start). A read's error
        is raised once nothing another read brought would be lost with it."""
        entries: list[Entry] = []
        error: BaseException | None = None
        if self._blocked_first is not None and self._blocked_first.done():
            first, self._blocked_first = self._blocked_first, None
            error = first.exception()
            entries = [] if error is not None else first.result()
        blocked = self._blocked
        if blocked is not None and blocked.done():
            self._blocked = None
            error = error or blocked.exception()
            if blocked.exception() is None:
                entries += blocked.result()
        if error is not None:
            if not entries:
                raise error
            self._must_read = True  # routed now; the next read meets the trouble again
        per_stream = collections.Counter(e.stream for e in entries)
        if per_stream and max(per_stream.values()) >= BLOCK_COUNT:
            self._must_read = True  # a partition gave all it could: there may be more
        return entries

    async def _route(
        self, entries: list[Entry], tg: asyncio.TaskGroup, *, wait_for_models: bool = True
    ) -> None:
        """Start each entry on a free slot of its model, best first; park the rest. An entry
        whose model is registered but not loaded here yet is parked too (it has no slot), and
        waits for this worker or another to load it, up to ``unknown_model_grace_s``."""
        prepared = [self._prepare(entry) for entry in entries]
        coming: set[str] = set()
        if wait_for_models:
            unknown = {p.model for p in prepared if p.event and not self._registry.get(p.model)}
            if unknown:
                coming = await self._call("read", self._store.registered(unknown))
        by_model: dict[str, list[Prepared]] = {}
        for p in prepared:
            known = p.event is not None and (p.model in coming or self._registry.get(p.model))
            by_model.setdefault(p.model if known else INVALID_MODEL, []).append(p)
        parked: list[tuple[Entry, str]] = []
        for model, ps in by_model.items():
            ps.sort(key=lambda p: self._reader.score(p.entry))
            for p in ps:
                slot = self._budget.take(self.pool, model, first=self._reader.first(p.entry))
                if slot is None:
                    parked.append((p.entry, model))
                else:
                    self._runner.start(p, slot, tg)
        if parked:
            self._maybe_parked.update(model for _, model in parked)
            # on failure the entries stay pending here and are adopted again later
            await self._call("park", self._reader.park(parked))

    def _prepare(self, entry: Entry) -> Prepared:
        return prepare_entry(entry, keys=self._keys, config=self._config)

    async def reclaim(self, tg: asyncio.TaskGroup) -> None:
        """Take what dead workers left, and this worker's own entries that nothing runs (their
        read's reply was lost): started or parked like any entry. Then end the parked entries
        of models no longer served once they have waited ``unknown_model_grace_s``."""
        free = sum(n for m, n in self._free().items() if m != INVALID_MODEL)
        if free > 0:
            entries = await self._reclaimer.reclaim(free)
            min_idle = 2 * self._config.reclaim_interval_ms + self._config.block_ms
            entries += await self._reclaimer.orphans(
                free - len(entries), self._runner.busy(), min_idle_ms=min_idle
            )
            if entries:
                await self._route(entries, tg)
        await self._end_unknown(tg)

    async def _end_unknown(self, tg: asyncio.TaskGroup) -> None:
        now = time.monotonic()
        parked = await self._reader.parked_models()
        unknown = {m for m in parked if m != INVALID_MODEL and self._registry.get(m) is None}
        self._unknown_since = {m: self._unknown_since.get(m, now) for m in unknown}
        due = {
            m: parked[m]
            for m, since in self._unknown_since.items()
            if now - since >= self._config.unknown_model_grace_s
        }
        if due:
            read = await self._call("read", self._reader.read(0, due))
            log.warning(
                "parked entries of a model no longer served",
                extra={"models": sorted(due), "count": len(read.entries)},
            )
            await self._route(read.entries, tg, wait_for_models=False)


async def _first(
    *waits: Coroutine[Any, Any, Any], also: Sequence[asyncio.Future[Any]] = ()
) -> None:
    """Wait for the first of ``waits`` (and of ``also``, which are left running), then cancel
    the others."""
    futures = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait([*futures, *also], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in futures:
            f.cancel()


def _seen(future: asyncio.Future[Any]) -> None:
    """Mark a blocked read's error as seen: one that ends after the intake stopped (a cut
    redis-py read can finish with a connection error) has no reader left."""
    if not future.cancelled():
        future.exception()
