"""The messages of the AsyncAPI document: payload schemas, entry shapes and examples.

Payload schemas come from the pydantic wire models (``model_json_schema``); the three small
payloads with no model of their own (``task.cancel``, ``token.delta``, ``token.end``) are written
here as JSON Schema. Every example is built through the models, so it stays valid.
:mod:`ops.asyncapi` puts these into the document with its channels and operations.
"""

from __future__ import annotations

import json
from typing import Any, Final, get_args

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.result import (
    DeadLetter,
    ErrorInfo,
    FinishReason,
    TaskResult,
    TaskState,
    Usage,
    WebhookJob,
)
from sop_llm.schemas.task import TASK_ID_PATTERN, TaskEvent
from sop_llm.schemas.wire import (
    FIELD_DATA,
    FIELD_TRACEPARENT,
    FIELD_TRACESTATE,
    FIELD_TYPE,
    WIRE_VERSION,
    EventType,
)
from sop_llm.streams.keys import DEFAULT_POOL, Keys
from sop_llm.streams.tokens import DELTA, END
from sop_llm.streams.webhook_store import (
    F_ATTEMPT_LOG,
    WEBHOOK_DEAD_TYPE,
    AttemptRecord,
    WebhookDeadLetter,
)

# entry types of the token stream `{ns}:tokens:<id>` (kept in streams.tokens, not in
# EventType: they never reach a task, result or webhook stream)
TOKEN_DELTA: Final = DELTA
TOKEN_END: Final = END

SCHEMA_REF: Final = "#/components/schemas/{model}"
_TRACEPARENT_PATTERN: Final = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
_EXAMPLE_MS: Final = 1_767_225_600_000
_EXAMPLE_TRACEPARENT: Final = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

_Json = dict[str, Any]

# the models whose JSON Schema goes into components.schemas (their nested models follow)
_MODELS: Final[tuple[type[BaseModel], ...]] = (
    TaskEvent,
    TaskResult,
    WebhookJob,
    DeadLetter,
    WebhookDeadLetter,
)


def _ref(name: str) -> _Json:
    return {"$ref": SCHEMA_REF.format(model=name)}


def _small_payload(title: str, description: str, required: str, fields: _Json) -> _Json:
    """A closed JSON object with ``v`` and ``fields``, of which ``required`` must be present."""
    return {
        "title": title,
        "description": description,
        "type": "object",
        "properties": {
            "v": {"const": WIRE_VERSION, "default": WIRE_VERSION, "type": "integer"},
            **fields,
        },
        "required": [required],
        "additionalProperties": False,
    }


def cancel_schema() -> _Json:
    """The ``data`` of a ``task.cancel`` entry on ``{ns}:control``."""
    return _small_payload(
        "CancelRequest",
        "Ask for a task to be cancelled (queued: at once; running: between tokens).",
        "task_id",
        {"task_id": {"type": "string", "pattern": TASK_ID_PATTERN}},
    )


def token_delta_schema() -> _Json:
    """The ``data`` of a ``token.delta`` entry: the text generated since the previous one."""
    return _small_payload(
        "TokenDelta",
        "Text generated since the previous delta, in order.",
        "text",
        {"text": {"type": "string"}},
    )


def token_end_schema() -> _Json:
    """The ``data`` of the ``token.end`` entry that closes a token stream."""
    terminal = [state.value for state in TaskState if state.terminal]
    reasons = {"type": "string", "enum": list(get_args(FinishReason))}
    return _small_payload(
        "TokenEnd",
        "The last entry of a token stream, written after the task's outcome "
        "(which goes to results as usual).",
        "state",
        {
            "state": {"type": "string", "enum": terminal, "description": "the terminal state"},
            "finish_reason": {
                "anyOf": [reasons, {"type": "null"}],
                "description": "how the generation ended (null: it never ran)",
            },
        },
    )


def model_schemas() -> dict[str, _Json]:
    """JSON Schemas of the stream payloads and what they nest, keyed by name, their refs
    pointing into ``#/components/schemas``."""
    _, defs = models_json_schema([(m, "validation") for m in _MODELS], ref_template=SCHEMA_REF)
    schemas: dict[str, _Json] = defs.get("$defs", {})
    schemas["CancelRequest"] = cancel_schema()
    schemas["TokenDelta"] = token_delta_schema()
    schemas["TokenEnd"] = token_end_schema()
    return dict(sorted(schemas.items()))


