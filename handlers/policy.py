"""What happens after a failed attempt, decided in one place by error class.

* Input that can never succeed (``invalid_event``, ``model_not_found``,
  ``idempotency_conflict``) and credentials the operator must fix (``auth``): the task ends
  ``failed`` and its entry is dead-lettered, so it can be requeued once fixed.
* Retryable provider errors (rate limits, overload, timeouts, 5xx; ``ProviderError.retryable``)
  and unexpected exceptions: another attempt after ``Retry-After`` when the provider gave one,
  else after an exponential backoff with jitter; past the attempt limit the task ends ``failed``
  with ``max_attempts`` and is dead-lettered with every attempt's error.
* Everything else (``bad_request``, ``context_length``, ``content_filter``, ``schema_invalid``):
  the task ends ``failed``; it is an answer, not an incident.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from sop_llm.providers.errors import ProviderError
from sop_llm.schemas.errors import ErrorCode, SopError

DEAD_LETTER_CODES = frozenset(
    {ErrorCode.INVALID_EVENT, ErrorCode.MODEL_NOT_FOUND, ErrorCode.IDEMPOTENCY_CONFLICT,
     ErrorCode.AUTH, ErrorCode.MAX_ATTEMPTS}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Retry:
    delay_s: float


@dataclass(frozen=True, slots=True)
class Fail:
    code: ErrorCode
    message: str
    dead_letter: bool


Decision = Retry | Fail


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_s: float = 1.0
    max_s: float = 300.0
    retry_after_max_s: float = 3600.0

    def backoff(self, attempts: int) -> float:
        """Delay before attempt ``attempts + 1``: doubling from ``base_s``, capped, half of it
        random ("equal jitter"), so retries of many tasks spread out."""
        ceiling = min(self.max_s, self.base_s * 2.0 ** max(0, attempts - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def decide(self, exc: BaseException, *, attempts: int, max_attempts: int) -> Decision:
        """The fate of a task whose attempt number ``attempts`` raised ``exc``."""
        if isinstance(exc, SopError):
            code, message = exc.code, exc.message
            retryable = isinstance(exc, ProviderError) and exc.retryable
        else:
            code, message, retryable = ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", True
        if not retryable:
            return Fail(code, message, dead_letter=code in DEAD_LETTER_CODES)
        if attempts >= max_attempts:
            return Fail(
                ErrorCode.MAX_ATTEMPTS,
                f"gave up after {attempts} attempts; last error {code.value}: {message}",
                dead_letter=True,
            )
        hint = exc.retry_after if isinstance(exc, ProviderError) else None
        if hint is not None and hint >= 0:
            return Retry(min(hint, self.retry_after_max_s))
        return Retry(self.backoff(attempts))
