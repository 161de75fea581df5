"""Building a task's result and writing its one outcome (with retries on Redis trouble)."""

from __future__ import annotations

import contextlib
import logging

from handlers.metrics import Metrics
from handlers.policy import Fail
from handlers.prepare import Prepared, now_ms
from schemas.result import DeadLetter, ErrorInfo, FinishReason, TaskResult, TaskState, Usage
from streams.outcome import Finish, Outcomes, webhook_job
from streams.tokens import TokenStreams
from streams.topology import Backoff
from streams.tracecontext import current_traceparent

log = logging.getLogger(__name__)


class OutcomeWriter:
    def __init__(
        self,
        *,
        outcomes: Outcomes,
        consumer: str,
        redis_trouble: tuple[type[BaseException], ...],
        tokens: TokenStreams | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._outcomes = outcomes
        self._consumer = consumer
        self._trouble = redis_trouble
        self._tokens = tokens
        self._metrics = metrics

    def failed(
        self, p: Prepared, attempts: int, started: int, fail: Fail, *, text: str | None = None
    ) -> TaskResult:
        error = ErrorInfo(code=fail.code, message=fail.message)
        return self.result(
            p, attempts, started, TaskState.FAILED, finish_reason="error", error=error, text=text
        )

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
        # validated: pydantic's (compiled) validation is faster than model_construct's loop
        return TaskResult(
            task_id=p.task_id, state=state, model=p.model or None, text=text,
            finish_reason=finish_reason, usage=usage,
            queued_ms=max(0, started - p.entry.timestamp_ms), run_ms=max(0, finished - started),
            worker=self._consumer, attempts=attempts, error=error,
            metadata=p.event.metadata if p.event else None, finished_at=finished,
        )  # fmt: skip

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
        # results and webhook jobs carry this worker's span: the sender's span hangs under it
        traceparent, tracestate = current_traceparent()
        fin = Finish(
            traceparent=traceparent, tracestate=tracestate,
            entry=p.entry, result=result, reply_to=event.reply_to if event else None,
            idempotency_key=event.idempotency_key if event else None,
            webhook=webhook_job(result, url) if url else None, dead=dead,
        )  # fmt: skip
        # the write runs on its own (a shutdown cannot cut it in half); Redis trouble is retried
        # until it lands (the entry stays pending meanwhile, so nothing is lost)
        backoff = Backoff(base=0.05, cap=2.0)
        while True:
            try:
                written = await self._outcomes.finish(fin)
            except self._trouble as exc:
                if backoff.failures == 0:
                    log.warning("terminal write failed, retrying", extra={"error": repr(exc)})
                await backoff.sleep()
                continue
            if p.event is not None and p.event.stream and self._tokens is not None:
                with contextlib.suppress(*self._trouble):
                    await self._tokens.end(
                        p.task_id, state=result.state.value, finish_reason=result.finish_reason
                    )
            if written == 1:
                log.info(
                    "task finished",
                    extra={"state": result.state.value, "attempts": result.attempts},
                )
                self._observe_outcome(p, result, dead)
            else:
                log.info("task already finished by another attempt")
            return

    def _observe_outcome(self, p: Prepared, result: TaskResult, dead: DeadLetter | None) -> None:
        if self._metrics is None:
            return
        self._metrics.outcome(result.state.value).inc()
        self._metrics.model(p.model or "").run_time.observe(result.run_ms / 1000)
        if dead is not None:
            self._metrics.dead_letters.labels(dead.reason.value).inc()
