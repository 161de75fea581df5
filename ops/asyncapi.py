"""Renders the AsyncAPI 3.0 document of every sop-llm stream, so the published format cannot drift.

Payload schemas come from the pydantic wire models (``model_json_schema``), channel addresses
from :class:`streams.keys.Keys`, event types from :class:`schemas.wire.EventType`. Only the
three small payloads that have no model of their own (``task.cancel``, ``token.delta``,
``token.end``) are written here as JSON Schema.

Every entry on every stream is a flat map of UTF-8 string fields (``type``, ``data``,
``traceparent``, ``tracestate``), so each message's ``payload`` describes that map; its
``data`` field is a JSON string whose schema is given by ``contentSchema``.

``python -m ops.asyncapi docs/asyncapi.json`` writes the document (default namespace ``sop``);
a test fails when that file is stale. The sidecar serves it at ``GET /asyncapi.json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, get_args

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from handlers.webhook_store import (
    F_ATTEMPT_LOG,
    WEBHOOK_DEAD_TYPE,
    AttemptRecord,
    WebhookDeadLetter,
)
from schemas.errors import ErrorCode
from schemas.result import (
    DeadLetter,
    ErrorInfo,
    FinishReason,
    TaskResult,
    TaskState,
    Usage,
    WebhookJob,
)
from schemas.task import TASK_ID_PATTERN, TaskEvent
from schemas.wire import (
    FIELD_DATA,
    FIELD_TRACEPARENT,
    FIELD_TRACESTATE,
    FIELD_TYPE,
    WIRE_VERSION,
    EventType,
)
from streams.keys import DEFAULT_PARTITIONS, DEFAULT_POOL, TASK_GROUP, WEBHOOK_GROUP, Keys
from streams.tokens import DELTA, END

ASYNCAPI_VERSION: Final = "3.0.0"
# entry types of the token stream `{ns}:task:<id>:tokens` (kept in streams.tokens, not in
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

_DESCRIPTION: Final = """\
Every stream of one sop-llm namespace, for producers and consumers in any language.

**Entries.** Every entry is a flat map of UTF-8 string fields: `type` (the event type), `data`
(the payload as UTF-8 JSON; it carries `"v": 1`, optional on input) and, optionally,
`traceparent` / `tracestate` (W3C trace context, carried through to results and webhooks).
Each message's `payload` describes that map; the schema of the JSON inside `data` is given by
its `contentSchema`. Other fields are ignored by sop-llm.