def _entry(type_: str, data_schema: str, summary: str, extra: _Json | None = None) -> _Json:
    """The payload schema of a message: the entry's fields, ``data`` holding ``data_schema``."""
    fields: _Json = {
        FIELD_TYPE: {"type": "string", "const": type_, "description": "the event type"},
        FIELD_DATA: {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": _ref(data_schema),
            "description": f"{summary}, as UTF-8 JSON ({data_schema})",
        },
        FIELD_TRACEPARENT: {
            "type": "string",
            "pattern": _TRACEPARENT_PATTERN,
            "description": "W3C trace context; a missing or malformed one starts a new trace",
        },
        FIELD_TRACESTATE: {"type": "string", "description": "W3C trace state"},
    }
    fields.update(extra or {})
    return {
        "type": "object",
        "required": [FIELD_TYPE, FIELD_DATA],
        "properties": fields,
        "additionalProperties": {"type": "string"},
    }


def _message(
    type_: str,
    data_schema: str,
    *,
    title: str,
    summary: str,
    example: str,
    traceparent: bool = False,
    extra: _Json | None = None,
) -> _Json:
    type_ = str(type_)  # an EventType member: its plain value
    sample: _Json = {FIELD_TYPE: type_, FIELD_DATA: example}
    if traceparent:
        sample[FIELD_TRACEPARENT] = _EXAMPLE_TRACEPARENT
    return {
        "name": type_,
        "title": title,
        "summary": summary,
        "payload": _entry(type_, data_schema, summary, extra),
        "examples": [{"name": type_, "payload": sample}],
    }


def _examples(keys: Keys) -> dict[str, str]:
    """One ``data`` value per entry type, built through the models (so they stay valid)."""
    done = TaskResult(
        task_id="hello-1", state=TaskState.COMPLETED, model="echo",
        text="hello from redis-cli hello", finish_reason="length",
        usage=Usage(input_tokens=3, output_tokens=4), queued_ms=1, run_ms=0,
        worker="host-123-ab12cd", attempts=1, finished_at=_EXAMPLE_MS,
    )  # fmt: skip
    bad = "temperature: Input should be less than or equal to 2"
    failed = TaskResult(
        task_id="bad-1", state=TaskState.FAILED, model="echo", finish_reason="error",
        attempts=1, finished_at=_EXAMPLE_MS,
        error=ErrorInfo(code=ErrorCode.INVALID_EVENT, message=bad),
    )  # fmt: skip
    cancelled = TaskResult(
        task_id="hello-2", state=TaskState.CANCELLED, model="echo", text="partial",
        finish_reason="cancelled", attempts=1, finished_at=_EXAMPLE_MS,
    )  # fmt: skip
    expired = TaskResult(
        task_id="hello-3", state=TaskState.EXPIRED, model="echo", finish_reason="deadline",
        finished_at=_EXAMPLE_MS,
    )  # fmt: skip
    job = WebhookJob(
        delivery_id="msg_2f1c0e9a", task_id="hello-1", url="https://example.com/hooks/sop",
        event=EventType.TASK_COMPLETED.value, payload=done, created_at=_EXAMPLE_MS,
    )  # fmt: skip
    bad_data = '{"task_id":"bad-1","model":"echo","prompt":"hi","temperature":3}'
    dead = DeadLetter(
        source_stream=keys.tasks(DEFAULT_POOL, "normal"), entry_id=f"{_EXAMPLE_MS}-0",
        task_id="bad-1", reason=ErrorCode.INVALID_EVENT, message=bad, attempts=1,
        fields={FIELD_TYPE: EventType.TASK_SUBMITTED.value, FIELD_DATA: bad_data},
        dead_at=_EXAMPLE_MS,
    )  # fmt: skip
    webhook_dead = WebhookDeadLetter(
        reason="gone", delivery_id=job.delivery_id, task_id=job.task_id, url=job.url,
        event=job.event, attempts=[AttemptRecord(at=_EXAMPLE_MS, status=410)],
        source_stream=keys.webhooks, entry_id=f"{_EXAMPLE_MS}-1", dead_at=_EXAMPLE_MS,
    )  # fmt: skip
    task = TaskEvent(task_id="hello-1", model="echo", prompt="hello from redis-cli", max_tokens=4)

    def compact(doc: _Json) -> str:
        return json.dumps(doc, separators=(",", ":"))

    def wire(m: BaseModel) -> str:
        return m.model_dump_json(exclude_none=True)

    return {
        EventType.TASK_SUBMITTED: task.to_wire(),
        EventType.TASK_COMPLETED: wire(done),
        EventType.TASK_FAILED: wire(failed),
        EventType.TASK_CANCELLED: wire(cancelled),
        EventType.TASK_EXPIRED: wire(expired),
        EventType.WEBHOOK_DELIVERY: wire(job),
        EventType.TASK_DEAD: wire(dead),
        EventType.TASK_CANCEL: compact({"v": WIRE_VERSION, "task_id": "hello-2"}),
        WEBHOOK_DEAD_TYPE: wire(webhook_dead),
        TOKEN_DELTA: compact({"v": WIRE_VERSION, "text": " world"}),
        TOKEN_END: compact({"v": WIRE_VERSION, "state": "completed", "finish_reason": "stop"}),
    }


