"""Terminal outcomes, status records, webhook jobs and dead letters."""

from __future__ import annotations

import inspect
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    Field,
    GetJsonSchemaHandler,
    JsonValue,
    SerializerFunctionWrapHandler,
    model_serializer,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.wire import StrictModel


class TaskState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED, TaskState.EXPIRED}
)

FinishReason = Literal["stop", "length", "cancelled", "deadline", "error"]


class Usage(StrictModel):
    """Tokens a task used. ``null``: unknown, the backend reported no count and none could be
    made (an OpenAI-compatible server that sends no usage: see docs/providers.md); never a
    made-up 0. Both keys are always written, ``null`` included."""

    input_tokens: Annotated[int, Field(ge=0)] | None = 0
    output_tokens: Annotated[int, Field(ge=0)] | None = 0

    @model_serializer(mode="wrap")
    def _both_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, int | None]:
        # kept through exclude_none, with which results are written: unknown reads null
        del handler  # both fields are written as they are
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        # as written (the serializer alone would say "any object")
        count = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}]}
        return {
            "type": "object", "title": "Usage", "description": inspect.cleandoc(cls.__doc__ or ""),
            "properties": {"input_tokens": count, "output_tokens": count},
            "required": ["input_tokens", "output_tokens"], "additionalProperties": False,
        }  # fmt: skip

    @property
    def total_tokens(self) -> int | None:
        if self.input_tokens is None or self.output_tokens is None:
            return None
        return self.input_tokens + self.output_tokens


class ErrorInfo(StrictModel):
    code: ErrorCode
    message: str


class TaskResult(StrictModel):
    """The one terminal entry a task gets on ``{ns}:results``."""

    v: Literal[1] = 1
    task_id: str
    state: TaskState
    model: str | None = None
    text: str | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    queued_ms: Annotated[int, Field(ge=0)] = 0
    run_ms: Annotated[int, Field(ge=0)] = 0
    worker: str | None = None
    attempts: Annotated[int, Field(ge=0)] = 0
    error: ErrorInfo | None = None
    metadata: dict[str, JsonValue] | None = None
    finished_at: int = Field(description="milliseconds since the epoch")


class WebhookStatus(StrictModel):
    """The delivery log of a task's webhook, as far as the status record keeps it."""

    state: Literal["pending", "delivered", "failed"]
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = None


class StatusRecord(StrictModel):
    """The status hash ``{ns}:task:<id>``, decoded."""

    task_id: str
    state: TaskState
    model: str | None = None
    stream: str | None = None
    entry_id: str | None = None
    created_at: int | None = None
    started_at: int | None = None
    finished_at: int | None = None
    attempts: int = 0
    worker: str | None = None
    duplicate_of: str | None = None
    result: TaskResult | None = None
    webhook: WebhookStatus | None = None


class WebhookJob(StrictModel):
    """An entry on ``{ns}:webhooks``: one delivery of one outcome to one URL."""

    v: Literal[1] = 1
    delivery_id: str
    task_id: str
    url: str
    event: str
    payload: TaskResult
    created_at: int


class DeadLetter(StrictModel):
    """An entry on ``{ns}:dead``: a task event that could not be run, with its provenance."""

    v: Literal[1] = 1
    source_stream: str
    entry_id: str
    task_id: str | None = None
    reason: ErrorCode
    message: str
    attempts: int = 0
    fields: dict[str, str] = Field(
        description="the raw entry; values that are not UTF-8 are given as 'base64:' + data"
    )
    errors: list[ErrorInfo] = Field(
        default_factory=list, description="each attempt's error, oldest first"
    )
    dead_at: int
