"""The task worker: its loops, and its start and shutdown.

One intake loop per pool (``intake``) starts tasks on their models' slots; beside them run the
reclaimer (entries of workers whose lease expired, and parked entries of models no longer
served), the lease renewal, the control reader (cancellations), the retry mover (due retries
back to their partitions) and the trimmer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from opentelemetry.trace import Tracer

from sop_llm.handlers.clock import now_ms
from sop_llm.handlers.metrics import Metrics
from sop_llm.handlers.tasks.config import WorkerConfig
from sop_llm.handlers.tasks.finish import Finisher
from sop_llm.handlers.tasks.gpu import GpuGate
from sop_llm.handlers.tasks.intake import PoolIntake
from sop_llm.handlers.tasks.run import TaskRunner
from sop_llm.handlers.tasks.slots import SlotBudget
from sop_llm.providers.registry import ModelRegistry
from sop_llm.streams.client import RedisClient
from sop_llm.streams.control import cancel_task, control_events
from sop_llm.streams.dispatch import PoolReader
from sop_llm.streams.errors import TRANSIENT_ERRORS, describe
from sop_llm.streams.keys import TASK_GROUP, Keys
from sop_llm.streams.leases import Lease, Reclaimer
from sop_llm.streams.models import ModelStore
from sop_llm.streams.outcome import Outcomes
from sop_llm.streams.retention import trim_if_due
from sop_llm.streams.retry import move_due
from sop_llm.streams.tokens import TokenStreams
from sop_llm.streams.topology import Backoff

log = logging.getLogger(__name__)

STALL_AFTER_S: Final = 2.0
"""A Redis call out this long past its own wait makes the worker "stalled" for readiness."""


class Worker:
    def __init__(
        self,
        *,
        client: RedisClient,
        keys: Keys,
        registry: ModelRegistry,
        config: WorkerConfig,
        tracer: Tracer | None = None,
        metrics: Metrics | None = None,
        gpu: GpuGate | None = None,
    ) -> None:
        self._client = client
        self._keys = keys
        self._config = config
        self._registry = registry
        self._streams = config.streams(keys)
        self.budget = SlotBudget(
            capacity=self._capacity,
            pool_caps={p: config.pool_cap(p) for p in config.pools},
            reserved=self._reserved,
        )
        self._lease = Lease(
            client=client, keys=keys, consumer=config.consumer, ttl_ms=config.lease_ttl_ms,
            info={"pools": ",".join(config.pools), "models": ",".join(sorted(registry.names()))},
        )  # fmt: skip
        self._outcomes = Outcomes(
            client=client, keys=keys, worker=config.consumer,
            status_ttl_s=config.status_ttl_s, max_attempts=config.max_attempts,
            durability=config.durability,
        )  # fmt: skip
        tokens = TokenStreams(client=client, keys=keys, ttl_s=config.tokens_ttl_s)
        finisher = Finisher(
            outcomes=self._outcomes, consumer=config.consumer, policy=config.retry,
            tokens=tokens, metrics=metrics,
        )  # fmt: skip
        self._runner = TaskRunner(
            registry=registry, outcomes=self._outcomes, finisher=finisher, tokens=tokens,
            consumer=config.consumer, max_attempts=config.max_attempts, tracer=tracer,
            metrics=metrics, trace_content=config.trace_content, gpu=gpu,
        )  # fmt: skip
        self._store = ModelStore(client=client, keys=keys)
        self._intakes = [self._intake(pool) for pool in config.pools]
        self._started = False

    def _intake(self, pool: str) -> PoolIntake:
        cfg = self._config
        reader = PoolReader(
            client=self._client, keys=self._keys, pool=pool, partitions=cfg.partitions,
            consumer=cfg.consumer, block_ms=cfg.block_ms, aging_ms=cfg.aging_ms,
            aging_check_ms=cfg.aging_check_ms, max_entry_bytes=cfg.max_entry_bytes,
            read_budget_bytes=cfg.read_budget_bytes,
        )  # fmt: skip
        reclaimer = Reclaimer(
            client=self._client, keys=self._keys, streams=reader.streams, consumer=cfg.consumer
        )
        return PoolIntake(
            keys=self._keys, reader=reader, reclaimer=reclaimer, budget=self.budget,
            runner=self._runner, registry=self._registry, store=self._store, config=cfg,
        )  # fmt: skip

    def _capacity(self, model: str) -> int:
        binding = self._registry.get(model)
        return binding.concurrency if binding is not None else 0

    def _reserved(self, model: str) -> int:
        binding = self._registry.get(model)
        return binding.reserved if binding is not None else 0

    @property
    def consumer(self) -> str:
        return self._config.consumer

    @property
    def inflight(self) -> int:
        return len(self._runner.inflight)

    @property
    def started(self) -> bool:
        """It joined its group and took its lease (it stays started through Redis trouble)."""
        return self._started

    @property
    def ready(self) -> bool:
        """Started, and every pool's last read reached Redis."""
        return self._started and all(i.ready for i in self._intakes)

    async def models_changed(self, version: int) -> None:
        """The registry took the model store's ``version``: parked entries of a model just
        loaded start, and the lease says which models this worker serves now (what
        ``sop-llm models add --wait`` waits for)."""
        for intake in self._intakes:
            intake.models_changed()
        await self._lease.update(models=",".join(sorted(self._registry.names())), version=version)

    def stalled(self) -> str | None:
        """Why the worker counts as stalled, or ``None``: a Redis call of its own (a read, a
        begin, a terminal write) has been out longer than its bound (the blocking read's time,
        the replicas' wait, then ``STALL_AFTER_S``). A worker busy with its models holds no
        call, so it never counts as stalled for that."""
        if not self._started:
            return None
        cfg = self._config
        durable = cfg.durability
        wait_s = durable.timeout_ms / 1000 if durable.replicas > 0 else 0.0
        bound = cfg.block_ms / 1000 + wait_s + STALL_AFTER_S
        calls = [self._outcomes.clock.oldest(), *(i.clock.oldest() for i in self._intakes)]
        out = [call for call in calls if call is not None]
        if not out:
            return None
        what, age = max(out, key=lambda call: call[1])
        return f"a {what} has waited {age:.1f} s on redis" if age > bound else None

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then drain: in-flight tasks get ``shutdown_grace_s`` to
        finish; the rest are cancelled unacknowledged, left pending for another worker."""
        if not await self._lease.join(self._streams, TASK_GROUP, stop):
            return
        self._started = True
        log.info("worker started", extra={"consumer": self.consumer})
        cfg = self._config
        lease_stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                lease_task = tg.create_task(self._lease.run(lease_stop))
                intakes = [tg.create_task(intake.run(stop, tg)) for intake in self._intakes]
                side = [
                    tg.create_task(self._periodic(stop, cfg.reclaim_interval_ms / 1000, _each(
                        [functools.partial(i.reclaim, tg) for i in self._intakes]
                    ))),
                    tg.create_task(self._periodic(stop, cfg.retry_poll_ms / 1000, self._retries)),
                    tg.create_task(self._periodic(stop, cfg.trim_interval_s, self._trim)),
                    tg.create_task(self._control(stop)),
                ]  # fmt: skip
                await stop.wait()
                # the intakes end on their own once stopped (their blocked reads are not cut)
                _, late = await asyncio.wait(intakes, timeout=cfg.block_ms / 1000 + 2)
                for task in late:
                    task.cancel()
                await self._runner.drain(cfg.shutdown_grace_s)
                await self._outcomes.drain()
                for task in side:
                    task.cancel()
                lease_stop.set()
                await lease_task
        finally:
            self._started = False
            for intake in self._intakes:
                intake.ready = False
            await self._lease.leave()

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
            except TRANSIENT_ERRORS as exc:
                log.debug("periodic job skipped", extra={"error": describe(exc)})
            except Exception:
                log.exception("periodic job failed")

    async def _retries(self) -> None:
        await move_due(self._client, self._keys, now_ms())

    async def _trim(self) -> None:
        cfg = self._config
        await trim_if_due(
            self._client, self._keys, self._streams, cfg.retention, now_ms(),
            holder=self.consumer, interval_s=cfg.trim_interval_s,
        )  # fmt: skip

    async def _control(self, stop: asyncio.Event) -> None:
        backoff = Backoff(base=0.1, cap=5.0)
        while not stop.is_set():
            try:
                async for task_id in control_events(
                    self._client, self._keys, block_ms=self._config.block_ms, stop=stop
                ):
                    backoff.reset()
                    if self._runner.cancel(task_id):
                        log.info(
                            "cancel requested, stopping the generation", extra={"task_id": task_id}
                        )
                    else:
                        # not running here: end it if it is still queued (plain-XADD cancels)
                        await cancel_task(
                            self._client, self._keys, task_id,
                            status_ttl_s=self._config.status_ttl_s, notify=False,
                        )  # fmt: skip
            except TRANSIENT_ERRORS:
                await backoff.sleep(stop)


def _each(jobs: list[Callable[[], Awaitable[None]]]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        for job in jobs:
            await job()

    return run
