"""The schemas of the console API's answers and bodies (its paths: :mod:`.console_paths`).

The answers are dicts :mod:`ops.console_data` and :mod:`ops.http_api` build; each schema is
closed (``additionalProperties: false``), so a field added there and not here fails
``tests/ops/test_http_api.py``, which validates real answers against the document.
"""

from __future__ import annotations

import copy
from typing import Final

from sop_llm.ops.openapi.parts import Json, closed_object, ref

_INT: Final = {"type": "integer", "minimum": 0}
_STR: Final = {"type": "string"}
_NULL: Final = {"type": "null"}
_ENTRY_ID: Final = {"type": "string", "pattern": "^[0-9]{1,20}-[0-9]{1,20}$"}


def _nullable(schema: Json) -> Json:
    return {"anyOf": [schema, _NULL]}


def _array(items: Json) -> Json:
    return {"type": "array", "items": items}


def _webhook_dead_row() -> Json:
    readable = closed_object(
        {
            "id": _STR, "readable": {"const": True}, "task_id": _nullable(_STR),
            "delivery_id": _nullable(_STR), "url": _nullable(_STR),
            "reason": {"enum": ["exhausted", "gone", "refused", "invalid_job",
                                "payload_too_large"]},
            "attempts": _INT, "last_attempt": _nullable(ref("AttemptRecord")), "dead_at": _INT,
        }
    )  # fmt: skip
    unreadable = closed_object({"id": _STR, "readable": {"const": False}})
    return {"description": "A dead webhook delivery (`readable` false: its entry does not "
            "parse).", "oneOf": [readable, unreadable]}  # fmt: skip


def _overview() -> Json:
    consumer = closed_object(
        {"group": _STR, "consumer": _STR, "pending": _INT, "idle_ms": _nullable(_INT),
         "lease_alive": {"type": "boolean"}, "lease_ttl_ms": _nullable(_INT)},
        description="A consumer of a group, with its lease (`{ns}:worker:<name>`).",
    )  # fmt: skip
    worker = closed_object(
        {"consumer": _STR, "pools": _array(_STR), "models": _array(_STR),
         "version": {"type": "integer", "description": "model store version taken (-1: none)"},
         "lease_ttl_ms": _nullable(_INT),
         "held": {**_INT, "description": "task entries it holds (slots in use)"}},
        description="A live worker, from its lease.",
    )  # fmt: skip
    dead = closed_object({"length": _INT, "newest": _array(closed_object(
        {"id": _STR, "task_id": _nullable(_STR), "reason": _STR, "message": _STR}))})  # fmt: skip
    return closed_object(
        {
            "namespace": _STR, "at_ms": _INT,
            "partitions": _array(ref("OverviewPartition")), "consumers": _array(consumer),
            "dead": dead,
            "retries": closed_object({"waiting": _INT, "next_due_in_ms": _nullable(_INT)}),
            "webhooks": closed_object({"length": _INT, "pending": _INT,
                                       "lag": _nullable(_INT), "delayed": _INT, "dead": _INT}),
            "results": closed_object({"length": _INT}),
            "models": _array(_STR), "served": {"type": "object",
                                               "additionalProperties": _array(_STR)},
            "workers": _array(worker),
            "parked": {**_INT, "description": "entries parked waiting for their model"},
        },
        description="One picture of the namespace: `sop-llm inspect --json` and the workers.",
    )  # fmt: skip