# (message id, entry type, data schema, title, summary, carries traceparent)
_MESSAGES: Final = (
    ("taskSubmitted", EventType.TASK_SUBMITTED, "TaskEvent", "Task submitted",
     "A task: model, prompt or messages, sampling parameters", True),
    ("taskCompleted", EventType.TASK_COMPLETED, "TaskResult", "Task completed",
     "The terminal outcome: the generation", True),
    ("taskFailed", EventType.TASK_FAILED, "TaskResult", "Task failed",
     "The terminal outcome: why the task failed (error)", True),
    ("taskCancelled", EventType.TASK_CANCELLED, "TaskResult", "Task cancelled",
     "The terminal outcome of a cancelled task (with the text so far)", True),
    ("taskExpired", EventType.TASK_EXPIRED, "TaskResult", "Task expired",
     "The terminal outcome of a task past its deadline", True),
    ("webhookDelivery", EventType.WEBHOOK_DELIVERY, "WebhookJob", "Webhook delivery job",
     "One delivery of one outcome to one URL", True),
    ("webhookDead", WEBHOOK_DEAD_TYPE, "WebhookDeadLetter", "Dead webhook delivery",
     "A delivery that will not be attempted again", False),
    ("taskCancel", EventType.TASK_CANCEL, "CancelRequest", "Cancel a task",
     "A cancel request for one task", False),
    ("taskDead", EventType.TASK_DEAD, "DeadLetter", "Dead letter",
     "A task entry that could not be run, with its provenance", True),
    ("tokenDelta", TOKEN_DELTA, "TokenDelta", "Token delta",
     "Text generated since the previous delta", False),
    ("tokenEnd", TOKEN_END, "TokenEnd", "End of the token stream",
     "How the task ended", False),
)  # fmt: skip

# the extra field of a webhook job that comes back for another attempt
_ATTEMPT_LOG_FIELD: Final = {
    "type": "string",
    "contentMediaType": "application/json",
    "contentSchema": {"type": "array", "items": {"$ref": SCHEMA_REF.format(model="AttemptRecord")}},
    "description": "on a retried job only: the attempts made so far, as UTF-8 JSON",
}


def messages(keys: Keys) -> dict[str, _Json]:
    """Every message of the document, keyed by its id, each with one valid example."""
    examples = _examples(keys)
    out: dict[str, _Json] = {}
    for name, type_, schema, title, summary, traced in _MESSAGES:
        extra = {F_ATTEMPT_LOG: dict(_ATTEMPT_LOG_FIELD)}
        out[name] = _message(
            type_, schema, title=title, summary=summary, example=examples[type_],
            traceparent=traced, extra=extra if type_ == EventType.WEBHOOK_DELIVERY else None,
        )  # fmt: skip
    return out
