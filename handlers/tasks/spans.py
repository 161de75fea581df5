"""A task's spans: the consumer span of its processing and the client span of its provider call
(OpenTelemetry messaging and GenAI semantic conventions).

With tracing off (no tracer) both are one shared no-op context: OpenTelemetry's own no-op spans
cost about a quarter of a worker's throughput on a fast model (context attach and detach, the
trace context parsed from each entry), and nothing would read them."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from sop_llm.providers.base import Generation, GenerationRequest
from sop_llm.schemas.errors import SopError
from sop_llm.streams.entries import Entry
from sop_llm.streams.tracecontext import context_from

_OFF = contextlib.nullcontext(INVALID_SPAN)


class Spans:
    def __init__(self, tracer: Tracer | None, *, content: bool = False) -> None:
        """``content``: put prompts and completions on the spans (they may hold personal data)."""
        self._tracer = tracer
        self._content = content

    def process(self, entry: Entry, task_id: str) -> contextlib.AbstractContextManager[Span]:
        """The span of a task's processing, under the producer's trace context."""
        if self._tracer is None:
            return _OFF
        attributes: dict[str, AttributeValue] = {
            "messaging.system": "redis", "messaging.operation.type": "process",
            "messaging.destination.name": entry.stream, "messaging.message.id": entry.entry_id,
            "sop.task_id": task_id,
        }  # fmt: skip
        return self._tracer.start_as_current_span(
            f"process {entry.stream}",
            context=context_from(entry.traceparent, entry.tracestate),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )

    def call(
        self, operation: str, provider: str, request: GenerationRequest
    ) -> contextlib.AbstractContextManager[Span]:
        """The span of a provider call; an error is recorded on it."""
        if self._tracer is None:
            return _OFF
        return self._call(self._tracer, operation, provider, request)

    @contextlib.contextmanager
    def _call(
        self, tracer: Tracer, operation: str, provider: str, request: GenerationRequest
    ) -> Iterator[Span]:
        attributes = genai_request_attributes(operation, provider, request, self._content)
        # no recorded exception: its chain reaches the SDK's own error, whose raw body may echo
        # the key or the prompt; the span gets the sanitised message only
        with tracer.start_as_current_span(
            f"{operation} {request.model}",
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                span.set_attribute("error.type", error_type(exc))
                span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
                raise

    def answered(self, span: Span, gen: Generation) -> None:
        if span.is_recording():
            span.set_attributes(genai_response_attributes(gen, self._content))


def error_type(exc: BaseException) -> str:
    """``error.type`` of a span: the error code, ``timeout``, ``cancelled`` or the class."""
    if isinstance(exc, SopError):
        return exc.code.value
    named = getattr(exc, "error_type", None)
    if isinstance(named, str):
        return named
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__qualname__


def genai_request_attributes(
    operation: str, provider: str, request: GenerationRequest, content: bool
) -> dict[str, AttributeValue]:
    attrs: dict[str, AttributeValue] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": request.model,
    }
    optional: dict[str, float | int | None] = {
        "gen_ai.request.temperature": request.temperature,
        "gen_ai.request.top_p": request.top_p,
        "gen_ai.request.max_tokens": request.max_tokens,
        "gen_ai.request.seed": request.seed,
    }
    attrs.update({k: v for k, v in optional.items() if v is not None})
    if request.stop:
        attrs["gen_ai.request.stop_sequences"] = list(request.stop)
    if request.response_format is not None:
        attrs["gen_ai.output.type"] = "json" if request.response_format.type != "text" else "text"
    if content:
        # opt-in only (SOP_TRACE_CONTENT): prompts may hold personal data
        if request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            messages = [{"role": "user", "content": request.prompt or ""}]
        attrs["gen_ai.input.messages"] = json.dumps(messages)
    return attrs


def genai_response_attributes(gen: Generation, content: bool) -> dict[str, AttributeValue]:
    attrs: dict[str, AttributeValue] = {"gen_ai.response.finish_reasons": [gen.finish_reason]}
    # a count the backend did not report is left out, not recorded as 0
    if gen.usage.input_tokens is not None:
        attrs["gen_ai.usage.input_tokens"] = gen.usage.input_tokens
    if gen.usage.output_tokens is not None:
        attrs["gen_ai.usage.output_tokens"] = gen.usage.output_tokens
    if content:
        attrs["gen_ai.output.messages"] = json.dumps([{"role": "assistant", "content": gen.text}])
    return attrs
