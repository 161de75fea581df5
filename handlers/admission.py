"""Read batches on their way to running: prepared, begun, then one task per entry that runs.

A batch is prepared (validated; an instant model's outcome computed) in a task of its own, so
that it overlaps the worker's next read, then begun in one round trip (``BEGIN_MANY``, which
also writes the outcomes of instant models). Its entries hold slots until it is prepared; then
only those that will run as tasks keep one, until their task holds it. Until then the batch's
entries are "admitting": never adopted as orphans by the reclaimer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any, NoReturn

from handlers.instant import InstantTasks
from handlers.prepare import Prepared, now_ms, prepare
from handlers.runner import REDIS_TROUBLE, TaskRunner
from handlers.worker_config import Lane, WorkerConfig
from streams.entries import Entry
from streams.keys import Keys
from streams.outcome import BeginReply, Finish, Outcomes, Start

log = logging.getLogger(__name__)

EntryKey = tuple[str, str]
"""(stream, entry id)"""


class _Held:
    """A read batch on its way in: its entries, and the slots it still holds in its lane
    (all of them until it is prepared, then those of the entries that will run as tasks)."""

    __slots__ = ("entries", "lane", "slots")

    def __init__(self, lane: Lane, entries: list[EntryKey]) -> None:
        self.lane = lane
        self.entries = entries
        self.slots = len(entries)
        lane.admitting += self.slots

    def release(self, count: int) -> None:
        self.slots -= count
        self.lane.admitting -= count


class Admission:
    def __init__(
        self,
        *,
        keys: Keys,
        config: WorkerConfig,
        outcomes: Outcomes,
        runner: TaskRunner,
        instant: InstantTasks,
    ) -> None:
        self._keys = keys
        self._config = config
        self._outcomes = outcomes
        self._runner = runner
        self._instant = instant
        self.inflight: set[asyncio.Task[None]] = set()
        self._running_entries: dict[asyncio.Task[None], EntryKey] = {}
        # read batches being prepared or begun, and their entries
        self._admissions: set[asyncio.Task[None]] = set()
        self._admitting: set[EntryKey] = set()
        self.slot_freed = asyncio.Event()
        """Set whenever slots or begins may have freed up."""

    def busy(self) -> set[EntryKey]:
        """Entries this worker holds: running, or in a batch being admitted."""
        return set(self._running_entries.values()) | self._admitting

    async def drain(self, grace_s: float) -> None:
        """At shutdown: batches being begun start their tasks first; then running tasks get
        ``grace_s`` to finish, and the rest are cancelled, left pending for another worker."""
        if self._admissions:
            await asyncio.wait(set(self._admissions), timeout=grace_s)
        if self.inflight:
            log.info("draining", extra={"inflight": len(self.inflight)})
            _, pending = await asyncio.wait(set(self.inflight), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "grace period over, leaving tasks pending", extra={"count": len(pending)}
                )
                await asyncio.wait(pending)

    def admit(
        self, lane: Lane, entries: list[Entry], tg: asyncio.TaskGroup, *, at_once: bool = False
    ) -> None:
        """Prepare a read batch and begin it (one round trip, which also writes the outcomes of
        instant models) in a task of its own, so that it overlaps the next read; ``at_once``
        (latency first: the partitions are drained) prepares it and sends its begin before
        returning, ahead of the next read, and only the reply is awaited in the task. The batch
        holds its slots until it is prepared (then only the entries that will run as tasks hold
        one) and its entries are not orphans until their tasks hold them."""
        held = _Held(lane, [(e.stream, e.entry_id) for e in entries])
        lane.begins += 1
        self._admitting.update(held.entries)
        work = self._admit_now(held, entries, tg) if at_once else self._admission(held, entries, tg)
        task = tg.create_task(work)
        self._admissions.add(task)
        task.add_done_callback(functools.partial(self._admitted, held))

    def _admitted(self, held: _Held, task: asyncio.Task[None]) -> None:
        self._admissions.discard(task)
        held.release(held.slots)
        held.lane.begins -= 1
        self._admitting.difference_update(held.entries)
        self.slot_freed.set()

    async def _admission(self, held: _Held, entries: list[Entry], tg: asyncio.TaskGroup) -> None:
        await self._admit_now(held, entries, tg)

    def _admit_now(
        self, held: _Held, entries: list[Entry], tg: asyncio.TaskGroup
    ) -> Coroutine[Any, Any, None]:
        """Prepare the batch and send its begin now; what is left (the reply, then the tasks)
        is the coroutine returned."""
        try:
            prepared, starts, now = self._prepare(entries)
        except Exception:
            # the admission's guard: an error here must not end the worker's task group
            log.exception("preparing a batch failed, entries left pending")
            return _nothing()
        # an instant model's entry holds no slot: its work is done, its begin writes the outcome
        # (a later attempt found by begin runs as a task, briefly beyond the slots)
        instant = sum(1 for s in starts if s.finish is not None)
        if instant:
            held.release(instant)
            self.slot_freed.set()
        try:
            sent = self._outcomes.send_begin(starts, now)
        except Exception as exc:  # noqa: BLE001 - raised where the replies are awaited, below
            sent = _raise(exc)
        return self._begin(held.lane, prepared, starts, sent, tg)

    def _prepare(self, entries: list[Entry]) -> tuple[list[Prepared], list[Start], int]:
        cfg = self._config
        now = now_ms()
        prepared = [
            prepare(
                e,
                keys=self._keys,
                max_prompt_bytes=cfg.max_prompt_bytes,
                max_metadata_bytes=cfg.max_metadata_bytes,
            )
            for e in entries
        ]
        starts: list[Start] = []
        for p in prepared:
            event = p.event
            if event is None:
                continue
            keyed = event.idempotency_key is not None
            starts.append(
                Start(
                    entry=p.entry,
                    task_id=p.task_id,
                    model=p.model,
                    payload_hash=event.payload_hash() if keyed else "",
                    idempotency_key=event.idempotency_key,
                    reply_to=event.reply_to,
                    webhook_url=event.webhook_url,
                    max_attempts=event.max_attempts or cfg.max_attempts,
                    finish=self._instant.outcome(p, now),
                )
            )
        return prepared, starts, now

    async def _begin(
        self,
        lane: Lane,
        prepared: list[Prepared],
        starts: list[Start],
        sent: Awaitable[list[BeginReply]],
        tg: asyncio.TaskGroup,
    ) -> None:
        try:
            replies = iter(await sent)
        except REDIS_TROUBLE as exc:
            # nothing started: the entries stay pending here and are adopted again
            log.warning(
                "begin failed, entries left pending",
                extra={"count": len(starts), "error": repr(exc)},
            )
            return
        except Exception:
            # the admission's guard: an error here must not end the worker's task group
            log.exception("begin failed, entries left pending")
            return
        begun = iter(starts)
        finished: list[tuple[Prepared, Finish]] = []
        for p in prepared:
            # invalid entries skip `begin`: they end at once, as their first attempt
            if p.event is None:
                reply = BeginReply("run", attempts=1)
            else:
                reply, start = next(replies), next(begun)
                if reply.verdict == "finished" and start.finish is not None:
                    finished.append((p, start.finish))
                    continue
            if reply.verdict in ("done", "duplicate"):
                log.info(
                    "entry skipped",
                    extra={"task_id": p.task_id, "verdict": reply.verdict, "other": reply.other},
                )
                continue
            task = tg.create_task(self._runner.run(p, reply))
            self.inflight.add(task)
            lane.inflight.add(task)
            self._running_entries[task] = (p.entry.stream, p.entry.entry_id)
            task.add_done_callback(functools.partial(self._release, lane))
        self._instant.finished(finished)

    def _release(self, lane: Lane, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        lane.inflight.discard(task)
        self._running_entries.pop(task, None)
        self.slot_freed.set()


async def _nothing() -> None:
    return None


async def _raise(exc: Exception) -> NoReturn:
    raise exc
