"""The task event: what a producer publishes to a task partition."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Annotated, Any, Final, Literal, NewType
from urllib.parse import urlsplit

from pydantic import (
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from schemas.wire import StrictModel

TaskId = NewType("TaskId", str)

TASK_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$"
MODEL_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:/\-]{0,127}$"

DEFAULT_MAX_PROMPT_BYTES: Final = 1 << 20
DEFAULT_MAX_METADATA_BYTES: Final = 16 << 10

# validation context keys: limits come from settings, passed in at validation time
CTX_MAX_PROMPT_BYTES: Final = "max_prompt_bytes"
CTX_MAX_METADATA_BYTES: Final = "max_metadata_bytes"

TaskIdStr = Annotated[str, StringConstraints(pattern=TASK_ID_PATTERN)]
NameStr = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str


class JsonSchemaSpec(StrictModel):
    name: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "output"
    schema_: dict[str, JsonValue] = Field(alias="schema")
    strict: bool = True

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ResponseFormat(StrictModel):
    """Structured-output request: a JSON Schema, any JSON object, plain text or a GBNF grammar."""

    type: Literal["text", "json_object", "json_schema", "grammar"]
    json_schema: JsonSchemaSpec | None = None
    grammar: str | None = None

    @model_validator(mode="after")
    def _matches_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        if self.type == "grammar" and not self.grammar:
            raise ValueError("grammar is required when type is 'grammar'")
        return self


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


class TaskEvent(StrictModel):
    """A task as published on ``{ns}:tasks:<pool>:<priority>`` (entry type ``task.submitted``).

    Exactly one of ``prompt`` and ``messages`` is given. ``temperature`` ``0`` is a real value
    and reaches the provider as ``0``; an absent parameter means "the model's default".
    Size limits are enforced when the validation context carries them (see
    :func:`parse_task_event`).
    """

    v: Literal[1] = 1
    task_id: TaskIdStr | None = None
    model: Annotated[str, StringConstraints(pattern=MODEL_PATTERN)]
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    stop: (
        Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(max_length=16)]
        | None
    ) = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    priority: NameStr | None = None
    pool: NameStr | None = None
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    webhook_url: Annotated[str, StringConstraints(max_length=2048)] | None = None
    response_format: ResponseFormat | None = None
    stream: bool = False
    deadline: datetime | None = None
    timeout_s: Annotated[float, Field(gt=0.0, le=7 * 86400)] | None = None
    reply_to: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_\-]{1,64}$")] | None = None
    max_attempts: Annotated[int, Field(ge=1, le=100)] | None = None
    metadata: dict[str, JsonValue] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        return value

    @field_validator("deadline")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must carry a timezone (e.g. '2026-01-01T00:00:00Z')")
        return value

    @model_validator(mode="after")
    def _prompt_xor_messages(self, info: ValidationInfo) -> TaskEvent:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' and 'messages' is required")
        ctx = info.context or {}
        max_prompt = ctx.get(CTX_MAX_PROMPT_BYTES)
        if max_prompt is not None:
            size = self.prompt_bytes()
            if size > max_prompt:
                field = "prompt" if self.prompt is not None else "messages"
                raise ValueError(f"{field} is {size} bytes, over the limit of {max_prompt} bytes")
        max_meta = ctx.get(CTX_MAX_METADATA_BYTES)
        if max_meta is not None and self.metadata is not None:
            size = _json_bytes(self.metadata)
            if size > max_meta:
                raise ValueError(f"metadata is {size} bytes, over the limit of {max_meta} bytes")
        return self

    def prompt_bytes(self) -> int:
        if self.prompt is not None:
            return len(self.prompt.encode())
        return sum(len(m.content.encode()) for m in self.messages or ())

    def payload_hash(self) -> str:
        """A digest of what the task asks for, without its identity fields.

        Two submissions under one idempotency key are "the same" when these digests match.
        """
        body = self.model_dump(
            mode="json", exclude={"task_id", "idempotency_key", "v"}, exclude_none=True
        )
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_wire(self) -> str:
        return self.model_dump_json(exclude_none=True, by_alias=True)


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming every offending field, e.g. ``temperature: Input should be <= 2``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "event"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_task_event(
    data: str | bytes,
    *,
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
) -> TaskEvent:
    """Validate a ``data`` field. Raises :class:`pydantic.ValidationError`."""
    return TaskEvent.model_validate_json(
        data,
        context={
            CTX_MAX_PROMPT_BYTES: max_prompt_bytes,
            CTX_MAX_METADATA_BYTES: max_metadata_bytes,
        },
    )
