"""W3C trace context carried in the `traceparent` / `tracestate` fields of stream entries."""

from __future__ import annotations

from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def current_traceparent(ctx: Context | None = None) -> tuple[str, str]:
    """``(traceparent, tracestate)`` of the current (or given) span; empty strings when none."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")


def context_from(traceparent: str, tracestate: str = "") -> Context:
    """A context continuing the trace of an entry (a fresh one when the field is absent or bad)."""
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return _PROPAGATOR.extract(carrier)