**Addresses.** `{sop}` is the namespace's Redis Cluster hash tag, braces included
(`SOP_NAMESPACE`); it is declared as a parameter whose one value is itself, so every address
reads exactly as the Redis key. The payload schemas are generated from the pydantic models in
`schemas/`; see docs/wire-format.md for the rules around them (task ids, idempotency, bad
input)."""


def _ref(name: str) -> _Json:
    return {"$ref": SCHEMA_REF.format(model=name)}


def cancel_schema() -> _Json:
    """The ``data`` of a ``task.cancel`` entry on ``{ns}:control``."""
    return {
        "title": "CancelRequest",
        "description": "Ask for a task to be cancelled (queued: at once; running: between tokens).",
        "type": "object",
        "properties": {
            "v": {"const": WIRE_VERSION, "default": WIRE_VERSION, "type": "integer"},
            "task_id": {"type": "string", "pattern": TASK_ID_PATTERN},
        },
        "required": ["task_id"],
        "additionalProperties": False,
    }


def token_delta_schema() -> _Json:
    """The ``data`` of a ``token.delta`` entry: the text generated since the previous one."""
    return {
        "title": "TokenDelta",
        "description": "Text generated since the previous delta, in order.",
        "type": "object",
        "properties": {
            "v": {"const": WIRE_VERSION, "default": WIRE_VERSION, "type": "integer"},
            "text": {"type": "string"},
        },
        "required": ["text"],
        "additionalProperties": False,
    }


def token_end_schema() -> _Json:
    """The ``data`` of the ``token.end`` entry that closes a token stream."""
    terminal = [state.value for state in TaskState if state.terminal]
    return {
        "title": "TokenEnd",
        "description": "The last entry of a token stream, written after the task's outcome "
        "(which goes to results as usual).",
        "type": "object",
        "properties": {
            "v": {"const": WIRE_VERSION, "default": WIRE_VERSION, "type": "integer"},
            "state": {"type": "string", "enum": terminal, "description": "the terminal state"},
            "finish_reason": {
                "anyOf": [
                    {"type": "string", "enum": list(get_args(FinishReason))},
                    {"type": "null"},
                ],
                "description": "how the generation ended (null: it never ran)",
            },
        },
        "required": ["state"],
        "additionalProperties": False,
    }


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


def _messages(keys: Keys) -> dict[str, _Json]:
    examples = _examples(keys)
    out: dict[str, _Json] = {}
    for name, type_, schema, title, summary, traced in _MESSAGES:
        extra = {F_ATTEMPT_LOG: dict(_ATTEMPT_LOG_FIELD)}
        out[name] = _message(
            type_, schema, title=title, summary=summary, example=examples[type_],
            traceparent=traced, extra=extra if type_ == EventType.WEBHOOK_DELIVERY else None,
        )  # fmt: skip
    return out


def _msg_refs(names: Sequence[str]) -> _Json:
    return {n: {"$ref": f"#/components/messages/{n}"} for n in names}


def _channels(keys: Keys, ns_param: str) -> _Json:
    ns = {ns_param: {"$ref": f"#/components/parameters/{ns_param}"}}
    result_msgs = ["taskCompleted", "taskFailed", "taskCancelled", "taskExpired"]
    return {
        "tasks": {
            "address": keys.tasks("{pool}", "{priority}"),
            "title": "Task partitions",
            "description": (
                "Task events, one stream per pool and priority partition (`SOP_POOLS`, "
                "`SOP_PARTITIONS`, highest first). The stream decides the priority. Consumer "
                f"group `{TASK_GROUP}`. A task published without `task_id` gets the id "
                "`<pool>.<partition>.<entry id>`."
            ),
            "parameters": {
                **ns,
                "pool": {
                    "description": "The pool (`SOP_POOLS`): a name served by workers that run "
                    "its models.",
                    "default": DEFAULT_POOL,
                    "examples": [DEFAULT_POOL],
                },
                "priority": {
                    "description": "The priority partition (`SOP_PARTITIONS`, highest first).",
                    "examples": list(DEFAULT_PARTITIONS),
                },
            },
            "messages": _msg_refs(["taskSubmitted"]),
        },
        "results": {
            "address": keys.results,
            "title": "Results",
            "description": (
                "Exactly one terminal entry per task, written atomically with its status "
                "record, its webhook job and the acknowledgement of its task entry. Read with "
                "XREAD from any id, or with a consumer group of your own."
            ),
            "parameters": ns,
            "messages": _msg_refs(result_msgs),
        },
        "replyResults": {
            "address": keys.results_for("{reply_to}"),
            "title": "Results of one reply_to",
            "description": (
                "A copy of the terminal entry of every task that named `reply_to`, so each "
                "producing service reads only its own outcomes."
            ),
            "parameters": {
                **ns,
                "reply_to": {
                    "description": "The task's `reply_to` (`[A-Za-z0-9_-]{1,64}`).",
                    "examples": ["billing"],
                },
            },
            "messages": _msg_refs(result_msgs),
        },
        "webhooks": {
            "address": keys.webhooks,
            "title": "Webhook delivery jobs",
            "description": (
                f"One job per outcome of a task with `webhook_url`. Consumer group "
                f"`{WEBHOOK_GROUP}`; a retry comes back as a new entry once it is due."
            ),
            "parameters": ns,
            "messages": _msg_refs(["webhookDelivery"]),
        },
        "webhooksDead": {
            "address": keys.webhooks_dead,
            "title": "Dead webhook deliveries",
            "description": "Deliveries given up on (`sop-llm webhooks dead`, `redeliver`).",
            "parameters": ns,
            "messages": _msg_refs(["webhookDead"]),
        },
        "control": {
            "address": keys.control,
            "title": "Control events",
            "description": (
                "Read by every worker (no group). `sop-llm cancel`, `Producer.cancel` or a "
                "plain XADD publish here."
            ),
            "parameters": ns,
            "messages": _msg_refs(["taskCancel"]),
        },
        "dead": {
            "address": keys.dead,
            "title": "Dead letters",
            "description": (
                "Task entries that could not be run (bad input, attempts exhausted), with "
                "their provenance (`sop-llm dead list|show|requeue|purge`)."
            ),
            "parameters": ns,
            "messages": _msg_refs(["taskDead"]),
        },
        "taskTokens": {
            "address": keys.task_tokens("{task_id}"),
            "title": "Token deltas of one task",
            "description": (
                "For a task submitted with `stream: true`: its deltas in order, then one "
                "`token.end`. Short TTL. Served as server-sent events by the sidecar at "
                "`GET /v1/tasks/{task_id}/stream`."
            ),
            "parameters": {
                **ns,
                "task_id": {
                    "description": f"The task id (`{TASK_ID_PATTERN}`).",
                    "examples": ["hello-1"],
                },
            },
            "messages": _msg_refs(["tokenDelta", "tokenEnd"]),
        },
    }


# (operation id, action, channel, messages, summary): sop-llm's own view of each stream
_OPERATIONS: Final = (
    (
        "receiveTask",
        "receive",
        "tasks",
        ("taskSubmitted",),
        f"Workers read tasks in priority order (group `{TASK_GROUP}`).",
    ),
    (
        "sendResult",
        "send",
        "results",
        ("taskCompleted", "taskFailed", "taskCancelled", "taskExpired"),
        "Exactly one terminal outcome per task.",
    ),
    (
        "sendReplyResult",
        "send",
        "replyResults",
        ("taskCompleted", "taskFailed", "taskCancelled", "taskExpired"),
        "The outcome again, for the task's reply_to.",
    ),
    (
        "sendWebhookJob",
        "send",
        "webhooks",
        ("webhookDelivery",),
        "A delivery job, written with the outcome.",
    ),
    (
        "receiveWebhookJob",
        "receive",
        "webhooks",
        ("webhookDelivery",),
        f"Webhook senders deliver jobs (group `{WEBHOOK_GROUP}`).",
    ),
    ("sendWebhookDead", "send", "webhooksDead", ("webhookDead",), "A delivery given up on."),
    (
        "receiveCancel",
        "receive",
        "control",
        ("taskCancel",),
        "Every worker watches for cancel requests.",
    ),
    ("sendDeadLetter", "send", "dead", ("taskDead",), "A task entry that could not be run."),
    (
        "sendTokens",
        "send",
        "taskTokens",
        ("tokenDelta", "tokenEnd"),
        "Token deltas of a streaming task.",
    ),
)


def asyncapi_document(namespace: str = "sop") -> dict[str, object]:
    """The AsyncAPI 3.0 document of ``namespace``'s streams, as a JSON-ready dict (a fresh
    one each call). Raises ``ValueError`` for an invalid namespace."""
    keys = Keys(namespace)
    ns_param = namespace  # `{sop}` in an address is the hash tag; see _DESCRIPTION
    operations = {
        op_id: {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{m}"} for m in messages],
            "summary": summary,
        }
        for op_id, action, channel, messages, summary in _OPERATIONS
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "sop-llm streams",
            "version": f"{WIRE_VERSION}.0.0",
            "description": _DESCRIPTION,
            "license": {"name": "Apache-2.0"},
        },
        "servers": {
            "redis": {
                "host": "localhost:6379",
                "protocol": "redis",
                "description": "Any Redis 7 (or Redis Cluster); sop-llm connects to SOP_REDIS_URL.",
            }
        },
        "channels": _channels(keys, ns_param),
        "operations": operations,
        "components": {
            "schemas": model_schemas(),
            "messages": _messages(keys),
            "parameters": {
                ns_param: {
                    "description": (
                        f"The namespace's hash tag, braces included: `{keys.prefix}` "
                        f"(SOP_NAMESPACE={namespace}). Not a placeholder: its only value is "
                        "itself."
                    ),
                    "enum": [keys.prefix],
                    "default": keys.prefix,
                }
            },
        },
    }


def render(namespace: str = "sop") -> str:
    """The document as pretty JSON text, ending in a newline (what docs/asyncapi.json holds)."""
    return json.dumps(asyncapi_document(namespace), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str]) -> int:
    """``python -m ops.asyncapi [PATH]``: write the document to PATH, or to stdout."""
    text = render()
    if argv:
        Path(argv[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
