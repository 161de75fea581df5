"""Renders the OpenAPI 3.1 document of the sidecar's HTTP endpoints.

The status record's schema comes from the pydantic model (:class:`schemas.result.StatusRecord`),
the GPU snapshot's device and semaphore parts from their dataclasses, the token events from
:mod:`ops.asyncapi`; the small bodies the sidecar builds as dicts (queue figures, health) are
written here and checked against real responses by ``tests/ops/test_openapi.py``.

``python -m ops.openapi docs/openapi.json`` writes the document; a test fails when that file is
stale. The sidecar serves it at ``GET /openapi.json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from pydantic import TypeAdapter
from pydantic.json_schema import models_json_schema

from gpu.nvml import DeviceMemory
from gpu.semaphore import Holder, Waiter
from ops.asyncapi_messages import token_delta_schema, token_end_schema
from schemas.result import StatusRecord
from schemas.task import TASK_ID_PATTERN

OPENAPI_VERSION: Final = "3.1.0"
API_VERSION: Final = "1.0.0"
SCHEMA_REF: Final = "#/components/schemas/{model}"
BEARER: Final = "bearerAuth"

_Json = dict[str, Any]

_DESCRIPTION: Final = """\
The sop-llm sidecar: task status, token streams, queue and GPU figures, health and metrics.

