"""Configuration of the webhook sender (built from Settings in ``ops``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

CONSUMER_PREFIX: Final = "webhook-"
# Standard Webhooks' example schedule: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h
DEFAULT_SCHEDULE_S: Final = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0)


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    consumer: str
    """Consumer and lease name; must start with ``webhook-`` (leases share ``{ns}:worker:``)."""
    secrets: tuple[str, ...] = ()
    """``whsec_`` signing secrets, newest first; none: deliveries go out unsigned."""
    allow: tuple[str, ...] = ()
    timeout_s: float = 15.0
    schedule_s: tuple[float, ...] = DEFAULT_SCHEDULE_S
    jitter: float = 0.1
    retry_after_cap_s: float = 86_400.0
    concurrency: int = 32
    max_body_bytes: int = 256 << 10
    thin: bool = False
    block_ms: int = 1000
    lease_ttl_ms: int = 10_000
    reclaim_interval_ms: int = 2_000
    promote_interval_ms: int = 1_000
    """Longest wait between looks at the delayed set (a sender wakes sooner for its own)."""
    shutdown_grace_s: float = 15.0
    user_agent: str = "sop-llm-webhooks/1"

    def __post_init__(self) -> None:
        if not self.consumer.startswith(CONSUMER_PREFIX):
            raise ValueError(f"a webhook sender's consumer must start with {CONSUMER_PREFIX!r}")
        if not self.schedule_s or any(d < 0 for d in self.schedule_s):
            raise ValueError("the webhook schedule needs at least one delay, none negative")
        if self.concurrency < 1 or self.timeout_s <= 0 or self.jitter < 0:
            raise ValueError("webhook concurrency must be >= 1, timeout > 0, jitter >= 0")
