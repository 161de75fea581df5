"""Running one task to its one outcome: execute, decide by policy, write."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue
from redis.exceptions import RedisClusterException, RedisError

from handlers.genai import genai_request_attributes, genai_response_attributes
from handlers.gpu_gate import GpuGate
from handlers.logctx import bind
from handlers.metrics import Metrics
from handlers.outcome_writer import OutcomeWriter
from handlers.policy import Fail, RetryPolicy
from handlers.prepare import Prepared, generation_request, now_ms
from providers.base import Generation
from providers.registry import ModelBinding, ModelRegistry
from schemas.errors import ErrorCode, SopError
from schemas.result import ErrorInfo, TaskState
from streams.outcome import BeginReply, Outcomes
from streams.tokens import TokenStreams, TokenWriter
from streams.topology import Backoff
from streams.tracecontext import context_from

log = logging.getLogger(__name__)

# RedisClusterException is not a RedisError: without it a cluster hiccup would end the worker
REDIS_TROUBLE = (RedisError, RedisClusterException, OSError, TimeoutError)


class _Cancelled(Exception):
    """The task was cancelled on request while it ran."""


@dataclass(slots=True)
class _Running:
    generation: asyncio.Task[Generation]
    cancelled: bool = False


class TaskRunner:
    def __init__(
        self,
        *,
        registry: ModelRegistry,
        outcomes: Outcomes,
        policy: RetryPolicy,
        consumer: str,
        max_attempts: int,
        tracer: Tracer | None = None,
        metrics: Metrics | None = None,
        trace_content: bool = False,
        tokens: TokenStreams | None = None,
        gpu: GpuGate | None = None,
    ) -> None:
        self._tokens = tokens
        self._gpu = gpu
        self._consumer = consumer
        # None: tracing is off, and no span (not even a no-op one) is made per task
        self._tracer = tracer
        self._metrics = metrics
        self._trace_content = trace_content
        self._registry = registry
        self._outcomes = outcomes
        self._policy = policy
        self._max_attempts = max_attempts
        self._writer = OutcomeWriter(
            outcomes=outcomes, consumer=consumer, redis_trouble=REDIS_TROUBLE, tokens=tokens,
            metrics=metrics,
        )  # fmt: skip
        self._running: dict[str, _Running] = {}

    @property
    def writer(self) -> OutcomeWriter:
        return self._writer

    def cancel(self, task_id: str) -> bool:
        """Stop the generation of ``task_id`` if it runs here (between tokens); True if it did."""
        running = self._running.get(task_id)
        if running is None or running.generation.done():
            return False
        running.cancelled = True
        running.generation.cancel()
        return True

    async def run(self, p: Prepared, begin: BeginReply) -> None:
        """Take an admitted entry to its outcome. Never raises except on cancellation."""
        if self._tracer is None:
            span_cm: contextlib.AbstractContextManager[Span] = contextlib.nullcontext(INVALID_SPAN)
        else:
            attributes: dict[str, AttributeValue] = {
                "messaging.system": "redis", "messaging.operation.type": "process",
                "messaging.destination.name": p.entry.stream,
                "messaging.message.id": p.entry.entry_id,
                "sop.task_id": p.task_id, "sop.attempt": begin.attempts,
            }  # fmt: skip
            span_cm = self._tracer.start_as_current_span(
                f"process {p.entry.stream}",
                context=context_from(p.entry.traceparent, p.entry.tracestate),
                kind=SpanKind.CONSUMER,
                attributes=attributes,
            )
        with span_cm as span:
            trace_id = span.get_span_context().trace_id
            bind(task_id=p.task_id, stream=p.entry.stream, entry_id=p.entry.entry_id, model=p.model)
            if trace_id:  # tracing on: logs and traces meet on the trace id
                bind(trace_id=format(trace_id, "032x"))
            if self._metrics is not None:
                self._metrics.inflight.inc()
                self._metrics.queue_wait.observe(max(0, now_ms() - p.entry.timestamp_ms) / 1000)
            try:
                await self._run(p, begin)
            finally:
                if self._metrics is not None:
                    self._metrics.inflight.dec()

    async def _run(self, p: Prepared, begin: BeginReply) -> None:
        started = now_ms()
        limit = (p.event.max_attempts if p.event else None) or self._max_attempts
        fail = None
        if p.error_code is not None:
            fail = Fail(p.error_code, p.error, dead_letter=True)
        elif begin.verdict == "conflict":
            message = f"idempotency_key is bound to task {begin.other} with a different payload"
            fail = Fail(ErrorCode.IDEMPOTENCY_CONFLICT, message, dead_letter=True)
        elif begin.verdict == "exhausted":
            message = f"delivered {begin.attempts} times, over the limit of {limit}"
            fail = Fail(ErrorCode.MAX_ATTEMPTS, message, dead_letter=True)
        if fail is not None:
            result = self._writer.failed(p, begin.attempts, started, fail)
            await self._writer.write(p, result, begin.errors, fail)
            return
        if begin.verdict == "cancelled":
            result = self._writer.result(
                p, begin.attempts, started, TaskState.CANCELLED, finish_reason="cancelled"
            )
            await self._writer.write(p, result, begin.errors)
            return
        await self._execute(p, begin, started, limit)

    async def _execute(self, p: Prepared, begin: BeginReply, started: int, limit: int) -> None:
        event = p.event
        assert event is not None
        attempts = begin.attempts
        deadline = p.deadline_ms()
        if deadline is not None and started >= deadline:
            result = self._writer.result(
                p, attempts, started, TaskState.EXPIRED, finish_reason="deadline", text=""
            )
            await self._writer.write(p, result, begin.errors)
            return
        parts: list[str] = []
        # queue and run times count from when the model really started (after its permit and
        # GPU slot), not from when this worker took the entry
        began = [started]
        try:
            gen = await self._generate(p, parts, deadline, began)
        except _Cancelled:
            result = self._writer.result(
                p, attempts, began[0], TaskState.CANCELLED, finish_reason="cancelled",
                text="".join(parts),
            )  # fmt: skip
        except TimeoutError as exc:
            if isinstance(exc, SopError):  # waiting for a GPU slot or a model load: a failure
                await self._attempt_failed(p, begin, began[0], limit, exc)
                return
            result = self._writer.result(
                p, attempts, began[0], TaskState.EXPIRED, finish_reason="deadline",
                text="".join(parts),
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the policy decides; unexpected ones are logged there
            await self._attempt_failed(p, begin, began[0], limit, exc)
            return
        else:
            result = self._writer.result(
                p, attempts, began[0], TaskState.COMPLETED,
                text=gen.text, finish_reason=gen.finish_reason, usage=gen.usage,
            )  # fmt: skip
        await self._writer.write(p, result, begin.errors)

    async def _attempt_failed(
        self, p: Prepared, begin: BeginReply, started: int, limit: int, exc: Exception
    ) -> None:
        """The policy decides: the task ends ``failed`` (maybe dead-lettered), or is retried."""
        attempts = begin.attempts
        if not isinstance(exc, SopError):
            # a provider bug must not take the worker down: logged, then treated as retryable
            log.exception("provider raised an unexpected error")
        decision = self._policy.decide(exc, attempts=attempts, max_attempts=limit)
        if isinstance(decision, Fail):
            # a schema_invalid answer keeps the model's raw output for the caller to inspect
            raw = getattr(exc, "raw_text", None)
            result = self._writer.failed(p, attempts, started, decision, text=raw)
            await self._writer.write(p, result, begin.errors, decision)
            return
        error = _error_info(exc)
        due = now_ms() + int(decision.delay_s * 1000)
        if self._metrics is not None:
            self._metrics.retries.labels(error.code.value).inc()
        if await self._schedule_retry(p, due, error):
            log.info(
                "retry scheduled",
                extra={
                    "attempts": attempts,
                    "delay_s": round(decision.delay_s, 3),
                    "error": error.code.value,
                },
            )
            return
        # a cancel came while it failed: it ends cancelled rather than being retried
        result = self._writer.result(
            p, attempts, started, TaskState.CANCELLED, finish_reason="cancelled"
        )
        await self._writer.write(p, result, begin.errors)

    async def _generate(
        self, p: Prepared, parts: list[str], deadline: int | None, began: list[int]
    ) -> Generation:
        event = p.event
        assert event is not None
        binding = self._registry.resolve(event.model)
        request = generation_request(event)
        timeout = None if deadline is None else max(0.0, (deadline - now_ms()) / 1000)
        operation = "chat" if event.messages is not None else "text_completion"
        if self._tracer is None:
            span_cm: contextlib.AbstractContextManager[Span] = contextlib.nullcontext(INVALID_SPAN)
        else:
            attributes = genai_request_attributes(
                operation, binding.provider.name, request, self._trace_content
            )
            span_cm = self._tracer.start_as_current_span(
                f"{operation} {event.model}", kind=SpanKind.CLIENT, attributes=attributes
            )
        with span_cm as span:
            try:
                async with (
                    asyncio.timeout(timeout) if timeout is not None else contextlib.nullcontext(),
                    binding.limit,
                    self._gpu_slot(p, binding, timeout),
                    self._token_writer(p) as tokens,
                ):
                    began[0] = now_ms()
                    t0 = asyncio.get_running_loop().time()

                    def on_delta(text: str) -> None:
                        parts.append(text)
                        if tokens is not None:
                            tokens.add(text)

                    generation = asyncio.ensure_future(
                        binding.provider.generate(request, on_delta=on_delta)
                    )
                    running = _Running(generation)
                    self._running[p.task_id] = running
                    try:
                        result = await generation
                    except asyncio.CancelledError:
                        if running.cancelled and not _current_cancelling():
                            raise _Cancelled from None
                        raise
                    finally:
                        self._running.pop(p.task_id, None)
                        if not generation.done():
                            generation.cancel()
            except BaseException as exc:
                span.set_attribute("error.type", _error_type(exc))
                span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
                raise
            elapsed = asyncio.get_running_loop().time() - t0
            if self._tracer is not None:
                span.set_attributes(genai_response_attributes(result, self._trace_content))
            self._observe_generation(event.model, result, elapsed)
            return result

    def _gpu_slot(
        self, p: Prepared, binding: ModelBinding, timeout: float | None
    ) -> contextlib.AbstractAsyncContextManager[None]:
        if self._gpu is None:
            return contextlib.nullcontext()
        _, partition = p.entry.stream.rsplit(":", 1)
        return self._gpu.hold(
            binding,
            partition=partition,
            holder_id=f"{self._consumer}:{p.task_id}",
            deadline_s=timeout,
        )

    @contextlib.asynccontextmanager
    async def _token_writer(self, p: Prepared) -> AsyncIterator[TokenWriter | None]:
        if p.event is None or not p.event.stream or self._tokens is None:
            yield None
            return
        async with self._tokens.writer(p.task_id) as writer:
            yield writer

    def _observe_generation(self, model: str, gen: Generation, elapsed_s: float) -> None:
        if self._metrics is None:
            return
        m = self._metrics.model(model)
        m.tokens_in.inc(gen.usage.input_tokens)
        m.tokens_out.inc(gen.usage.output_tokens)
        if elapsed_s > 0 and gen.usage.output_tokens:
            m.tokens_per_s.observe(gen.usage.output_tokens / elapsed_s)

    async def _schedule_retry(self, p: Prepared, due: int, error: ErrorInfo) -> bool:
        backoff = Backoff(base=0.05, cap=2.0)
        while True:
            try:
                async with asyncio.timeout(15):
                    scheduled = await self._outcomes.retry(
                        p.entry, p.task_id, due_ms=due, error=error
                    )
                return scheduled >= 0  # 0: already terminal elsewhere; -1: cancel requested
            except REDIS_TROUBLE:
                await backoff.sleep()


def _error_info(exc: BaseException) -> ErrorInfo:
    if isinstance(exc, SopError):
        return ErrorInfo(code=exc.code, message=exc.message)
    return ErrorInfo(code=ErrorCode.INTERNAL, message=f"{type(exc).__name__}: {exc}")


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, SopError):
        return exc.code.value
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, _Cancelled):
        return "cancelled"
    return type(exc).__qualname__


def _current_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