It binds `SOP_SIDECAR_HOST`:`SOP_SIDECAR_PORT` (default 127.0.0.1:8080). When
`SOP_SIDECAR_TOKEN` is set, every endpoint but `/health/live` requires
`Authorization: Bearer <token>` and answers 401 without it; when it is unset, none does.
Errors are JSON: `{"error": <code>, "message": <text>}`."""

_SSE_DESCRIPTION: Final = """\
Server-sent events, from the task's first token (also for a late reader): `event: delta` with
`data:` a TokenDelta as JSON (the text generated since the previous event), then one
`event: end` with `data:` a TokenEnd as JSON (the task's terminal state and finish reason),
after which the response ends. A task that did not ask for `stream` sends its whole text as one
delta once it has finished. The outcome itself is at `GET /v1/tasks/{task_id}`."""


def _ref(name: str) -> _Json:
    return {"$ref": SCHEMA_REF.format(model=name)}


def _json_body(schema: _Json, description: str) -> _Json:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> _Json:
    return _json_body(_ref("Error"), description)


def _dataclass_schema(tp: type[object]) -> _Json:
    schema: _Json = TypeAdapter(tp).json_schema(ref_template=SCHEMA_REF)
    schema["additionalProperties"] = False  # served through dataclasses.asdict: these fields only
    return schema


def _schemas() -> dict[str, _Json]:
    _, defs = models_json_schema([(StatusRecord, "serialization")], ref_template=SCHEMA_REF)
    out: dict[str, _Json] = defs.get("$defs", {})
    out["Error"] = {
        "type": "object",
        "description": "An error answer.",
        "properties": {
            "error": {
                "type": "string",
                "description": "A short code: not_found, unauthorized, ...",
            },
            "message": {"type": "string"},
        },
        "required": ["error", "message"],
        "additionalProperties": False,
    }
    out["QueuePartition"] = {
        "type": "object",
        "description": "One task partition: its stream and the `workers` group on it.",
        "properties": {
            "stream": {"type": "string", "examples": ["{sop}:tasks:default:high"]},
            "pool": {"type": "string"},
            "partition": {"type": "string"},
            "length": {"type": "integer", "minimum": 0, "description": "XLEN of the stream"},
            "group": {"type": "boolean", "description": "whether the `workers` group exists"},
            "pending": {
                "type": "integer",
                "minimum": 0,
                "description": "entries delivered to a worker and not finished",
            },
            "lag": {
                "type": ["integer", "null"],
                "description": "entries not yet delivered (null: Redis cannot tell)",
            },
            "oldest_pending_age_ms": {
                "type": ["integer", "null"],
                "minimum": 0,
                "description": "age of the oldest pending entry (null: none pending)",
            },
            "consumers": {"type": "integer", "minimum": 0},
            "last_delivered_id": {
                "type": "string",
                "description": "the group's last delivered entry id (when the group exists)",
            },
        },
        "required": [
            "stream",
            "pool",
            "partition",
            "length",
            "group",
            "pending",
            "lag",
            "oldest_pending_age_ms",
            "consumers",
        ],
        "additionalProperties": False,
    }
    out["Queue"] = {
        "type": "object",
        "properties": {"partitions": {"type": "array", "items": _ref("QueuePartition")}},
        "required": ["partitions"],
        "additionalProperties": False,
    }
    out["DeviceMemory"] = _dataclass_schema(DeviceMemory)
    out["SemaphoreHolder"] = _dataclass_schema(Holder)
    out["SemaphoreWaiter"] = _dataclass_schema(Waiter)
    out["GpuSnapshot"] = _gpu_schema()
    out["TokenDelta"] = token_delta_schema()
    out["TokenEnd"] = token_end_schema()
    out["Live"] = {
        "type": "object",
        "properties": {"status": {"const": "live"}},
        "required": ["status"],
        "additionalProperties": False,
    }
    out["Ready"] = {
        "type": "object",
        "properties": {
            "status": {"enum": ["ready", "not_ready"]},
            "problems": {
                "type": "array",
                "items": {"type": "string"},
                "description": "why it is not ready (Redis unreachable or too slow, a "
                "consumer group missing, the worker not started, unable to reach Redis or "
                "stalled on a call)",
            },
        },
        "required": ["status"],
        "additionalProperties": False,
    }
    return dict(sorted(out.items()))


def _gpu_schema() -> _Json:
    return {
        "type": "object",
        "description": "This host's GPUs as the serving process sees them. A part it cannot "
        "read is left empty and named in `errors`. A process without a GPU runtime (no "
        "local model) answers only `status` and an empty `devices`.",
        "properties": {
            "status": {
                "type": "string",
                "description": '"ok", or why there is no GPU ("no GPU: ...")',
            },
            "devices": {"type": "array", "items": _ref("DeviceMemory")},
            "models": {
                "type": "array",
                "items": {
                    "type": "object",
                    "description": "A model this process loaded.",
                    "properties": {
                        "model": {"type": "string"},
                        "device": {
                            "type": ["integer", "null"],
                            "description": "device index (null: the CPU)",
                        },
                        "need_bytes": {"type": "integer", "minimum": 0},
                        "in_use": {"type": "integer", "minimum": 0},
                        "idle_s": {"type": "number", "minimum": 0},
                    },
                    "required": ["model", "device", "need_bytes", "in_use", "idle_s"],
                    "additionalProperties": False,
                },
            },
            "semaphores": {
                "type": "array",
                "items": {
                    "type": "object",
                    "description": "A device's GPU semaphore: its permits, holders and waiters "
                    "(in the order they will be served).",
                    "properties": {
                        "device": {"type": "string", "examples": ["host-a:0"]},
                        "host": {"type": "string"},
                        "index": {"type": "integer", "minimum": 0},
                        "permits": {"type": "integer", "minimum": 1},
                        "holders": {"type": "array", "items": _ref("SemaphoreHolder")},
                        "waiters": {"type": "array", "items": _ref("SemaphoreWaiter")},
                    },
                    "required": ["device", "host", "index", "permits", "holders", "waiters"],
                    "additionalProperties": False,
                },
            },
            "errors": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["status", "devices"],
        "additionalProperties": False,
    }


def _get(
    op_id: str,
    summary: str,
    responses: _Json,
    *,
    tag: str,
    secured: bool = True,
    parameters: list[_Json] | None = None,
    description: str | None = None,
) -> _Json:
    op: _Json = {"operationId": op_id, "summary": summary, "tags": [tag]}
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = parameters
    if secured:
        responses = {**responses, "401": {"$ref": "#/components/responses/Unauthorized"}}
    else:
        op["security"] = []  # open even when SOP_SIDECAR_TOKEN is set
    op["responses"] = dict(sorted(responses.items()))
    return {"get": op}


def _paths() -> _Json:
    task_id = {"$ref": "#/components/parameters/TaskId"}
    unknown = _error("No such task: never seen, or its record expired (`not_found`).")
    document = {"type": "object", "additionalProperties": True}
    return {
        "/v1/tasks/{task_id}": _get(
            "getTask",
            "A task's status record",
            tag="tasks",
            parameters=[task_id],
            description="The status hash `{ns}:task:<id>`: state, timestamps, attempts, the "
            "outcome once terminal, and the webhook delivery log. Absent fields are omitted.",
            responses={
                "200": _json_body(_ref("StatusRecord"), "The status record."),
                "404": unknown,
            },
        ),
        "/v1/tasks/{task_id}/stream": _get(
            "streamTask",
            "A task's token deltas, as server-sent events",
            tag="tasks",
            parameters=[task_id],
            description=_SSE_DESCRIPTION,
            responses={
                "200": {
                    "description": "The event stream.",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                "404": unknown,
            },
        ),
        "/v1/queue": _get(
            "getQueue",
            "Depth, lag and pending entries per task partition",
            tag="operations",
            responses={"200": _json_body(_ref("Queue"), "One row per pool and partition.")},
        ),
        "/v1/gpu": _get(
            "getGpu",
            "GPU memory, loaded models and semaphore holders",
            tag="operations",
            responses={"200": _json_body(_ref("GpuSnapshot"), "The GPU snapshot.")},
        ),
        "/health/live": _get(
            "live",
            "Liveness: the process answers",
            tag="health",
            secured=False,
            responses={"200": _json_body(_ref("Live"), "Alive.")},
        ),
        "/health/ready": _get(
            "ready",
            "Readiness: Redis reachable, consumer groups present, worker started",
            tag="health",
            responses={
                "200": _json_body(_ref("Ready"), "Ready."),
                "503": _json_body(_ref("Ready"), "Not ready; `problems` says why."),
            },
        ),
        "/metrics": _get(
            "metrics",
            "Prometheus metrics",
            tag="operations",
            description="Prometheus text exposition: the serving process's worker metrics "
            "and the queue figures read at scrape time (see docs/operations.md).",
            responses={
                "200": {
                    "description": "Prometheus text format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        ),
        "/asyncapi.json": _get(
            "asyncapi",
            "The AsyncAPI 3.0 document of this namespace's streams",
            tag="documents",
            responses={"200": _json_body(document, "The AsyncAPI document.")},
        ),
        "/openapi.json": _get(
            "openapi",
            "This document",
            tag="documents",
            responses={"200": _json_body(document, "The OpenAPI document.")},
        ),
    }


def openapi_document() -> dict[str, object]:
    """The OpenAPI 3.1 document of the sidecar, as a JSON-ready dict (a fresh one each call)."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "sop-llm sidecar",
            "version": API_VERSION,
            "description": _DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "http://127.0.0.1:8080", "description": "The default bind address"}],
        # either the bearer token (when SOP_SIDECAR_TOKEN is set) or nothing (when it is not)
        "security": [{BEARER: []}, {}],
        "tags": [
            {"name": "tasks", "description": "Task status and token streams"},
            {"name": "operations", "description": "Queue, GPU and metrics"},
            {"name": "health", "description": "Liveness and readiness probes"},
            {"name": "documents", "description": "The API documents themselves"},
        ],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "parameters": {
                "TaskId": {
                    "name": "task_id",
                    "in": "path",
                    "required": True,
                    "description": "The task id.",
                    "schema": {"type": "string", "pattern": TASK_ID_PATTERN},
                }
            },
            "responses": {
                "Unauthorized": _error(
                    "SOP_SIDECAR_TOKEN is set and the request carries no valid bearer token "
                    "(`unauthorized`)."
                )
            },
            "securitySchemes": {
                BEARER: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The value of SOP_SIDECAR_TOKEN; required only when it is set.",
                }
            },
        },
    }


def render() -> str:
    """The document as pretty JSON text, ending in a newline (what docs/openapi.json holds)."""
    return json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str]) -> int:
    """``python -m ops.openapi [PATH]``: write the document to PATH, or to stdout."""
    text = render()
    if argv:
        Path(argv[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
