"""OpenTelemetry set-up: the only place that sets global telemetry state."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from sop_llm.ops.settings import Settings

log = logging.getLogger(__name__)


def _exporter(kind: str) -> SpanExporter | None:
    if kind == "console":
        return ConsoleSpanExporter()
    if kind == "otlp":
        # endpoint, headers and timeouts come from the standard OTEL_EXPORTER_OTLP_* variables
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    return None


@contextlib.contextmanager
def tracing(settings: Settings, *, service: str = "sop-llm") -> Iterator[TracerProvider | None]:
    """Install a tracer provider for the process (``SOP_OTEL_EXPORTER``: otlp, console, none);
    flush and shut it down on exit."""
    exporter = _exporter(settings.otel_exporter)
    if exporter is None:
        yield None
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing on", extra={"exporter": settings.otel_exporter})
    try:
        yield provider
    finally:
        provider.shutdown()