def schemas(base: dict[str, Json]) -> Json:
    """``base`` (see :func:`ops.openapi.schemas.schemas`) and the console API's own."""
    out = dict(base)
    partition = copy.deepcopy(base["QueuePartition"])
    added = "entries ever added (a rate is its change over time)"
    partition["properties"]["entries_added"] = {**_INT, "description": added}
    partition["properties"]["oldest_waiting_age_ms"] = {
        **_nullable(_INT),
        "description": "age of the oldest entry not delivered yet (null: none waits)",
    }
    partition["required"] += ["entries_added", "oldest_waiting_age_ms"]
    out["OverviewPartition"] = partition
    row = copy.deepcopy(base["TaskResult"])
    row["properties"] = {"id": {**_STR, "description": "the results entry id"}, **row["properties"]}
    row["required"] = ["id", *row.get("required", [])]
    out["ResultRow"] = row
    dead_row = closed_object(
        {"id": _STR, "task_id": _nullable(_STR), "reason": ref("ErrorCode"), "message": _STR,
         "attempts": _INT, "source_stream": _STR, "model": _nullable(_STR),
         "errors": _array(ref("ErrorInfo")), "dead_at": _INT},
    )  # fmt: skip
    out["DeadRow"] = dead_row
    out["WebhookDeadRow"] = _webhook_dead_row()
    out["Overview"] = _overview()
    out["Inflight"] = closed_object({"tasks": _array(closed_object(
        {"task_id": _STR, "state": _nullable(ref("TaskState")), "model": _nullable(_STR),
         "started_at": _nullable(_INT), "attempts": _INT, "pool": _STR, "partition": _STR,
         "entry_id": _STR, "consumer": _STR, "parked": {"type": "boolean"}, "idle_ms": _INT,
         "deliveries": _INT})), "truncated": {"type": "boolean"}})  # fmt: skip
    out["Results"] = closed_object({"results": _array(ref("ResultRow")), "length": _INT})
    out["DeadLetters"] = closed_object(
        {"length": _INT, "unreadable": _INT, "letters": _array(ref("DeadRow"))}
    )
    named = {"type": "string", "minLength": 1, "maxLength": 256}
    out["DeadSelection"] = {
        **closed_object(
            {"ids": {**_array(_ENTRY_ID), "minItems": 1, "maxItems": 1000}, "task_id": named,
             "reason": ref("ErrorCode"), "model": named, "all": {"type": "boolean"}},
            required=[],
        ),
        "description": "Which dead letters: these entry ids, those matching every filter "
        "given, or (`all: true`) every one. One of them is required.",
        "anyOf": [{"required": [name]} for name in ("ids", "task_id", "reason", "model")]
        + [{"properties": {"all": {"const": True}}, "required": ["all"]}],
    }  # fmt: skip
    out["Requeued"] = closed_object({
        "requeued": _array(closed_object({"id": _STR, "task_id": _nullable(_STR),
                                          "stream": _STR, "entry_id": _STR})),
        "failed": _array(closed_object({"id": _STR, "message": _STR})),
        "missing": _array(_STR)})  # fmt: skip
    out["Purged"] = closed_object({"purged": _INT, "missing": _array(_STR)})
    out["WebhookDeadLetters"] = closed_object(
        {"length": _INT, "letters": _array(ref("WebhookDeadRow"))}
    )
    out["Redelivery"] = closed_object(
        {"task_id": _STR, "delivery_id": _STR, "entry_id": _STR, "from_dead": {"type": "boolean"}}
    )
    out["TaskHistory"] = closed_object(
        {"errors": _array(ref("ErrorInfo")), "dead_letters": _array(ref("DeadRow")),
         "webhook_dead_letters": _array(ref("WebhookDeadRow"))}
    )  # fmt: skip
    out["Accepted"] = closed_object({"task_id": _STR, "location": _STR})
    out["Cancelled"] = closed_object(
        {"task_id": _STR, "outcome": {"enum": ["cancelled", "requested", "finished"]}}
    )
    out["ModelList"] = closed_object(
        {"version": _INT, "specs": _array(ref("ModelSpec")),
         "invalid": {"type": "object", "additionalProperties": _STR},
         "builtin": _array(_STR),
         "served": {"type": "object", "additionalProperties": _array(_STR)}}
    )  # fmt: skip
    out["ModelChange"] = closed_object({"name": _STR, "version": _INT})
    return out
