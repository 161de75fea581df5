"""A task's end: its result, the retry policy's decision after a failed attempt, and the one
terminal write (retried while Redis is unreachable)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sop_llm.handlers.clock import now_ms
from sop_llm.handlers.metrics import Metrics
from sop_llm.handlers.policy import Fail, RetryPolicy
from sop_llm.handlers.tasks.prepare import Prepared
from sop_llm.schemas.errors import ErrorCode, SopError
from sop_llm.schemas.result import DeadLetter, ErrorInfo, FinishReason, TaskResult, TaskState, Usage
from sop_llm.streams.errors import INCIDENTS, TRANSIENT_ERRORS, describe
from sop_llm.streams.outcome import Finish, Outcomes, webhook_job
from sop_llm.streams.tokens import TokenStreams
from sop_llm.streams.topology import Backoff
from sop_llm.streams.tracecontext import current_traceparent

log = logging.getLogger(__name__)

T = TypeVar("T")


class Finisher:
    def __init__(
        self,
        *,
        outcomes: Outcomes,
        consumer: str,
        policy: RetryPolicy,
        tokens: TokenStreams,
        metrics: Metrics | None = None,
    ) -> None:
        self._outcomes = outcomes
        self._consumer = consumer
        self._policy = policy
        self._tokens = tokens
        self._metrics = metrics

    def result(
        self,
        p: Prepared,
        attempts: int,
        started: int,
        state: TaskState,
        *,
        text: str | None = None,
        finish_reason: FinishReason | None = None,
        usage: Usage | None = None,
        error: ErrorInfo | None = None,
    ) -> TaskResult:
        finished = now_ms()
        return TaskResult(
            task_id=p.task_id, state=state, model=p.model or None, text=text,
            finish_reason=finish_reason, usage=usage,
            queued_ms=max(0, started - p.entry.timestamp_ms), run_ms=max(0, finished - started),
            worker=self._consumer, attempts=attempts, error=error,
            metadata=p.event.metadata if p.event else None, finished_at=finished,
        )  # fmt: skip

    async def end(
        self,
        p: Prepared,
        attempts: int,
        started: int,
        state: TaskState,
        earlier: tuple[ErrorInfo, ...] = (),
        *,
        text: str | None = None,
        finish_reason: FinishReason | None = None,
        usage: Usage | None = None,
    ) -> None:
        """End the task in ``state`` (not ``failed``: see :meth:`fail`)."""
        result = self.result(
            p, attempts, started, state, text=text, finish_reason=finish_reason, usage=usage
        )
        await self.write(p, result, earlier)

    async def fail(
        self,
        p: Prepared,
        attempts: int,
        started: int,
        fail: Fail,
        earlier: tuple[ErrorInfo, ...] = (),
        *,
        text: str | None = None,
        usage: Usage | None = None,
    ) -> None:
        """End the task ``failed`` (dead-lettered when ``fail`` says so)."""
        error = ErrorInfo(code=fail.code, message=fail.message)
        result = self.result(
            p, attempts, started, TaskState.FAILED, finish_reason="error", error=error, text=text,
            usage=usage,
        )  # fmt: skip
        await self.write(p, result, earlier, fail)

    async def attempt_failed(
        self,
        p: Prepared,
        attempts: int,
        started: int,
        limit: int,
        exc: Exception,
        earlier: tuple[ErrorInfo, ...],
        *,
        usage: Usage | None = None,
    ) -> None:
        """The policy decides: the task ends ``failed`` (maybe dead-lettered), or is retried.
        ``usage``: what the failed attempt used, reported when it is the last."""
        if not isinstance(exc, SopError):
            # a provider bug must not take the worker down: logged, then treated as retryable
            log.exception("provider raised an unexpected error")
        decision = self._policy.decide(exc, attempts=attempts, max_attempts=limit)
        if isinstance(decision, Fail):
            # a schema_invalid answer keeps the model's raw output for the caller to inspect
            raw = getattr(exc, "raw_text", None)
            await self.fail(p, attempts, started, decision, earlier, text=raw, usage=usage)
            return
        error = _error_info(exc)
        due = now_ms() + int(decision.delay_s * 1000)
        if self._metrics is not None:
            self._metrics.retries.labels(error.code.value).inc()
        try:
            scheduled = await self._schedule_retry(p, due, error)
        except Exception as exc:  # noqa: BLE001 - a refusal: the task's own keys are unusable
            await self.abandon(p, attempts, exc)
            return
        if scheduled:
            log.info(
                "retry scheduled",
                extra={"attempts": attempts, "delay_s": round(decision.delay_s, 3),
                       "error": error.code.value},
            )  # fmt: skip
            return
        # a cancel came while it failed: it ends cancelled rather than being retried
        await self.end(
            p, attempts, started, TaskState.CANCELLED, earlier, finish_reason="cancelled"
        )

    async def write(
        self,
        p: Prepared,
        result: TaskResult,
        earlier: tuple[ErrorInfo, ...],
        fail: Fail | None = None,
    ) -> None:
        event = p.event
        dead = None
        if fail is not None and fail.dead_letter and result.error is not None:
            dead = DeadLetter(
                source_stream=p.entry.stream, entry_id=p.entry.entry_id, task_id=p.task_id,
                reason=fail.code, message=fail.message, attempts=result.attempts,
                fields=p.entry.printable_fields(), errors=[*earlier, result.error],
                dead_at=result.finished_at,
            )  # fmt: skip
        url = event.webhook_url if event else None
        # results and webhook jobs carry this worker's span (the sender's span hangs under it);
        # with tracing off, the producer's trace context goes on unchanged
        traceparent, tracestate = current_traceparent()
        if not traceparent:
            traceparent, tracestate = p.entry.traceparent, p.entry.tracestate
        fin = Finish(
            traceparent=traceparent, tracestate=tracestate,
            entry=p.entry, result=result, reply_to=event.reply_to if event else None,
            idempotency_key=event.idempotency_key if event else None,
            webhook=webhook_job(result, url) if url else None, dead=dead,
            fenced=event is None,
        )  # fmt: skip
        # the write runs on its own (a shutdown cannot cut it in half); connection trouble is
        # retried until it lands (the entry stays pending meanwhile, so nothing is lost)
        try:
            written = await _retried(lambda: self._outcomes.finish(fin))
        except Exception as exc:  # noqa: BLE001 - a refusal: the task's own keys are unusable
            await self.abandon(p, result.attempts, exc)
            return
        if event is not None and event.stream:
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await self._tokens.end(
                    p.task_id, state=result.state.value, finish_reason=result.finish_reason
                )
        if written == 1:
            log.info(
                "task finished", extra={"state": result.state.value, "attempts": result.attempts}
            )
            self._observe(p, result, dead)
        elif written == -2:
            log.warning("malformed entry carries another entry's task id: dead-lettered alone")
        else:
            log.info("task already finished by another attempt")

    async def abandon(self, p: Prepared, attempts: int, exc: BaseException) -> None:
        """End an entry whose task's own keys refuse to be written (a key of another type, a
        script error): ``failed`` with ``internal`` on ``results``, dead-lettered, acknowledged,
        so that it neither holds its slot nor comes back. Nothing else is touched."""
        message = f"the task's status could not be written: {describe(exc)}"[:500]
        log.error("task abandoned", extra={"error": describe(exc)})
        fail = Fail(ErrorCode.INTERNAL, message, dead_letter=True)
        result = self.result(
            p, attempts, now_ms(), TaskState.FAILED, finish_reason="error",
            error=ErrorInfo(code=fail.code, message=message),
        )  # fmt: skip
        assert result.error is not None
        dead = DeadLetter(
            source_stream=p.entry.stream, entry_id=p.entry.entry_id, task_id=p.task_id,
            reason=fail.code, message=message, attempts=attempts,
            fields=p.entry.printable_fields(), errors=[result.error], dead_at=result.finished_at,
        )  # fmt: skip
        fin = Finish(entry=p.entry, result=result, dead=dead)
        try:
            if await _retried(lambda: self._outcomes.abandon(fin)) and self._metrics is not None:
                self._metrics.outcome(result.state.value).inc()
                self._metrics.dead_letters.labels(fail.code.value).inc()
        except Exception:
            # results or the dead letters themselves refuse: nothing can be written; the entry
            # stays pending (and its delivery count ends it once the namespace is repaired)
            log.exception("abandoning the task failed too")

    def _observe(self, p: Prepared, result: TaskResult, dead: DeadLetter | None) -> None:
        if self._metrics is None:
            return
        self._metrics.outcome(result.state.value).inc()
        if p.event is not None:  # an invalid entry names no model worth a series of its own
            self._metrics.model(p.model).run_time.observe(result.run_ms / 1000)
        if dead is not None:
            self._metrics.dead_letters.labels(dead.reason.value).inc()

    async def _schedule_retry(self, p: Prepared, due: int, error: ErrorInfo) -> bool:
        async def once() -> int:
            async with asyncio.timeout(15):
                return await self._outcomes.retry(p.entry, p.task_id, due_ms=due, error=error)

        return await _retried(once) >= 0  # 0: already terminal elsewhere; -1: cancel requested


async def _retried(call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` until it does not fail with connection trouble."""
    backoff = Backoff(base=0.05, cap=2.0)
    while True:
        try:
            reply = await call()
        except TRANSIENT_ERRORS as exc:
            INCIDENTS.trouble(exc, "terminal write")
            await backoff.sleep()
        else:
            INCIDENTS.recovered()
            return reply


def _error_info(exc: BaseException) -> ErrorInfo:
    if isinstance(exc, SopError):
        return ErrorInfo(code=exc.code, message=exc.message)
    return ErrorInfo(code=ErrorCode.INTERNAL, message=f"{type(exc).__name__}: {exc}")
