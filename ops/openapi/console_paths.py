"""The OpenAPI paths of the console's HTTP API (:mod:`ops.http_api`) and pages
(:mod:`ops.console`); their schemas are in :mod:`.console_schemas`, the request bodies' (a task
event, a model spec) in :mod:`.schemas`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from sop_llm.ops.console import CONSOLE_FILES, DOCS_FILES
from sop_llm.ops.openapi.parts import (
    Json,
    error,
    json_body,
    operation,
    path_param,
    query,
    ref,
    response_ref,
)
from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.result import TaskState
from sop_llm.schemas.task import MODEL_PATTERN

_INT: Final = {"type": "integer", "minimum": 0}
_STR: Final = {"type": "string"}
_NULL: Final = {"type": "null"}
_ENTRY_ID: Final = {"type": "string", "pattern": "^[0-9]{1,20}-[0-9]{1,20}$"}


def _nullable(schema: Json) -> Json:
    return {"anyOf": [schema, _NULL]}


def _array(items: Json) -> Json:
    return {"type": "array", "items": items}


def responses() -> Json:
    """Shared answers of the console's endpoints, for ``components.responses``."""
    return {
        "BadParameter": error("A query parameter is out of its range (`invalid_parameter`)."),
        "BadBody": error("The body is not JSON (`invalid_json`)."),
        "Forbidden": error(
            "A change from a web page of another origin, or, without SOP_SIDECAR_TOKEN, one "
            "addressed by a host name (`forbidden`)."
        ),
        "TooLarge": error("The body is larger than the sidecar accepts."),
        "NotJson": error("The body is not declared `application/json`."),
    }


def _read(op_id: str, summary: str, schema: str, *, tag: str, params: list[Json] | None = None,
          description: str | None = None, extra: Json | None = None) -> Json:  # fmt: skip
    answers = {"200": json_body(ref(schema), summary), "503": response_ref("Unavailable"),
               **(extra or {})}  # fmt: skip
    if any(p.get("in") == "query" for p in params or ()):
        answers["400"] = response_ref("BadParameter")
    return operation("get", op_id, summary, answers, tag=tag, parameters=params,
                     description=description)  # fmt: skip


def _change(method: str, op_id: str, summary: str, answers: Json, *, tag: str,
            body: str | None = None, params: list[Json] | None = None,
            description: str | None = None) -> Json:  # fmt: skip
    answers = {**answers, "403": response_ref("Forbidden"), "503": response_ref("Unavailable")}
    request_body = None
    if body is not None:
        request_body = {"required": True, "content": {"application/json": {"schema": ref(body)}}}
        answers |= {"400": response_ref("BadBody"), "413": response_ref("TooLarge"),
                    "415": response_ref("NotJson")}  # fmt: skip
    if any(p.get("in") == "query" for p in params or ()):
        answers["400"] = answers.get("400", response_ref("BadParameter"))
    return operation(method, op_id, summary, answers, tag=tag, parameters=params,
                     description=description, request_body=request_body)  # fmt: skip


def _file(op_id: str, summary: str, types: Sequence[str], params: list[Json] | None = None) -> Json:
    content = {t: {"schema": {"type": "string"}} for t in types}
    answers: Json = {"200": {"description": summary, "content": content}}
    if params:
        answers["404"] = error("No such file (`not_found`).")
    return operation("get", op_id, summary, answers, tag="console", secured=False,
                     parameters=params)  # fmt: skip


