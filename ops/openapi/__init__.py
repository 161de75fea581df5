"""Renders the OpenAPI 3.1 document of the sidecar's HTTP endpoints.

Read in the order the document is put together: :mod:`.parts` (references, bodies,
operations), :mod:`.schemas` (the wire models' schemas from pydantic, the request bodies
tightened, the status, queue, GPU and health bodies), :mod:`.console_schemas` and
:mod:`.console_paths` (the console's API and pages), then this module (the status and health
paths, and the document). Every schema of a body the sidecar builds as a dict is checked
against real answers by ``tests/ops/test_openapi.py`` and ``tests/ops/test_http_api.py``.

``python -m sop_llm.ops.openapi docs/openapi.json`` writes the document; a test fails when that
file is
stale. The sidecar serves it at ``GET /openapi.json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from sop_llm.ops.openapi import console_paths, console_schemas
from sop_llm.ops.openapi.parts import (
    BEARER,
    Json,
    error,
    json_body,
    merge_paths,
    operation,
    ref,
    response_ref,
)
from sop_llm.ops.openapi.schemas import schemas
from sop_llm.schemas.task import TASK_ID_PATTERN
from sop_llm.streams.keys import DEFAULT_PARTITIONS, DEFAULT_POOL

OPENAPI_VERSION: Final = "3.1.0"
API_VERSION: Final = "1.1.0"

_Json = Json

_DESCRIPTION: Final = """\
The sop-llm sidecar: task status, token streams, queue and GPU figures, health and metrics; the
operator console (`/`) and the HTTP API it uses to submit and cancel tasks, requeue and purge
dead letters, redeliver webhooks and register models; Swagger UI over this document at `/docs`.

It binds `SOP_SIDECAR_HOST`:`SOP_SIDECAR_PORT` (default 127.0.0.1:8080). When
`SOP_SIDECAR_TOKEN` is set, every endpoint but `/health/live` and the console's files requires
`Authorization: Bearer <token>` and answers 401 without it; when it is unset, none does.
A request that changes something (POST, PUT, DELETE) is refused (403) when it comes from a web
page of another origin, and, without a token, when it names the sidecar by a host name other
than `localhost` (only an IP address cannot be re-pointed by DNS).
Errors are JSON: `{"error": <code>, "message": <text>}`; Redis trouble is a 503."""

_SSE_DESCRIPTION: Final = """\
Server-sent events, from the task's first token (also for a late reader): `event: delta` with
`data:` a TokenDelta as JSON (the text generated since the previous event), then one
`event: end` with `data:` a TokenEnd as JSON (the task's terminal state and finish reason),
after which the response ends. A task that did not ask for `stream` sends its whole text as one
delta once it has finished. The outcome itself is at `GET /v1/tasks/{task_id}`.

The schema describes one event (the Open API 3.2 convention for `text/event-stream`): its
`event` name and its `data`, a JSON document of the schema `contentSchema` names."""


def _sse_event(name: str, schema: str, description: str) -> _Json:
    return {
        "title": f"{name} event",
        "description": description,
        "type": "object",
        "properties": {
            "event": {"const": name},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": ref(schema),
            },
        },
        "required": ["event", "data"],
    }


def _sse_schema() -> _Json:
    return {
        "oneOf": [
            _sse_event("delta", "TokenDelta", "Text generated since the previous event."),
            _sse_event("end", "TokenEnd", "The last event: the terminal state."),
        ]
    }


def _get(op_id: str, summary: str, responses: _Json, **kw: object) -> _Json:
    return operation("get", op_id, summary, responses, **kw)  # type: ignore[arg-type]


def _paths() -> _Json:
    task_id = {"$ref": "#/components/parameters/TaskId"}
    unknown = error("No such task: never seen, or its record expired (`not_found`).")
    unavailable = response_ref("Unavailable")
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
                "200": json_body(ref("StatusRecord"), "The status record."),
                "404": unknown,
                "503": unavailable,
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
                    "description": "The event stream: delta events, then one end event.",
                    "content": {"text/event-stream": {"schema": _sse_schema()}},
                },
                "404": unknown,
                "503": unavailable,
            },
        ),
        "/v1/queue": _get(
            "getQueue",
            "Depth, lag and pending entries per task partition",
            tag="operations",
            responses={
                "200": json_body(ref("Queue"), "One row per pool and partition."),
                "503": unavailable,
            },
        ),
        "/v1/gpu": _get(
            "getGpu",
            "GPU memory, loaded models and semaphore holders",
            tag="operations",
            responses={"200": json_body(ref("GpuSnapshot"), "The GPU snapshot.")},
        ),
        "/health/live": _get(
            "live",
            "Liveness: the process answers",
            tag="health",
            secured=False,
            responses={"200": json_body(ref("Live"), "Alive.")},
        ),
        "/health/ready": _get(
            "ready",
            "Readiness: Redis reachable, consumer groups present, worker started",
            tag="health",
            responses={
                "200": json_body(ref("Ready"), "Ready."),
                "503": json_body(ref("Ready"), "Not ready; `problems` says why."),
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
            responses={"200": json_body(document, "The AsyncAPI document.")},
        ),
        "/openapi.json": _get(
            "openapi",
            "This document",
            tag="documents",
            responses={"200": json_body(document, "The OpenAPI document.")},
        ),
    }


def openapi_document(
    *, pools: Sequence[str] = (DEFAULT_POOL,), partitions: Sequence[str] = DEFAULT_PARTITIONS
) -> dict[str, object]:
    """The OpenAPI 3.1 document of the sidecar, as a JSON-ready dict (a fresh one each call).
    ``pools`` and ``partitions``: those a submission may name (the sidecar's settings; the
    defaults give docs/openapi.json)."""
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
            {"name": "tasks", "description": "Submit, look up, stream and cancel tasks"},
            {"name": "operations", "description": "Queue, workers, GPU and metrics"},
            {"name": "dead letters", "description": "Dead tasks and webhook deliveries"},
            {"name": "models", "description": "The model registry"},
            {"name": "health", "description": "Liveness and readiness probes"},
            {"name": "console", "description": "The operator console and these docs (files)"},
            {"name": "documents", "description": "The API documents themselves"},
        ],
        "paths": merge_paths(_paths(), console_paths.paths()),
        "components": {
            "schemas": dict(sorted(console_schemas.schemas(schemas(pools, partitions)).items())),
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
                "Unauthorized": error(
                    "SOP_SIDECAR_TOKEN is set and the request carries no valid bearer token "
                    "(`unauthorized`)."
                ),
                "Unavailable": error(
                    "Redis cannot be reached, or refused the command (`unavailable`)."
                ),
                **console_paths.responses(),
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
    """``python -m sop_llm.ops.openapi [PATH]``: write the document to PATH, or to stdout."""
    text = render()
    if argv:
        Path(argv[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
