"""The provider error tree: one class per wire error code, and HTTP status translation.

Every adapter translates its SDK's errors once, at its boundary, into one of these (``raise ...
from exc``). ``retryable`` says whether another attempt may help; the policy layer is the one
place that acts on it (SDK retries are off everywhere). ``retry_after`` is the backend's own
hint in seconds (``Retry-After`` / ``retry-after-ms``), when it gave one.

None of these derive from :class:`TimeoutError`: a provider's own timeout is a retryable
``timeout`` failure, distinct from the task's deadline running out around the call.

Every message is sanitised as the error is made (``providers/sanitize.py``): it is stored in
the result, the dead letter and the status record, and logged, so it never carries header
values, key-shaped tokens, the secrets and request text the raiser names in ``redaction``,
or more than 500 characters.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import ClassVar

from sop_llm.providers.sanitize import NO_REDACTION, Redaction, sanitize
from sop_llm.schemas.errors import ErrorCode, SopError

# cap on a server's Retry-After hint: a bogus "retry in a year" must not park a task forever
MAX_RETRY_AFTER_S = 3600.0


class ProviderError(SopError):
    """A backend failed.

    ``retryable`` tells the policy layer whether another attempt may help (defaults to the
    class's answer); ``retry_after`` is the backend's own hint in seconds; ``status`` the HTTP
    status when there was one; ``raw_text`` the model output that failed validation (the
    tokens the failed work used are in the request's ``spent``). The message is sanitised; a
    raiser whose message quotes the backend passes the request's ``redaction`` (its API key,
    its texts) so that none of it survives.
    """

    code: ErrorCode = ErrorCode.INTERNAL
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        status: int | None = None,
        raw_text: str | None = None,
        redaction: Redaction = NO_REDACTION,
    ) -> None:
        super().__init__(sanitize(message, redaction), code=code)
        self.retryable = self.default_retryable if retryable is None else retryable
        self.retry_after = retry_after
        self.status = status
        self.raw_text = raw_text


class RateLimitedError(ProviderError):
    code = ErrorCode.RATE_LIMITED
    default_retryable = True


class OverloadedError(ProviderError):
    code = ErrorCode.OVERLOADED
    default_retryable = True


class ProviderTimeoutError(ProviderError):
    """The backend did not answer within the spec's ``timeout_s`` (not the task deadline)."""

    code = ErrorCode.TIMEOUT
    default_retryable = True


class AuthError(ProviderError):
    code = ErrorCode.AUTH


class BadRequestError(ProviderError):
    code = ErrorCode.BAD_REQUEST


class ContextLengthError(ProviderError):
    code = ErrorCode.CONTEXT_LENGTH


class ContentFilterError(ProviderError):
    code = ErrorCode.CONTENT_FILTER


class SchemaInvalidError(ProviderError):
    """The output did not validate against the task's JSON Schema, even after one repair."""

    code = ErrorCode.SCHEMA_INVALID


class ModelUnavailableError(ProviderError):
    """The backend does not know the model id the spec names."""

    code = ErrorCode.MODEL_NOT_FOUND


class InternalProviderError(ProviderError):
    """The backend broke (5xx, a malformed reply, a dropped connection). Retryable by
    default; an error in our own adapter is raised with ``retryable=False``."""

    code = ErrorCode.INTERNAL
    default_retryable = True


class IncompleteStreamError(InternalProviderError):
    """A stream ended cleanly (``[DONE]``, or the end of the body) before the backend said
    why it stopped, so the text may be cut short. Retryable like any backend fault, never
    taken as a finished answer. llama-cpp-python's server does this to a stream when another
    request waits: declare its concurrency as 1 (docs/servers.md)."""


_CONTEXT_HINTS = (
    "context length",
    "context_length",
    "context window",
    "maximum context",
    "too many tokens",
    "prompt is too long",
)


def parse_retry_after(
    headers: Mapping[str, str] | None, *, now: float | None = None
) -> float | None:
    """Seconds to wait from ``retry-after-ms``, ``Retry-After`` (seconds or an HTTP date), or
    ``None`` when absent or unparsable. Capped at :data:`MAX_RETRY_AFTER_S`."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    value: float | None = None
    ms = lower.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
        except ValueError:
            value = None
    raw = lower.get("retry-after")
    if value is None and raw is not None:
        try:
            value = float(raw)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                return None
            value = when.timestamp() - (time.time() if now is None else now)
    if value is None or value != value:  # NaN
        return None
    return min(max(0.0, value), MAX_RETRY_AFTER_S)


def error_for_status(
    status: int,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    error_type: str | None = None,
    redaction: Redaction = NO_REDACTION,
) -> ProviderError:
    """Translate an HTTP error status (and the body's error type/message) into our tree; the
    message is sanitised with ``redaction``."""
    retry_after = parse_retry_after(headers)
    text = f"HTTP {status}: {message}"
    lowered = f"{error_type or ''} {message}".lower()
    cls: type[ProviderError]
    if status == 429:
        cls = RateLimitedError
    elif status in (503, 529) or "overloaded" in (error_type or ""):
        cls = OverloadedError
    elif status in (408, 504):
        cls = ProviderTimeoutError
    elif status in (401, 403):
        cls = AuthError
    elif status == 404:
        cls = ModelUnavailableError
    elif status == 413 or any(hint in lowered for hint in _CONTEXT_HINTS):
        cls = ContextLengthError
    elif "content_filter" in lowered or "content filter" in lowered:
        cls = ContentFilterError
    elif 400 <= status < 500:
        cls = BadRequestError
    else:
        cls = InternalProviderError
    return cls(text, retry_after=retry_after, status=status, redaction=redaction)