def paths() -> Json:
    task_id = {"$ref": "#/components/parameters/TaskId"}
    no_task = error("No such task: never seen, or its record expired (`not_found`).")
    count = {"type": "integer", "minimum": 1}
    filters = [
        query("task_id", {"type": "string", "maxLength": 256}, "only this task"),
        query("model", {"type": "string", "maxLength": 256}, "only this model"),
    ]
    model = path_param("name", {"type": "string", "pattern": MODEL_PATTERN}, "The model name.")
    invalid = error("Refused: the message names each field (`invalid_event`, `invalid_spec`, "
                    "`invalid_body`, `selection_required`).")  # fmt: skip
    location = {"Location": {"schema": _STR, "description": "/v1/models/<name>"}}
    link: dict[str, Any] = {"parameters": {"task_id": "$response.body#/task_id"}}
    submit = _change(
        "post", "submitTask", "Submit a task", tag="tasks", body="TaskEvent",
        params=[{"name": "Idempotency-Key", "in": "header", "required": False,
                 "description": "the task's idempotency key (the body's `idempotency_key`, "
                 "which must then be absent or the same: 409 otherwise)",
                 "schema": {"type": "string", "pattern": "^[!-~]{1,256}$"}}],
        description="Published through the producer SDK (`Producer.submit`): the same checks, "
        "the same idempotency. A second submission with the same idempotency key and payload "
        "answers the first task's id.",
        answers={
            "202": json_body(ref("Accepted"), "Queued; `Location` is its status.",
                             headers={"Location": {"schema": _STR,
                                                   "description": "/v1/tasks/<task_id>"}},
                             links={"GetTask": {"operationId": "getTask", **link},
                                    "CancelTask": {"operationId": "cancelTask", **link}}),
            "409": error("The idempotency key is bound to another payload, or the task id is "
                         "in use (`idempotency_conflict`, `duplicate_task_id`)."),
            "422": invalid,
            "429": error("The partition's backlog is full (`backlog_full`): retry later."),
        },
    )  # fmt: skip
    return {
        "/v1/tasks": submit,
        "/v1/tasks/{task_id}": _change(
            "delete",
            "cancelTask",
            "Cancel a task",
            tag="tasks",
            params=[task_id],
            description="Queued: it ends `cancelled` at once (200). Running: it stops between "
            "tokens (202). Finished: nothing changes (409).",
            answers={
                "200": json_body(ref("Cancelled"), "Cancelled."),
                "202": json_body(ref("Cancelled"), "Asked to stop."),
                "404": no_task,
                "409": json_body(ref("Cancelled"), "Already finished."),
            },
        ),
        "/v1/tasks/{task_id}/history": _read(
            "getTaskHistory",
            "A task's earlier attempts' errors and its dead letters",
            "TaskHistory",
            tag="tasks",
            params=[task_id],
            extra={"404": no_task},
        ),
        "/v1/overview": _read(
            "getOverview",
            "Partitions, consumers, workers, dead letters, retries, webhooks, models",
            "Overview",
            tag="operations",
        ),
        "/v1/inflight": _read(
            "getInflight",
            "Tasks delivered to a worker and not finished",
            "Inflight",
            tag="operations",
            params=[
                query(
                    "limit",
                    {**count, "maximum": 1000},
                    "at most this many per partition (default 100)",
                )
            ],
        ),
        "/v1/results": _read(
            "listResults",
            "Recent outcomes, newest first",
            "Results",
            tag="tasks",
            params=[
                query("count", {**count, "maximum": 500}, "how many (default 50)"),
                query(
                    "state", {"enum": [s.value for s in TaskState if s.terminal]}, "only this state"
                ),
                *filters,
            ],
            description="Searched among the newest 5000 entries of the results stream.",
        ),
        "/v1/dead": _read(
            "listDeadLetters",
            "Task dead letters, newest first",
            "DeadLetters",
            tag="dead letters",
            params=[
                query("count", {**count, "maximum": 1000}, "how many (default 100)"),
                query("reason", {"enum": [c.value for c in ErrorCode]}, "only this reason"),
                *filters,
            ],
            description="Searched among the newest 5000 dead letters (requeue and purge act "
            "on all of them); `unreadable` counts entries that do not parse.",
        ),
        "/v1/dead/requeue": _change(
            "post",
            "requeueDeadLetters",
            "Publish dead tasks again (same task ids)",
            tag="dead letters",
            body="DeadSelection",
            answers={
                "200": json_body(ref("Requeued"), "What was requeued, what could not be."),
                "404": error("None of the ids named is a dead letter (`not_found`)."),
                "422": invalid,
            },
        ),
        "/v1/dead/purge": _change(
            "post",
            "purgeDeadLetters",
            "Delete dead letters",
            tag="dead letters",
            body="DeadSelection",
            answers={
                "200": json_body(ref("Purged"), "How many were deleted."),
                "404": error("None of the ids named is a dead letter (`not_found`)."),
                "422": invalid,
            },
        ),
        "/v1/webhooks/dead": _read(
            "listWebhookDeadLetters",
            "Dead webhook deliveries, newest first",
            "WebhookDeadLetters",
            tag="dead letters",
            params=[query("count", {**count, "maximum": 1000}, "how many (default 50)")],
        ),
        "/v1/webhooks/{task_id}/redeliver": _change(
            "post",
            "redeliverWebhook",
            "Send a task's webhook again (same webhook-id)",
            tag="dead letters",
            params=[
                task_id,
                query("force", {"type": "boolean"}, "even while a delivery is under way"),
            ],
            answers={
                "202": json_body(ref("Redelivery"), "Queued for delivery."),
                "404": error("No delivery of this task is left (`not_found`)."),
                "409": error("Its delivery is under way (`busy`): pass force=true."),
            },
        ),
        "/v1/models": _read(
            "listModels",
            "Runtime models, built-in models and the workers serving each",
            "ModelList",
            tag="models",
        )
        | _change(
            "post",
            "registerModel",
            "Register or replace a model at run time",
            tag="models",
            body="ModelSpec",
            description="Stored in `{ns}:models`; workers of its pool pick it up without a "
            "restart (`sop-llm models add`).",
            answers={
                "200": json_body(ref("ModelChange"), "Replaced.", headers=location),
                "201": json_body(ref("ModelChange"), "Registered.", headers=location),
                "422": invalid,
            },
        ),
        "/v1/models/{name}": _read(
            "getModel",
            "A runtime model's spec",
            "ModelSpec",
            tag="models",
            params=[model],
            extra={
                "404": error("Not registered at run time (`not_found`)."),
                "409": error("Its stored spec is invalid (`invalid_spec`)."),
            },
        )
        | _change(
            "delete",
            "removeModel",
            "Forget a runtime model",
            tag="models",
            params=[model],
            answers={
                "200": json_body(ref("ModelChange"), "Removed."),
                "404": error("Not registered at run time (`not_found`)."),
            },
        ),
        "/": _file("console", "The operator console", ["text/html"]),
        "/console/{name}": _file(
            "consoleFile",
            "A file of the console page",
            ["text/javascript", "text/css", "image/png"],
            [path_param("name", {"enum": list(CONSOLE_FILES)}, "The file.")],
        ),
        "/docs": _file("docs", "Swagger UI over this document", ["text/html"]),
        "/docs/{name}": _file(
            "docsFile",
            "A file of the docs page",
            ["text/javascript", "text/css", "text/plain"],
            [path_param("name", {"enum": list(DOCS_FILES)}, "The file.")],
        ),
    }
