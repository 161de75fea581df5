"""Renders the AsyncAPI 3.0 document of every sop-llm stream, so the published format cannot drift.

Channel addresses come from :class:`streams.keys.Keys`, the messages (payload schemas from the
pydantic wire models, entry shapes, examples) from :mod:`ops.asyncapi_messages`; this module
adds the channels, the operations and the document around them.

Every entry on every stream is a flat map of UTF-8 string fields (``type``, ``data``,
``traceparent``, ``tracestate``), so each message's ``payload`` describes that map; its
``data`` field is a JSON string whose schema is given by ``contentSchema``.

``python -m sop_llm.ops.asyncapi docs/asyncapi.json`` writes the document (default namespace
``sop``);
a test fails when that file is stale. The sidecar serves it at ``GET /asyncapi.json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from sop_llm.ops.asyncapi_messages import messages, model_schemas
from sop_llm.schemas.task import TASK_ID_PATTERN
from sop_llm.schemas.wire import WIRE_VERSION
from sop_llm.streams.envelopes import FIELD_CORRELATION_ID, FIELD_ENVELOPE, MAX_CORRELATION_ID
from sop_llm.streams.keys import DEFAULT_PARTITIONS, DEFAULT_POOL, TASK_GROUP, WEBHOOK_GROUP, Keys

ASYNCAPI_VERSION: Final = "3.0.0"
_RESULT_MESSAGES: Final = ("taskCompleted", "taskFailed", "taskCancelled", "taskExpired")

_Json = dict[str, Any]

_DESCRIPTION: Final = """\
Every stream of one sop-llm namespace, for producers and consumers in any language.

**Entries.** Every entry is a flat map of UTF-8 string fields: `type` (the event type), `data`
(the payload as UTF-8 JSON; it carries `"v": 1`, optional on input) and, optionally,
`traceparent` / `tracestate` (W3C trace context, carried through to results and webhooks).
Each message's `payload` describes that map; the schema of the JSON inside `data` is given by
its `contentSchema`. Other fields are ignored by sop-llm.

**FastStream.** A FastStream app's own `broker.publish` to a task partition (one `__data__`
field holding FastStream's envelope) runs like a plain entry; its correlation id comes back as
the `correlation_id` field of the task's result entries. FastStream subscribers of the result
streams read one shape through sop-llm's parser, `streams.envelopes.results_parser`. See
docs/wire-format.md, "FastStream".

**Addresses.** `{sop}` is the namespace's Redis Cluster hash tag, braces included
(`SOP_NAMESPACE`); it is declared as a parameter whose one value is itself, so every address
reads exactly as the Redis key. The payload schemas are generated from the pydantic models in
`schemas/`; see docs/wire-format.md for the rules around them (task ids, idempotency, bad
input)."""


def _msg_refs(names: Sequence[str]) -> _Json:
    return {n: {"$ref": f"#/components/messages/{n}"} for n in names}


def _channels(keys: Keys, ns_param: str) -> _Json:
    ns = {ns_param: {"$ref": f"#/components/parameters/{ns_param}"}}
    result_msgs = list(_RESULT_MESSAGES)
    return {
        "tasks": {
            "address": keys.tasks("{pool}", "{priority}"),
            "title": "Task partitions",
            "description": (
                "Task events, one stream per pool and priority partition (`SOP_POOLS`, "
                "`SOP_PARTITIONS`, highest first). The stream decides the priority. Consumer "
                f"group `{TASK_GROUP}`. A task published without `task_id` gets the id "
                "`<pool>.<partition>.<entry id>`. A FastStream `broker.publish` (one "
                f"`{FIELD_ENVELOPE}` field: FastStream's envelope, the task JSON as its body) is "
                "read as `task.submitted` with that body as `data`."
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
                "XREAD from any id, or with a consumer group of your own (a FastStream "
                "`StreamSub` with `parser=streams.envelopes.results_parser`)."
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
                "pathname": "/0",
                "protocol": "redis",
                "description": (
                    "Any Redis 7 (or Redis Cluster); sop-llm connects to SOP_REDIS_URL. The "
                    "pathname is the database index (a Redis Cluster has only 0)."
                ),
            }
        },
        "channels": _channels(keys, ns_param),
        "operations": operations,
        "components": {
            "schemas": model_schemas(),
            "messages": _with_correlation_id(messages(keys)),
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


def _with_correlation_id(found: dict[str, _Json]) -> dict[str, _Json]:
    """The result messages gain the field that carries a task entry's correlation id back."""
    for name in _RESULT_MESSAGES:
        found[name]["payload"]["properties"][FIELD_CORRELATION_ID] = {
            "type": "string",
            "maxLength": MAX_CORRELATION_ID,
            "description": (
                "the correlation id of the task entry (a FastStream publish's "
                "`correlation_id` header, or a plain entry's field of that name); absent "
                "when it had none"
            ),
        }
    return found


def render(namespace: str = "sop") -> str:
    """The document as pretty JSON text, ending in a newline (what docs/asyncapi.json holds)."""
    return json.dumps(asyncapi_document(namespace), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str]) -> int:
    """``python -m sop_llm.ops.asyncapi [PATH]``: write the document to PATH, or to stdout."""
    text = render()
    if argv:
        Path(argv[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
