"""Prometheus metrics of a worker process (served by the sidecar at /metrics)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
_TOKENS_PER_S = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 20000)


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    """One model's children of the labelled metrics (``labels()`` is not free on a hot path)."""

    tokens_in: Counter
    tokens_out: Counter
    tokens_per_s: Histogram
    run_time: Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.inflight = Gauge("sop_tasks_inflight", "Tasks running in this process", registry=r)
        self.queue_wait = Histogram(
            "sop_task_queue_wait_seconds", "From publish to start", buckets=_SECONDS, registry=r
        )
        self.run_time = Histogram(
            "sop_task_run_seconds", "From start to outcome", ["model"], buckets=_SECONDS, registry=r
        )
        self.tokens = Counter("sop_tokens", "Tokens in and out", ["direction", "model"], registry=r)
        self.tokens_per_s = Histogram(
            "sop_tokens_per_second", "Output tokens per second of a generation", ["model"],
            buckets=_TOKENS_PER_S, registry=r,
        )  # fmt: skip
        self.outcomes = Counter(
            "sop_task_outcomes", "Terminal outcomes written", ["state"], registry=r
        )
        self.retries = Counter("sop_retries", "Retries scheduled", ["code"], registry=r)
        self.dead_letters = Counter(
            "sop_dead_letters", "Entries dead-lettered", ["reason"], registry=r
        )
        self.webhooks = Counter(
            "sop_webhook_deliveries", "Webhook delivery attempts", ["outcome"], registry=r
        )
        self.gpu_memory = Gauge(
            "sop_gpu_memory_bytes", "GPU memory", ["device", "kind"], registry=r
        )
        labels = ["pool", "partition"]
        self.queue_depth = Gauge(
            "sop_queue_depth", "Entries in the partition stream", labels, registry=r
        )
        self.queue_lag = Gauge("sop_queue_lag", "Entries not yet delivered", labels, registry=r)
        self.queue_pending = Gauge(
            "sop_queue_pending", "Entries delivered, not finished", labels, registry=r
        )
        self._models: dict[str, ModelMetrics] = {}
        self._outcomes: dict[str, Counter] = {}
        self.queue_oldest = Gauge(
            "sop_queue_oldest_pending_age_seconds",
            "Age of the oldest pending entry",
            labels,
            registry=r,
        )

    def model(self, name: str) -> ModelMetrics:
        found = self._models.get(name)
        if found is None:
            found = ModelMetrics(
                tokens_in=self.tokens.labels("input", name),
                tokens_out=self.tokens.labels("output", name),
                tokens_per_s=self.tokens_per_s.labels(name),
                run_time=self.run_time.labels(name),
            )
            self._models[name] = found
        return found

    def outcome(self, state: str) -> Counter:
        found = self._outcomes.get(state)
        if found is None:
            found = self._outcomes[state] = self.outcomes.labels(state)
        return found
