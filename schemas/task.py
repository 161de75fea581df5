"""The task event: what a producer publishes to a task partition."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal, NewType, TypedDict
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sop_llm.schemas.wire import StrictModel

TaskId = NewType("TaskId", str)

TASK_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$"
MODEL_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:/\-]{0,127}$"

DEFAULT_MAX_PROMPT_BYTES: Final = 1 << 20
DEFAULT_MAX_METADATA_BYTES: Final = 16 << 10

# validation context keys: limits come from settings, passed in at validation time
CTX_MAX_PROMPT_BYTES: Final = "max_prompt_bytes"
CTX_MAX_METADATA_BYTES: Final = "max_metadata_bytes"

# an integer deadline is ms since the epoch; outside these years it is a mistake (seconds, a
# duration), never a time to expire at
DEADLINE_MIN_MS: Final = 946_684_800_000  # 2000-01-01T00:00:00Z
DEADLINE_MAX_MS: Final = 7_258_118_400_000  # 2200-01-01T00:00:00Z
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# RFC 3339 date-time; the zone is checked after parsing, to say so when it is missing
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})?"
)

TaskIdStr = Annotated[str, StringConstraints(pattern=TASK_ID_PATTERN)]
NameStr = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]


class TaskWireModel(StrictModel):
    """Base of the task event's models: ``NaN`` and ``Infinity`` are refused (JSON has neither).

    Numbers and booleans are declared ``StrictInt``, ``StrictFloat`` (an integer is a number
    too) and ``StrictBool``: taken only as their JSON type, never coerced (``"5"`` is no
    integer, ``true`` no number, ``"yes"`` no boolean); strings, arrays and objects are never
    coerced anyway. Per field rather than a strict model, so that the SDK's Python values (a
    tuple for a list, a deadline string) stay valid.
    """

    model_config = ConfigDict(allow_inf_nan=False)


def _finite_json(value: dict[str, JsonValue]) -> dict[str, JsonValue]:
    """Refuse ``NaN`` and ``Infinity`` anywhere inside a JSON value (the encoder checks at C
    speed; the walk that names the place runs only when one is there)."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        where = _non_finite_at(value)
        if where is None:
            raise ValueError("is not a JSON value") from None
        raise ValueError(f"NaN and Infinity are not JSON numbers (at {where})") from None
    except RecursionError:
        raise ValueError("is nested too deeply") from None
    return value


def _non_finite_at(value: JsonValue) -> str | None:
    """Where the first non-finite number in ``value`` sits, as ``a.0.b``; iterative."""
    todo: list[tuple[JsonValue, tuple[str | int, ...]]] = [(value, ())]
    while todo:
        item, keys = todo.pop()
        if isinstance(item, dict):
            todo.extend((v, (*keys, k)) for k, v in item.items())
        elif isinstance(item, list):
            todo.extend((v, (*keys, i)) for i, v in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            return ".".join(str(k) for k in keys)
    return None


JsonObject = Annotated[dict[str, JsonValue], AfterValidator(_finite_json)]


class ChatMessage(TaskWireModel):
    role: Literal["system", "user", "assistant"]
    content: str


class JsonSchemaSpec(TaskWireModel):
    name: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "output"
    schema_: JsonObject = Field(alias="schema")
    strict: StrictBool = True

    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(TaskWireModel):
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


class TaskEvent(TaskWireModel):
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
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=1_000_000)] | None = None
    stop: (
        Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(max_length=16)]
        | None
    ) = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] | None = None
    priority: NameStr | None = None
    pool: NameStr | None = None
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    webhook_url: Annotated[str, StringConstraints(max_length=2048)] | None = None
    response_format: ResponseFormat | None = None
    stream: StrictBool = False
    # an RFC 3339 time with a zone, or an integer of ms since the epoch within
    # DEADLINE_MIN_MS..DEADLINE_MAX_MS: `_deadline_form` lets through only these
    deadline: datetime | None = None
    timeout_s: Annotated[StrictFloat, Field(gt=0.0, le=7 * 86400)] | None = None
    reply_to: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_\-]{1,64}$")] | None = None
    max_attempts: Annotated[StrictInt, Field(ge=1, le=100)] | None = None
    metadata: JsonObject | None = None

    @field_validator("v", mode="before")
    @classmethod
    def _integer_version(cls, value: Any) -> Any:
        # Literal[1] alone would take `true` and `1.0` (both equal 1)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be the integer 1")
        return value

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

    @field_validator("deadline", mode="before")
    @classmethod
    def _deadline_form(cls, value: Any) -> Any:
        if value is None or isinstance(value, datetime):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            if not DEADLINE_MIN_MS <= value < DEADLINE_MAX_MS:
                raise ValueError(
                    f"{value} is not a time in milliseconds since the epoch between the years "
                    "2000 and 2199; give milliseconds or an RFC 3339 time with a zone"
                )
            return _EPOCH + timedelta(milliseconds=value)
        if isinstance(value, str) and _RFC3339.fullmatch(value):
            return value
        raise ValueError(
            "must be an RFC 3339 time with a zone (e.g. '2026-01-01T00:00:00Z') "
            "or an integer of milliseconds since the epoch"
        )

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


class TaskFields(TypedDict, total=False):
    """The keyword arguments of ``Producer.submit`` besides the model and the prompt: the
    :class:`TaskEvent` fields, typed for callers (the event validates their values)."""

    task_id: str
    messages: Sequence[ChatMessage | Mapping[str, str]]
    temperature: float
    top_p: float
    max_tokens: int
    stop: Sequence[str]
    seed: int
    priority: str
    pool: str
    idempotency_key: str
    webhook_url: str
    response_format: ResponseFormat | Mapping[str, Any]
    stream: bool
    deadline: datetime | int | str
    timeout_s: float
    reply_to: str
    max_attempts: int
    metadata: Mapping[str, Any]
