"""Tasks of instant models, run inside their read batch.

A model whose provider is :class:`~providers.base.Instant` (it answers at once, in-process,
with no I/O) does not need an asyncio task, a model permit or a cancellation point per task:
the worker computes the outcome while it prepares the batch and hands it to ``begin``, whose
script writes it in the same step when the attempt is the task's first. Everything else about
the task is as on the normal path: the status record (attempts, worker, created/started/finished
times), idempotency, the ``results`` entry, the ``reply_to`` copy, the webhook job, the XACK.

An entry falls back to the normal path (a task of its own, the runner, the retry policy) when
anything is unusual: tracing is on (each task gets its spans), the task streams tokens, asks for
structured output, is past its deadline, or the provider raised; and when ``begin`` finds it is
not a first attempt (a retry, a redelivery) or must not run (cancelled, conflict, exhausted).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from handlers.metrics import Metrics
from handlers.outcome_writer import OutcomeWriter
from handlers.prepare import Prepared, generation_request
from providers.base import Generation, GenerationRequest
from providers.registry import ModelRegistry
from schemas.result import TaskState
from streams.outcome import Finish, webhook_job

log = logging.getLogger(__name__)


class InstantTasks:
    def __init__(
        self,
        *,
        registry: ModelRegistry,
        writer: OutcomeWriter,
        metrics: Metrics | None = None,
        enabled: bool = True,
    ) -> None:
        self._registry = registry
        self._writer = writer
        self._metrics = metrics
        self.enabled = enabled

    def outcome(self, p: Prepared, now: int) -> Finish | None:
        """The task's outcome, computed now as a first attempt; ``None``: the normal path."""
        event = p.event
        if not self.enabled or event is None or event.stream or event.response_format is not None:
            return None
        binding = self._registry.get(event.model)
        if binding is None or binding.needs_gpu_slot:
            return None
        provider = binding.provider
        # the flag, then the method (a runtime Protocol check costs microseconds per task)
        answer: Callable[[GenerationRequest], Generation] | None = (
            getattr(provider, "answer", None) if provider.capabilities.instant else None
        )
        if answer is None:
            return None
        deadline = p.deadline_ms()
        if deadline is not None and now >= deadline:
            return None  # the runner expires it
        try:
            gen = answer(generation_request(event))
        except Exception:  # noqa: BLE001 - the normal path asks again, and its policy decides
            return None
        result = self._writer.result(
            p, 1, now, TaskState.COMPLETED,
            text=gen.text, finish_reason=gen.finish_reason, usage=gen.usage,
        )  # fmt: skip
        url = event.webhook_url
        return Finish(
            entry=p.entry, result=result, reply_to=event.reply_to,
            idempotency_key=event.idempotency_key,
            webhook=webhook_job(result, url) if url else None,
        )  # fmt: skip

    def finished(self, done: list[tuple[Prepared, Finish]]) -> None:
        """Metrics and logs of outcomes that ``begin`` wrote (one call per batch)."""
        if not done:
            return
        if log.isEnabledFor(logging.INFO):
            for p, fin in done:
                log.info(
                    "task finished",
                    extra={
                        "task_id": p.task_id, "stream": p.entry.stream,
                        "entry_id": p.entry.entry_id, "model": p.model,
                        "state": fin.result.state.value, "attempts": fin.result.attempts,
                    },
                )  # fmt: skip
        m = self._metrics
        if m is None:
            return
        m.outcome(TaskState.COMPLETED.value).inc(len(done))
        tokens_in: collections.Counter[str] = collections.Counter()
        tokens_out: collections.Counter[str] = collections.Counter()
        for p, fin in done:
            result = fin.result
            m.queue_wait.observe(result.queued_ms / 1000)
            m.model(p.model).run_time.observe(result.run_ms / 1000)
            if result.usage is not None:
                tokens_in[p.model] += result.usage.input_tokens
                tokens_out[p.model] += result.usage.output_tokens
        for model, n in tokens_in.items():
            m.model(model).tokens_in.inc(n)
        for model, n in tokens_out.items():
            m.model(model).tokens_out.inc(n)
