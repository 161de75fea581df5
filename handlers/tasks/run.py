"""Running one task on its slot: the GPU slot, the start, the deadline, cancellation and the
provider call, then the finish.

The order keeps the contract: a task is ``running`` (``begin``) only once its model's slot, and
for a local model its GPU slot, are held; until then it is ``queued``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Span, Tracer

from sop_llm.handlers.clock import now_ms
from sop_llm.handlers.logctx import bind
from sop_llm.handlers.metrics import Metrics
from sop_llm.handlers.policy import Fail
from sop_llm.handlers.tasks.finish import Finisher
from sop_llm.handlers.tasks.gpu import GpuGate
from sop_llm.handlers.tasks.prepare import Prepared, generation_request
from sop_llm.handlers.tasks.slots import ModelSlot
from sop_llm.handlers.tasks.spans import Spans
from sop_llm.providers.base import DeltaSink, Generation, GenerationRequest
from sop_llm.providers.registry import ModelBinding, ModelRegistry
from sop_llm.schemas.errors import ErrorCode, ModelNotFoundError, SopError
from sop_llm.schemas.result import ErrorInfo, TaskState, Usage
from sop_llm.streams.errors import INCIDENTS, TRANSIENT_ERRORS
from sop_llm.streams.outcome import BeginReply, Outcomes, Start
from sop_llm.streams.tokens import TokenStreams, TokenWriter

log = logging.getLogger(__name__)

EntryKey = tuple[str, str]
"""(stream, entry id)"""


class _Cancelled(Exception):
    """The task was cancelled on request while it ran."""

    error_type = "cancelled"


@dataclass(slots=True)
class _Generating:
    task: asyncio.Task[Any]
    """The task's own asyncio task: a cancel on request cancels it while it generates."""
    cancelled: bool = False


