"""sop-llm: an LLM inference executor over Redis Streams.

What a service that submits tasks may rely on; everything else is internal::

    from sop_llm import Producer, TaskState

    async with Producer.from_url("redis://127.0.0.1:6379/0", namespace="sop") as producer:
        task_id = await producer.submit("echo", "hello", max_tokens=8)
        result = await producer.wait(task_id, timeout=30)
        assert result.state == TaskState.COMPLETED

Every error the SDK raises is a :class:`SopError` (Redis trouble included, as
:class:`BrokerError`). ``sop_llm.testing`` holds a test double for the services' own tests.
"""

from __future__ import annotations

from sop_llm.ops.settings import Settings
from sop_llm.schemas.errors import (
    BacklogFullError,
    BrokerError,
    BrokerUnavailableError,
    DuplicateTaskIdError,
    ErrorCode,
    IdempotencyConflictError,
    InvalidTaskError,
    ModelNotFoundError,
    NotReplicatedError,
    SopError,
    WaitTimeoutError,
)
from sop_llm.schemas.result import ErrorInfo, StatusRecord, TaskResult, TaskState, Usage
from sop_llm.schemas.task import ChatMessage, JsonSchemaSpec, ResponseFormat, TaskEvent
from sop_llm.streams.control import CancelOutcome
from sop_llm.streams.durability import Durability
from sop_llm.streams.producer import Producer, ProducerConfig

__all__ = [
    "BacklogFullError",
    "BrokerError",
    "BrokerUnavailableError",
    "CancelOutcome",
    "ChatMessage",
    "DuplicateTaskIdError",
    "Durability",
    "ErrorCode",
    "ErrorInfo",
    "IdempotencyConflictError",
    "InvalidTaskError",
    "JsonSchemaSpec",
    "ModelNotFoundError",
    "NotReplicatedError",
    "Producer",
    "ProducerConfig",
    "ResponseFormat",
    "Settings",
    "SopError",
    "StatusRecord",
    "TaskEvent",
    "TaskResult",
    "TaskState",
    "Usage",
    "WaitTimeoutError",
]
