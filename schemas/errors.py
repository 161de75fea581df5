"""Error codes carried by failed results, and the root of sop-llm's exception tree."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Why a task ended ``failed`` (or was refused at intake).

    The codes are part of the wire format: producers in any language branch on them.
    """

    # input problems: the task can never succeed as written
    INVALID_EVENT = "invalid_event"
    MODEL_NOT_FOUND = "model_not_found"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    DUPLICATE_TASK_ID = "duplicate_task_id"
    BACKLOG_FULL = "backlog_full"
    # execution problems
    MAX_ATTEMPTS = "max_attempts"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    AUTH = "auth"
    BAD_REQUEST = "bad_request"
    CONTEXT_LENGTH = "context_length"
    CONTENT_FILTER = "content_filter"
    SCHEMA_INVALID = "schema_invalid"
    INSUFFICIENT_VRAM = "insufficient_vram"
    INTERNAL = "internal"


class SopError(Exception):
    """Root of every exception sop-llm raises on purpose. ``code`` is the wire error code."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class InvalidTaskError(SopError, ValueError):
    """The task event is malformed: bad JSON, a schema violation, an unknown partition..."""

    code = ErrorCode.INVALID_EVENT


class ModelNotFoundError(SopError, LookupError):
    code = ErrorCode.MODEL_NOT_FOUND


class IdempotencyConflictError(SopError):
    """The idempotency key is already bound to a task with a different payload. It does not say
    which task: a key may be shared by producers that must not learn each other's tasks."""

    code = ErrorCode.IDEMPOTENCY_CONFLICT


class DuplicateTaskIdError(SopError):
    code = ErrorCode.DUPLICATE_TASK_ID


class BacklogFullError(SopError):
    """The partition's backlog is over ``SOP_MAX_BACKLOG``: try again later."""

    code = ErrorCode.BACKLOG_FULL


class WaitTimeoutError(SopError, TimeoutError):
    """A task did not reach a terminal state within the time asked for."""

    code = ErrorCode.TIMEOUT


class BrokerError(SopError):
    """Redis refused a command of the SDK (``NOPERM``, a key of the wrong type, a script
    error): retrying the same call will not help. The redis-py error is kept as ``__cause__``."""


class BrokerUnavailableError(BrokerError):
    """Redis could not be reached in time (refused or reset connections, a timeout, a failover
    under way): passing trouble, worth trying again after a pause. The redis-py error is kept
    as ``__cause__``."""


class NotReplicatedError(BrokerUnavailableError):
    """A submission reached the master but fewer replicas than asked for
    (``SOP_DURABILITY_REPLICAS``) acknowledged it in time: a failover now could lose it. Submit
    it again with the same ``idempotency_key`` to be sure it exists once."""

    def __init__(self, message: str, *, task_id: str) -> None:
        super().__init__(message)
        self.task_id = task_id
