"""The task worker: pull when ready, run, write exactly one outcome.

One loop takes free slots, then reads at most that many entries (highest partition first) and
hands the batch to admission (``handlers/admission.py``): prepared while the next read is in
Redis, begun in one round trip, then each entry an asyncio task that holds its slot until its
outcome is written, except the tasks of instant models, whose outcomes are written with their
start (``handlers/instant.py``). Beside it run the reclaimer (entries of workers whose lease
expired), the lease renewal, the control reader (cancellations), the retry mover (due retries
back to their partitions) and the trimmer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from opentelemetry.trace import Tracer
from redis.asyncio import Redis

from handlers.admission import Admission
from handlers.gpu_gate import GpuGate
from handlers.instant import InstantTasks
from handlers.metrics import Metrics
from handlers.prepare import now_ms
from handlers.runner import REDIS_TROUBLE, TaskRunner
from handlers.worker_config import Lane, WorkerConfig
from providers.registry import ModelRegistry
from streams.control import cancel_task, control_events
from streams.dispatch import PriorityReader
from streams.keys import TASK_GROUP, Keys
from streams.leases import Lease, Reclaimer
from streams.link import Link
from streams.outcome import Outcomes
from streams.retention import trim_all
from streams.retry import move_due
from streams.tokens import TokenStreams
from streams.topology import Backoff

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        *,
        client: Redis,
        keys: Keys,
        registry: ModelRegistry,
        config: WorkerConfig,
        tracer: Tracer | None = None,
        metrics: Metrics | None = None,
        gpu: GpuGate | None = None,
    ) -> None:
        if config.slots < 1:
            raise ValueError("a worker needs at least one slot")
        self._client = client
        self._keys = keys
        self._config = config
        self._streams = config.streams(keys)
        self._lanes = []
        # lean connections for the hot commands: one per pool for its blocking reads, one for
        # begins and finishes (pipelined), one for the blocking read of cancellations
        self._links: list[Link] = []
        write_link = self._link(client, f"{config.consumer}:write")
        self._control_link = self._link(client, f"{config.consumer}:control")
        for pool in config.pools:
            streams = [keys.tasks(pool, part) for part in config.partitions]
            reader = PriorityReader(
                client=client, streams=streams, consumer=config.consumer, block_ms=config.block_ms,
                aging_ms=config.aging_ms, aging_check_ms=config.aging_check_ms,
                link=self._link(client, f"{config.consumer}:read:{pool}"),
            )  # fmt: skip
            reclaimer = Reclaimer(
                client=client, keys=keys, streams=streams, consumer=config.consumer
            )
            slots = config.pool_slots.get(pool, config.slots)
            self._lanes.append(Lane(pool, reader, reclaimer, slots))
        self._lease = Lease(
            client=client, keys=keys, consumer=config.consumer, ttl_ms=config.lease_ttl_ms,
            info={"pools": ",".join(config.pools), "slots": str(config.slots)},
        )  # fmt: skip
        self._outcomes = Outcomes(
            client=client, keys=keys, worker=config.consumer,
            status_ttl_s=config.status_ttl_s, max_attempts=config.max_attempts, link=write_link,
        )  # fmt: skip
        self._runner = TaskRunner(
            registry=registry, outcomes=self._outcomes, policy=config.retry,
            consumer=config.consumer, max_attempts=config.max_attempts,
            tracer=tracer, metrics=metrics, trace_content=config.trace_content,
            tokens=TokenStreams(client=client, keys=keys, ttl_s=config.tokens_ttl_s),
            gpu=gpu,
        )  # fmt: skip
        # with tracing on, every task takes the runner's path and gets its spans
        instant = InstantTasks(
            registry=registry, writer=self._runner.writer, metrics=metrics, enabled=tracer is None
        )
        self._admission = Admission(
            keys=keys, config=config, outcomes=self._outcomes, runner=self._runner, instant=instant
        )
        self._slot_freed = self._admission.slot_freed
        self._intake = asyncio.Lock()
        self._ready = False

    def _link(self, client: Redis, name: str) -> Link | None:
        if not self._config.fast_link:
            return None
        link = Link.of(client, name=name)
        if link is not None:
            self._links.append(link)
        return link

    @property
    def consumer(self) -> str:
        return self._config.consumer

    @property
    def inflight(self) -> int:
        return len(self._admission.inflight)

    @property
    def slots(self) -> dict[str, int]:
        return {lane.pool: lane.slots for lane in self._lanes}

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def reader(self) -> PriorityReader:
        """The first pool's reader."""
        return self._lanes[0].reader

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then drain: in-flight tasks get ``shutdown_grace_s`` to
        finish; the rest are cancelled unacknowledged, left pending for another worker."""
        await self._start_up(stop)
        if stop.is_set():
            return
        lease_stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                lease_task = tg.create_task(self._lease.run(lease_stop))
                side = [
                    tg.create_task(self._consume(stop, tg)),
                    tg.create_task(
                        self._periodic(
                            stop, self._config.reclaim_interval_ms / 1000, self._reclaim_once(tg)
                        )
                    ),
                    tg.create_task(
                        self._periodic(stop, self._config.retry_poll_ms / 1000, self._move_retries)
                    ),
                    tg.create_task(self._periodic(stop, self._config.trim_interval_s, self._trim)),
                    tg.create_task(self._control(stop)),
                ]
                await stop.wait()
                await self._drain()
                await self._outcomes.drain()
                for task in side:
                    task.cancel()
                lease_stop.set()
                await lease_task
        finally:
            self._ready = False
            await self._lease.leave()
            for link in self._links:
                await link.aclose()

    async def _start_up(self, stop: asyncio.Event) -> None:
        if await self._lease.join(self._streams, TASK_GROUP, stop):
            self._ready = True
            log.info("worker started", extra={"consumer": self.consumer, "slots": self.slots})

    async def _drain(self) -> None:
        await self._admission.drain(self._config.shutdown_grace_s)

    async def _wait_for_slot(self, stop: asyncio.Event) -> None:
        self._slot_freed.clear()
        stop_wait = asyncio.ensure_future(stop.wait())
        slot_wait = asyncio.ensure_future(self._slot_freed.wait())
        try:
            await asyncio.wait({stop_wait, slot_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            slot_wait.cancel()

    async def _consume(self, stop: asyncio.Event, tg: asyncio.TaskGroup) -> None:
        backoff = Backoff(base=0.05, cap=2.0)
        while not stop.is_set():
            self._slot_freed.clear()
            active = [lane for lane in self._lanes if lane.can_read()]
            if not active:
                await self._wait_for_slot(stop)
                continue
            try:
                if len(self._lanes) == 1:
                    await self._read_one_pool(active[0], tg)
                else:
                    await self._read_pools(active, tg, stop)
                if backoff.failures:
                    log.info("redis reachable again")
                self._ready = True
                backoff.reset()
            except REDIS_TROUBLE as exc:
                if backoff.failures == 0:
                    log.warning("redis unavailable, retrying", extra={"error": repr(exc)})
                self._ready = False
                await backoff.sleep(stop)
            except Exception:
                # the consume loop's guard: log with the traceback, back off, go on
                log.exception("consume loop error")
                await backoff.sleep(stop)

    async def _read_one_pool(self, lane: Lane, tg: asyncio.TaskGroup) -> None:
        async with self._intake:
            async with asyncio.timeout(lane.reader.block_ms / 1000 + 10):
                entries = await lane.reader.read(lane.read_size())
            if entries:
                # the partitions are drained: the batch's begin goes out before the next read
                # (latency first); a full batch is prepared while that read is in Redis
                self._admission.admit(lane, entries, tg, at_once=lane.reader.drained)

    async def _read_pools(
        self, active: list[Lane], tg: asyncio.TaskGroup, stop: asyncio.Event
    ) -> None:
        """Several pools: each reads against its own free slots; when none has anything, wait
        for an arrival on any of them (a plain XREAD, safe to cut short) or for a freed slot."""
        waits: dict[str | bytes | memoryview, int | bytes | str | memoryview] = {}
        async with self._intake:
            for lane in active:
                async with asyncio.timeout(10):
                    entries, last = await lane.reader.read_now(lane.read_size())
                if entries:
                    self._admission.admit(lane, entries, tg)
                else:
                    waits.update(zip(lane.reader.streams, last, strict=True))
        if len(waits) < sum(len(lane.reader.streams) for lane in active):
            return  # something was read: go round again at once
        block_ms = self._lanes[0].reader.block_ms
        arrival = asyncio.ensure_future(self._client.xread(waits, count=1, block=block_ms))
        others = [
            asyncio.ensure_future(stop.wait()),
            asyncio.ensure_future(self._slot_freed.wait()),
        ]
        try:
            await asyncio.wait(
                {arrival, *others}, timeout=block_ms / 1000 + 5, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for f in others:
                f.cancel()
            if not arrival.done():
                arrival.cancel()  # XREAD without a group delivers nothing: cutting it short is safe
        if arrival.done() and not arrival.cancelled():
            arrival.result()  # raise what the read raised

    async def _periodic(
        self, stop: asyncio.Event, interval: float, job: Callable[[], Awaitable[None]]
    ) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            if stop.is_set():
                return
            try:
                async with asyncio.timeout(max(10.0, interval)):
                    await job()
            except REDIS_TROUBLE as exc:
                log.debug(
                    "periodic job skipped",
                    extra={"job": getattr(job, "__name__", "job"), "error": repr(exc)},
                )

    def _reclaim_once(self, tg: asyncio.TaskGroup) -> Callable[[], Awaitable[None]]:
        async def reclaim() -> None:
            min_idle = 2 * self._config.reclaim_interval_ms + self._config.block_ms
            for lane in self._lanes:
                if lane.free() <= 0:
                    continue
                async with self._intake:
                    entries = await lane.reclaimer.reclaim(lane.free())
                    # ours too: entries delivered while the link broke, that nothing here runs
                    busy = self._admission.busy()
                    entries += await lane.reclaimer.orphans(
                        lane.free() - len(entries), busy, min_idle_ms=min_idle
                    )
                    if entries:
                        self._admission.admit(lane, entries, tg)

        return reclaim

    async def _move_retries(self) -> None:
        await move_due(self._client, self._keys, now_ms())

    async def _trim(self) -> None:
        # one trimmer at a time across the fleet
        if await self._client.set(
            self._keys.trim_lock,
            self.consumer,
            nx=True,
            ex=max(5, int(self._config.trim_interval_s)),
        ):
            await trim_all(
                self._client, self._keys, self._streams, self._config.retention, now_ms()
            )

    async def _control(self, stop: asyncio.Event) -> None:
        backoff = Backoff(base=0.1, cap=5.0)
        while not stop.is_set():
            try:
                async for task_id in control_events(
                    self._control_link or self._client,
                    self._keys,
                    block_ms=self._config.block_ms,
                    stop=stop,
                ):
                    backoff.reset()
                    if self._runner.cancel(task_id):
                        log.info(
                            "cancel requested, stopping the generation", extra={"task_id": task_id}
                        )
                    else:
                        # not running here: end it if it is still queued (plain-XADD cancels)
                        await cancel_task(
                            self._client,
                            self._keys,
                            task_id,
                            status_ttl_s=self._config.status_ttl_s,
                            notify=False,
                        )
            except REDIS_TROUBLE:
                await backoff.sleep(stop)
