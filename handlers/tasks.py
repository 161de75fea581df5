"""The task worker: pull when ready, run, write exactly one outcome.

One loop takes free slots, then reads at most that many entries (highest partition first); each
entry becomes an asyncio task that holds its slot until its terminal write has been acknowledged
by Redis. A second loop reclaims entries of workers whose lease expired; a third keeps this
worker's lease alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from handlers.logctx import bind
from handlers.prepare import Prepared, now_ms, prepare
from providers.base import GenerationRequest
from providers.registry import ModelRegistry
from schemas.errors import ErrorCode, SopError
from schemas.result import DeadLetter, ErrorInfo, TaskResult, TaskState, Usage, WebhookJob
from streams.dispatch import PriorityReader
from streams.entries import Entry
from streams.keys import TASK_GROUP, Keys
from streams.leases import Lease, Reclaimer
from streams.outcome import BeginReply, Finish, Outcomes, Start
from streams.topology import Backoff, ensure_groups

log = logging.getLogger(__name__)

# errors that say the task itself is bad: it is dead-lettered with its raw entry
_INPUT_ERRORS = frozenset(
    {ErrorCode.INVALID_EVENT, ErrorCode.MODEL_NOT_FOUND, ErrorCode.IDEMPOTENCY_CONFLICT}
)
_REDIS_TROUBLE = (RedisError, OSError, TimeoutError, ConnectionError)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    consumer: str
    pools: Sequence[str]
    partitions: Sequence[str]
    slots: int
    block_ms: int = 1000
    aging_ms: int = 30_000
    aging_check_ms: int = 1_000
    lease_ttl_ms: int = 10_000
    reclaim_interval_ms: int = 2_000
    max_attempts: int = 3
    status_ttl_s: int = 86_400
    max_prompt_bytes: int = 1 << 20
    max_metadata_bytes: int = 16 << 10
    shutdown_grace_s: float = 30.0

    def streams(self, keys: Keys) -> list[str]:
        """Task partitions in read order: priority-major, pools interleaved."""
        return [keys.tasks(pool, part) for part in self.partitions for pool in self.pools]


class Worker:
    def __init__(
        self, *, client: Redis, keys: Keys, registry: ModelRegistry, config: WorkerConfig
    ) -> None:
        if config.slots < 1:
            raise ValueError("a worker needs at least one slot")
        self._client = client
        self._keys = keys
        self._registry = registry
        self._config = config
        streams = config.streams(keys)
        self._streams = streams
        self._reader = PriorityReader(
            client=client,
            streams=streams,
            consumer=config.consumer,
            block_ms=config.block_ms,
            aging_ms=config.aging_ms,
            aging_check_ms=config.aging_check_ms,
        )
        self._reclaimer = Reclaimer(
            client=client, keys=keys, streams=streams, consumer=config.consumer
        )
        self._lease = Lease(
            client=client,
            keys=keys,
            consumer=config.consumer,
            ttl_ms=config.lease_ttl_ms,
            info={"pools": ",".join(config.pools), "slots": str(config.slots)},
        )
        self._outcomes = Outcomes(
            client=client,
            keys=keys,
            worker=config.consumer,
            status_ttl_s=config.status_ttl_s,
            max_attempts=config.max_attempts,
        )
        self._inflight: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._intake = asyncio.Lock()
        self._ready = False

    @property
    def consumer(self) -> str:
        return self._config.consumer

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def reader(self) -> PriorityReader:
        return self._reader

    def _free(self) -> int:
        return self._config.slots - len(self._inflight)

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set, then drain: in-flight tasks get ``shutdown_grace_s`` to
        finish; the rest are cancelled unacknowledged, left pending for another worker."""
        await self._start_up(stop)
        lease_stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                lease_task = tg.create_task(self._lease.run(lease_stop))
                tg.create_task(self._consume(stop, tg))
                tg.create_task(self._reclaim_loop(stop, tg))
                await stop.wait()
                await self._drain()
                lease_stop.set()
                await lease_task
        finally:
            self._ready = False
            with contextlib.suppress(*_REDIS_TROUBLE):
                async with asyncio.timeout(2):
                    # leave at once: our unfinished entries become claimable without waiting
                    await self._lease.release()

    async def _start_up(self, stop: asyncio.Event) -> None:
        backoff = Backoff(base=0.1, cap=5.0)
        while not stop.is_set():
            try:
                async with asyncio.timeout(10):
                    await ensure_groups(self._client, self._streams, TASK_GROUP)
                    await self._lease.renew()
                self._ready = True
                log.info(
                    "worker started", extra={"consumer": self.consumer, "slots": self._config.slots}
                )
                return
            except _REDIS_TROUBLE as exc:
                if backoff.failures == 0:
                    log.warning("redis unavailable at start, retrying", extra={"error": repr(exc)})
                await backoff.sleep(stop)

    async def _drain(self) -> None:
        if self._inflight:
            log.info("draining", extra={"inflight": len(self._inflight)})
            _, pending = await asyncio.wait(
                set(self._inflight), timeout=self._config.shutdown_grace_s
            )
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "grace period over, leaving tasks pending", extra={"count": len(pending)}
                )
                await asyncio.wait(pending)

    async def _consume(self, stop: asyncio.Event, tg: asyncio.TaskGroup) -> None:
        backoff = Backoff(base=0.05, cap=2.0)
        while not stop.is_set():
            if self._free() <= 0:
                self._slot_freed.clear()
                stop_wait = asyncio.ensure_future(stop.wait())
                slot_wait = asyncio.ensure_future(self._slot_freed.wait())
                try:
                    await asyncio.wait({stop_wait, slot_wait}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop_wait.cancel()
                    slot_wait.cancel()
                continue
            try:
                async with self._intake:
                    async with asyncio.timeout(self._reader.block_ms / 1000 + 10):
                        entries = await self._reader.read(self._free())
                    if entries:
                        await self._admit(entries, tg)
                if backoff.failures:
                    log.info("redis reachable again")
                    self._ready = True
                backoff.reset()
            except _REDIS_TROUBLE as exc:
                if backoff.failures == 0:
                    log.warning("redis unavailable, retrying", extra={"error": repr(exc)})
                self._ready = False
                await backoff.sleep(stop)
            except Exception:
                # the consume loop's guard: log with the traceback, back off, go on
                log.exception("consume loop error")
                await backoff.sleep(stop)

    async def _reclaim_loop(self, stop: asyncio.Event, tg: asyncio.TaskGroup) -> None:
        interval = self._config.reclaim_interval_ms / 1000
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            if stop.is_set() or self._free() <= 0:
                continue
            try:
                async with self._intake:
                    async with asyncio.timeout(10):
                        entries = await self._reclaimer.reclaim(self._free())
                    if entries:
                        await self._admit(entries, tg)
            except _REDIS_TROUBLE as exc:
                log.debug("reclaim skipped", extra={"error": repr(exc)})

    async def _admit(self, entries: list[Entry], tg: asyncio.TaskGroup) -> None:
        """Begin a read batch in one round trip and start a task per runnable entry."""
        cfg = self._config
        prepared = [
            prepare(
                e,
                keys=self._keys,
                max_prompt_bytes=cfg.max_prompt_bytes,
                max_metadata_bytes=cfg.max_metadata_bytes,
            )
            for e in entries
        ]
        valid = [p for p in prepared if p.event is not None]
        starts = [
            Start(
                entry=p.entry,
                task_id=p.task_id,
                model=p.model,
                payload_hash=p.event.payload_hash() if p.event.idempotency_key is not None else "",
                idempotency_key=p.event.idempotency_key,
            )
            for p in valid
            if p.event is not None
        ]
        replies = dict(
            zip((id(p) for p in valid), await self._outcomes.begin(starts, now_ms()), strict=True)
        )
        for p in prepared:
            reply = replies.get(id(p), BeginReply("run", attempts=1))
            if reply.verdict in ("done", "duplicate"):
                log.info(
                    "entry skipped",
                    extra={"task_id": p.task_id, "verdict": reply.verdict, "other": reply.other},
                )
                continue
            task = tg.create_task(self._handle(p, reply))
            self._inflight.add(task)
            task.add_done_callback(self._release)

    def _release(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slot_freed.set()

    async def _handle(self, p: Prepared, begin: BeginReply) -> None:
        bind(task_id=p.task_id, stream=p.entry.stream, entry_id=p.entry.entry_id, model=p.model)
        started = now_ms()
        if p.error_code is not None:
            result = self._failed(p, begin.attempts, started, p.error_code, p.error)
        elif begin.verdict == "conflict":
            result = self._failed(
                p,
                begin.attempts,
                started,
                ErrorCode.IDEMPOTENCY_CONFLICT,
                f"idempotency_key is bound to task {begin.other} with a different payload",
            )
        elif begin.verdict == "exhausted":
            result = self._failed(
                p,
                begin.attempts,
                started,
                ErrorCode.MAX_ATTEMPTS,
                f"delivered {begin.attempts} times, over the limit of {self._config.max_attempts}",
            )
        else:
            result = await self._execute(p, begin.attempts, started)
        await self._write(p, result)

    async def _execute(self, p: Prepared, attempts: int, started: int) -> TaskResult:
        event = p.event
        assert event is not None
        deadline = p.deadline_ms()
        if deadline is not None and started >= deadline:
            return self._result(
                p, attempts, started, TaskState.EXPIRED, finish_reason="deadline", text=""
            )
        parts: list[str] = []
        try:
            binding = self._registry.resolve(event.model)
            request = GenerationRequest(
                model=event.model,
                prompt=event.prompt,
                messages=event.messages,
                temperature=event.temperature,
                top_p=event.top_p,
                max_tokens=event.max_tokens,
                stop=tuple(event.stop or ()),
                seed=event.seed,
                response_format=event.response_format,
            )
            timeout = None if deadline is None else max(0.0, (deadline - now_ms()) / 1000)
            async with asyncio.timeout(timeout):
                async with binding.limit:
                    gen = await binding.provider.generate(request, on_delta=parts.append)
        except TimeoutError:
            return self._result(
                p,
                attempts,
                started,
                TaskState.EXPIRED,
                finish_reason="deadline",
                text="".join(parts),
            )
        except SopError as exc:
            return self._failed(p, attempts, started, exc.code, exc.message)
        except Exception as exc:
            # a provider bug must not take the worker down: the task fails, the loop goes on
            log.exception("provider raised an unexpected error")
            return self._failed(
                p, attempts, started, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"
            )
        return self._result(
            p,
            attempts,
            started,
            TaskState.COMPLETED,
            text=gen.text,
            finish_reason=gen.finish_reason,
            usage=gen.usage,
        )

    def _failed(
        self, p: Prepared, attempts: int, started: int, code: ErrorCode, message: str
    ) -> TaskResult:
        return self._result(
            p,
            attempts,
            started,
            TaskState.FAILED,
            finish_reason="error",
            error=ErrorInfo(code=code, message=message),
        )

    def _result(
        self,
        p: Prepared,
        attempts: int,
        started: int,
        state: TaskState,
        *,
        text: str | None = None,
        finish_reason: str | None = None,
        usage: Usage | None = None,
        error: ErrorInfo | None = None,
    ) -> TaskResult:
        finished = now_ms()
        return TaskResult.model_validate(
            {
                "task_id": p.task_id,
                "state": state,
                "model": p.model or None,
                "text": text,
                "finish_reason": finish_reason,
                "usage": usage,
                "queued_ms": max(0, started - p.entry.timestamp_ms),
                "run_ms": max(0, finished - started),
                "worker": self._config.consumer,
                "attempts": attempts,
                "error": error,
                "metadata": p.event.metadata if p.event else None,
                "finished_at": finished,
            }
        )

    async def _write(self, p: Prepared, result: TaskResult) -> None:
        event = p.event
        dead = None
        if result.error is not None and (
            result.error.code in _INPUT_ERRORS or result.error.code == ErrorCode.MAX_ATTEMPTS
        ):
            dead = DeadLetter(
                source_stream=p.entry.stream,
                entry_id=p.entry.entry_id,
                task_id=p.task_id,
                reason=result.error.code,
                message=result.error.message,
                attempts=result.attempts,
                fields=p.entry.printable_fields(),
                dead_at=result.finished_at,
            )
        webhook = None
        if event is not None and event.webhook_url:
            webhook = WebhookJob(
                delivery_id=f"msg_{uuid.uuid4().hex}",
                task_id=p.task_id,
                url=event.webhook_url,
                event=f"task.{result.state.value}",
                payload=result,
                created_at=result.finished_at,
            )
        fin = Finish(
            entry=p.entry,
            result=result,
            reply_to=event.reply_to if event else None,
            idempotency_key=event.idempotency_key if event else None,
            webhook=webhook,
            dead=dead,
        )
        # the final write is shielded: a shutdown does not cut it in half; Redis trouble is
        # retried until it lands (the entry stays pending meanwhile, so nothing is lost)
        backoff = Backoff(base=0.05, cap=2.0)
        while True:
            try:
                written = await asyncio.shield(self._finish(fin))
            except _REDIS_TROUBLE as exc:
                if backoff.failures == 0:
                    log.warning("terminal write failed, retrying", extra={"error": repr(exc)})
                await backoff.sleep()
                continue
            if written:
                log.info(
                    "task finished",
                    extra={"state": result.state.value, "attempts": result.attempts},
                )
            else:
                log.info("task already finished by another attempt")
            return

    async def _finish(self, fin: Finish) -> bool:
        async with asyncio.timeout(15):
            return await self._outcomes.finish(fin)