class TaskRunner:
    def __init__(
        self,
        *,
        registry: ModelRegistry,
        outcomes: Outcomes,
        finisher: Finisher,
        tokens: TokenStreams,
        consumer: str,
        max_attempts: int,
        tracer: Tracer | None = None,
        metrics: Metrics | None = None,
        trace_content: bool = False,
        gpu: GpuGate | None = None,
    ) -> None:
        self._registry = registry
        self._outcomes = outcomes
        self._finish = finisher
        self._tokens = tokens
        self._consumer = consumer
        self._max_attempts = max_attempts
        self._spans = Spans(tracer, content=trace_content)
        self._metrics = metrics
        self._gpu = gpu
        self._generating: dict[str, _Generating] = {}
        self.inflight: dict[asyncio.Task[None], EntryKey] = {}

    def busy(self) -> set[EntryKey]:
        """The entries of the tasks that run here."""
        return set(self.inflight.values())

    def start(self, p: Prepared, slot: ModelSlot, tg: asyncio.TaskGroup) -> None:
        """Run ``p`` on ``slot`` in a task of its own (the slot is released when it ends)."""
        task = tg.create_task(self._run(p, slot))
        self.inflight[task] = (p.entry.stream, p.entry.entry_id)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.inflight.pop(task, None)

    async def drain(self, grace_s: float) -> None:
        """At shutdown: running tasks get ``grace_s`` to finish; the rest are cancelled, left
        pending for another worker."""
        if not self.inflight:
            return
        log.info("draining", extra={"inflight": len(self.inflight)})
        _, pending = await asyncio.wait(set(self.inflight), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("grace period over, leaving tasks pending", extra={"count": len(pending)})
            await asyncio.wait(pending)

    def cancel(self, task_id: str) -> bool:
        """Stop the generation of ``task_id`` if it runs here (between tokens); True if it did."""
        running = self._generating.get(task_id)
        if running is None or running.cancelled:
            return running is not None
        running.cancelled = True
        running.task.cancel()
        return True

    async def _run(self, p: Prepared, slot: ModelSlot) -> None:
        async with slot:
            with self._spans.process(p.entry, p.task_id) as span:
                trace_id = span.get_span_context().trace_id
                bind(
                    task_id=p.task_id, stream=p.entry.stream, entry_id=p.entry.entry_id,
                    model=p.model,
                )  # fmt: skip
                if trace_id:  # tracing on: logs and traces meet on the trace id
                    bind(trace_id=format(trace_id, "032x"))
                try:
                    await self._attempt(p, span)
                except Exception:
                    # the task's guard: an error in Redis that is not passing trouble leaves the
                    # entry pending (it is adopted again later); it never ends the worker
                    log.exception("task left pending after an error")

    async def _attempt(self, p: Prepared, span: Span) -> None:
        started = now_ms()
        if p.event is None:  # invalid: it ends at once, as its first attempt
            assert p.error_code is not None
            await self._finish.fail(p, 1, started, Fail(p.error_code, p.error, dead_letter=True))
            return
        binding = self._registry.get(p.event.model)
        deadline = p.deadline_ms()
        if binding is None or (deadline is not None and started >= deadline):
            await self._started(p, span, None, deadline)
            return
        with binding.in_use():
            if self._gpu is None or not binding.needs_gpu_slot:
                await self._started(p, span, binding, deadline)
                return
            async with contextlib.AsyncExitStack() as stack:
                try:
                    await stack.enter_async_context(self._gpu_slot(p, binding, deadline))
                except Exception as exc:  # noqa: BLE001 - a failed attempt, decided after begin
                    await self._started(p, span, binding, deadline, exc)
                    return
                await self._started(p, span, binding, deadline)

    async def _started(
        self,
        p: Prepared,
        span: Span,
        binding: ModelBinding | None,
        deadline: int | None,
        waited: Exception | None = None,
    ) -> None:
        """Begin the task (its slots held), then run or end it."""
        begin = await self._begin(p)
        if begin is None:
            return
        if span.is_recording():
            span.set_attribute("sop.attempt", begin.attempts)
        if self._metrics is not None:
            self._metrics.queue_wait.observe(max(0, now_ms() - p.entry.timestamp_ms) / 1000)
            self._metrics.inflight.inc()
        try:
            await self._decide(p, begin, binding, deadline, waited)
        finally:
            if self._metrics is not None:
                self._metrics.inflight.dec()

    async def _begin(self, p: Prepared) -> BeginReply | None:
        """Mark the task running; ``None`` when it must not run here."""
        event = p.event
        assert event is not None
        keyed = event.idempotency_key is not None
        start = Start(
            entry=p.entry, task_id=p.task_id, model=p.model,
            payload_hash=event.payload_hash() if keyed else "",
            idempotency_key=event.idempotency_key, reply_to=event.reply_to,
            webhook_url=event.webhook_url, max_attempts=event.max_attempts or self._max_attempts,
        )  # fmt: skip
        try:
            [reply] = await self._outcomes.begin([start], now_ms())
        except TRANSIENT_ERRORS as exc:
            # nothing started: the entry stays pending here and is adopted again
            INCIDENTS.trouble(exc, "begin")
            return None
        except Exception as exc:  # noqa: BLE001 - a refusal: this entry ends, no other
            await self._finish.abandon(p, 1, exc)
            return None
        if reply.verdict in ("done", "duplicate"):
            log.info("entry skipped", extra={"verdict": reply.verdict, "other": reply.other})
            return None
        return reply

    async def _decide(
        self,
        p: Prepared,
        begin: BeginReply,
        binding: ModelBinding | None,
        deadline: int | None,
        waited: Exception | None,
    ) -> None:
        event = p.event
        assert event is not None
        started = now_ms()
        attempts, earlier = begin.attempts, begin.errors
        limit = event.max_attempts or self._max_attempts
        if begin.verdict == "conflict":
            fail = Fail(
                ErrorCode.IDEMPOTENCY_CONFLICT,
                "idempotency_key is bound to another task with a different payload",
                dead_letter=True,
            )
            await self._finish.fail(p, attempts, started, fail, earlier)
        elif begin.verdict == "exhausted":
            message = f"delivered {attempts} times, over the limit of {limit}"
            fail = Fail(ErrorCode.MAX_ATTEMPTS, message, dead_letter=True)
            await self._finish.fail(p, attempts, started, fail, earlier)
        elif begin.verdict == "cancelled":
            await self._finish.end(
                p, attempts, started, TaskState.CANCELLED, earlier, finish_reason="cancelled"
            )
        elif deadline is not None and started >= deadline:
            await self._finish.end(
                p, attempts, started, TaskState.EXPIRED, earlier, finish_reason="deadline", text=""
            )
        elif binding is None or waited is not None:
            # an unknown model, or the GPU slot (or the model's load) could not be had
            exc = waited or _not_found(self._registry, event.model)
            await self._finish.attempt_failed(p, attempts, started, limit, exc, earlier)
        else:
            await self._execute(p, binding, attempts, earlier, deadline, limit)

    async def _execute(
        self,
        p: Prepared,
        binding: ModelBinding,
        attempts: int,
        earlier: tuple[ErrorInfo, ...],
        deadline: int | None,
        limit: int,
    ) -> None:
        started = now_ms()
        parts: list[str] = []
        assert p.event is not None
        request = generation_request(p.event)
        try:
            gen = await self._generate(p, binding, request, parts, deadline)
        except _Cancelled:
            await self._finish.end(
                p, attempts, started, TaskState.CANCELLED, earlier, finish_reason="cancelled",
                text="".join(parts), usage=_spent(request, parts),
            )  # fmt: skip
        except TimeoutError as exc:
            if isinstance(exc, SopError):  # a provider's own timeout: a failed attempt
                await self._finish.attempt_failed(
                    p, attempts, started, limit, exc, earlier, usage=_spent(request, parts)
                )
                return
            await self._finish.end(
                p, attempts, started, TaskState.EXPIRED, earlier, finish_reason="deadline",
                text="".join(parts), usage=_spent(request, parts),
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the policy decides; unexpected ones are logged there
            usage = _spent(request, parts)
            await self._finish.attempt_failed(
                p, attempts, started, limit, exc, earlier, usage=usage
            )
        else:
            await self._finish.end(
                p, attempts, started, TaskState.COMPLETED, earlier, text=gen.text,
                finish_reason=gen.finish_reason, usage=gen.usage,
            )  # fmt: skip

    async def _generate(
        self,
        p: Prepared,
        binding: ModelBinding,
        request: GenerationRequest,
        parts: list[str],
        deadline: int | None,
    ) -> Generation:
        event = p.event
        assert event is not None
        timeout = None if deadline is None else max(0.0, (deadline - now_ms()) / 1000)
        operation = "chat" if event.messages is not None else "text_completion"
        with self._spans.call(operation, binding.provider.name, request) as span:
            tokens = self._tokens.writer(p.task_id) if event.stream else None
            task = asyncio.current_task()
            assert task is not None
            running = self._generating[p.task_id] = _Generating(task)
            t0 = asyncio.get_running_loop().time()
            # a task that does not stream is one plain request (a remote backend's cheapest
            # call, usage in its reply); cut short, it keeps no partial text, only its usage
            sink = _sink(parts, tokens) if event.stream else None
            async with asyncio.timeout(timeout), tokens or contextlib.nullcontext():
                try:
                    result = await binding.provider.generate(request, on_delta=sink)
                except asyncio.CancelledError:
                    # a cancel on request (not a shutdown, not the deadline) ends the task
                    if running.cancelled and task.uncancel() == 0:
                        raise _Cancelled from None
                    raise
                finally:
                    del self._generating[p.task_id]
            self._spans.answered(span, result)
            self._observe(event.model, result, asyncio.get_running_loop().time() - t0)
            return result

    def _gpu_slot(
        self, p: Prepared, binding: ModelBinding, deadline: int | None
    ) -> contextlib.AbstractAsyncContextManager[None]:
        if self._gpu is None:
            return contextlib.nullcontext()
        _, partition = p.entry.stream.rsplit(":", 1)
        return self._gpu.hold(
            binding,
            partition=partition,
            holder_id=f"{self._consumer}:{p.task_id}",
            deadline_s=None if deadline is None else max(0.0, (deadline - now_ms()) / 1000),
        )

    def _observe(self, model: str, gen: Generation, elapsed_s: float) -> None:
        if self._metrics is None:
            return
        m = self._metrics.model(model)
        if gen.usage.input_tokens is not None:
            m.tokens_in.inc(gen.usage.input_tokens)
        if gen.usage.output_tokens is not None:
            m.tokens_out.inc(gen.usage.output_tokens)
        if elapsed_s > 0 and gen.usage.output_tokens:
            m.tokens_per_s.observe(gen.usage.output_tokens / elapsed_s)


def _not_found(registry: ModelRegistry, name: str) -> Exception:
    try:
        registry.resolve(name)
    except ModelNotFoundError as exc:
        return exc
    return ModelNotFoundError(f"model: {name!r} was not registered when the task was read")


def _spent(request: GenerationRequest, parts: list[str]) -> Usage | None:
    """What a generation cut short used: the provider's count, or at least its deltas."""
    return request.spent.usage(at_least_output=len(parts))


def _sink(parts: list[str], tokens: TokenWriter | None) -> DeltaSink:
    if tokens is None:
        return parts.append

    def on_delta(text: str) -> None:
        parts.append(text)
        tokens.add(text)

    return on_delta
