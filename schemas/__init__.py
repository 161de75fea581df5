"""Wire models of sop-llm: task events, results, status records, webhook jobs, dead letters."""

from sop_llm.schemas.errors import (
    BacklogFullError,
    DuplicateTaskIdError,
    ErrorCode,
    IdempotencyConflictError,
    InvalidTaskError,
    ModelNotFoundError,
    SopError,
    WaitTimeoutError,
)
from sop_llm.schemas.result import (
    TERMINAL_STATES,
    DeadLetter,
    ErrorInfo,
    FinishReason,
    StatusRecord,
    TaskResult,
    TaskState,
    Usage,
    WebhookJob,
    WebhookStatus,
)
from sop_llm.schemas.task import (
    ChatMessage,
    JsonSchemaSpec,
    ResponseFormat,
    TaskEvent,
    TaskId,
    describe_validation_error,
    parse_task_event,
)
from sop_llm.schemas.wire import WIRE_VERSION, EventType

__all__ = [
    "TERMINAL_STATES",
    "WIRE_VERSION",
    "BacklogFullError",
    "ChatMessage",
    "DeadLetter",
    "DuplicateTaskIdError",
    "ErrorCode",
    "ErrorInfo",
    "EventType",
    "FinishReason",
    "IdempotencyConflictError",
    "InvalidTaskError",
    "JsonSchemaSpec",
    "ModelNotFoundError",
    "ResponseFormat",
    "SopError",
    "StatusRecord",
    "TaskEvent",
    "TaskId",
    "TaskResult",
    "TaskState",
    "Usage",
    "WaitTimeoutError",
    "WebhookJob",
    "WebhookStatus",
    "describe_validation_error",
    "parse_task_event",
]
