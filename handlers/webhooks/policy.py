"""What an attempt's result means: the error class, and whether (and when) to try again.

The one place that decides. Success is 2xx only. ``410 Gone`` and a refused (unsafe) or
malformed URL are final. Everything else is retried on the schedule, the delay before attempt
``n + 1`` being ``schedule[n]`` stretched by up to ``jitter`` (never shortened), and never
sooner than the receiver's ``Retry-After``; past the last entry the delivery is dead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

import aiohttp

from sop_llm.streams.urlguard import WebhookURLRefusedError
from sop_llm.streams.webhook_store import DeadReason, Outcome

# error classes (the only thing kept of a failed attempt, with its status code)
E_REFUSED: Final = "refused"  # the SSRF guard refused the address
E_INVALID_URL: Final = "invalid_url"
E_INVALID_JOB: Final = "invalid_job"
E_PAYLOAD_TOO_LARGE: Final = "payload_too_large"
E_TIMEOUT: Final = "timeout"
E_DNS: Final = "dns"
E_TLS: Final = "tls"
E_CONNECT: Final = "connect"
E_CONNECTION: Final = "connection"  # reset, closed mid-response
E_PROTOCOL: Final = "protocol"  # a malformed HTTP response
E_REDIRECT: Final = "redirect"  # 3xx: a failure, never followed
E_GONE: Final = "gone"  # 410
E_HTTP: Final = "http_status"  # any other non-2xx
E_INTERNAL: Final = "internal"


_FINAL_REASONS: Final[dict[str, DeadReason]] = {E_GONE: "gone", E_INVALID_JOB: "invalid_job"}


@dataclass(frozen=True, slots=True)
class AttemptResult:
    status: int | None
    error: str | None
    retry_after_s: float | None = None
    final: bool = False

    @property
    def delivered(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    delay_s: float = 0.0
    reason: DeadReason | None = None


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def from_response(status: int, retry_after: str | None) -> AttemptResult:
    if 200 <= status < 300:
        return AttemptResult(status, None)
    wait = parse_retry_after(retry_after)
    if status == 410:
        return AttemptResult(status, E_GONE, final=True)
    if 300 <= status < 400:
        return AttemptResult(status, E_REDIRECT, wait)
    return AttemptResult(status, E_HTTP, wait)


def from_exception(exc: BaseException) -> AttemptResult:
    """The error class of an attempt that got no response. Order matters: subclasses first."""
    if isinstance(exc, WebhookURLRefusedError):
        return AttemptResult(None, E_REFUSED, final=True)
    if isinstance(exc, TimeoutError):  # includes aiohttp's ServerTimeoutError
        return AttemptResult(None, E_TIMEOUT)
    if isinstance(exc, aiohttp.InvalidURL):
        return AttemptResult(None, E_INVALID_URL, final=True)
    classes: tuple[tuple[type[BaseException], str], ...] = (
        (aiohttp.ClientConnectorDNSError, E_DNS),
        (aiohttp.ClientSSLError, E_TLS),
        (aiohttp.ClientConnectorError, E_CONNECT),
        (aiohttp.ClientResponseError, E_PROTOCOL),
        (aiohttp.ClientError, E_CONNECTION),
        (OSError, E_CONNECTION),
    )
    for cls, name in classes:
        if isinstance(exc, cls):
            return AttemptResult(None, name)
    if isinstance(exc, ValueError):
        # a job we cannot sign or send as written: retrying changes nothing
        return AttemptResult(None, E_INVALID_JOB, final=True)
    return AttemptResult(None, E_INTERNAL)


def decide(
    result: AttemptResult,
    attempts: int,
    schedule: tuple[float, ...],
    *,
    jitter: float = 0.1,
    retry_after_cap_s: float = 86_400.0,
    rng: random.Random | None = None,
) -> Decision:
    """After ``attempts`` attempts (the last one ``result``): deliver, retry when, or give up."""
    if result.delivered:
        return Decision("delivered")
    if result.final:
        return Decision("dead", reason=_FINAL_REASONS.get(result.error or "", "refused"))
    if attempts >= len(schedule):
        return Decision("dead", reason="exhausted")
    delay = schedule[attempts] * (rng or random).uniform(1.0, 1.0 + jitter)
    if result.retry_after_s is not None:
        delay = max(delay, min(result.retry_after_s, retry_after_cap_s))
    return Decision("retry", delay_s=delay)
