"""The webhook sender as a worker runs it, built from Settings."""

from __future__ import annotations

from opentelemetry import trace
from redis.asyncio import Redis

from sop_llm.handlers.metrics import Metrics
from sop_llm.handlers.webhooks import CONSUMER_PREFIX, WebhookConfig, WebhookSender
from sop_llm.ops.settings import Settings
from sop_llm.streams.keys import Keys


def build_sender(
    settings: Settings, client: Redis, metrics: Metrics | None = None
) -> WebhookSender:
    """A webhook sender configured from ``settings``; run it with ``.run(stop)`` beside the
    worker. Raises ``ValueError`` for a malformed secret or allow-list entry, so a bad
    configuration fails at start."""
    secrets = settings.webhook_secrets.get_secret_value() if settings.webhook_secrets else ""
    config = WebhookConfig(
        consumer=CONSUMER_PREFIX + settings.consumer_name(),
        secrets=tuple(s.strip() for s in secrets.split(",") if s.strip()),
        allow=settings.webhook_allow, timeout_s=settings.webhook_timeout_s,
        schedule_s=settings.webhook_schedule_s, concurrency=settings.webhook_concurrency,
        max_body_bytes=settings.webhook_max_body_bytes, thin=settings.webhook_thin,
        block_ms=settings.block_ms, lease_ttl_ms=settings.lease_ttl_ms,
        reclaim_interval_ms=settings.reclaim_interval_ms,
        shutdown_grace_s=settings.shutdown_grace_s,
    )  # fmt: skip
    return WebhookSender(
        client=client, keys=Keys(settings.namespace), config=config,
        tracer=trace.get_tracer("sop_llm.webhooks"), metrics=metrics,
    )  # fmt: skip
