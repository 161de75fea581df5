"""The schemas of the OpenAPI document: the pydantic wire models' (one pass, so each nested
model has one definition) and those written here for the bodies the sidecar builds as dicts
(queue figures, GPU snapshot, health), checked against real answers by
``tests/ops/test_openapi.py``.

Request bodies (a task event, a model spec) are tightened with what the models check in code
and a JSON Schema can say too (exactly one of ``prompt`` and ``messages``, the partitions and
pools this sidecar serves, which fields each provider needs), so that a client that validates
against the document is refused only for what no schema can state: the SSRF guard on a
``webhook_url``, the prompt's size in bytes."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Final

from pydantic import TypeAdapter
from pydantic.json_schema import models_json_schema

from sop_llm.gpu.nvml import DeviceMemory
from sop_llm.gpu.semaphore import Holder, Waiter
from sop_llm.ops.asyncapi_messages import token_delta_schema, token_end_schema
from sop_llm.ops.openapi.parts import SCHEMA_REF, Json, ref
from sop_llm.schemas.models import ModelSpec
from sop_llm.schemas.result import DeadLetter, StatusRecord, TaskResult
from sop_llm.schemas.task import DEADLINE_MAX_MS, DEADLINE_MIN_MS, TaskEvent
from sop_llm.streams.webhook_store import AttemptRecord

_Json = Json


_STR: Final = {"type": "string"}
_NULL: Final = {"type": "null"}
_REMOTE: Final = ["openai", "openai_compatible", "anthropic"]
_LABEL: Final = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PORT: Final = (
    "([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
)
# a host name whose last label starts with a letter (numeric host forms are refused), an
# optional port, then anything but white space
WEBHOOK_URL_PATTERN: Final = (
    rf"^https?://({_LABEL}\.)*[A-Za-z]([A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?(:{_PORT})?"
    r"([/?#][^\s]*)?$"
)


def _nullable(schema: Json) -> Json:
    return {"anyOf": [schema, _NULL]}


def _array(items: Json) -> Json:
    return {"type": "array", "items": items}


def _when(provider: Json, then: Json) -> Json:
    return {"if": {"properties": {"provider": provider}}, "then": then}


def _task_event(base: Json, pools: Sequence[str], partitions: Sequence[str]) -> Json:
    event = copy.deepcopy(base)
    props = event["properties"]
    props["priority"] = {
        **_nullable({"enum": list(partitions)}),
        "description": "a partition of this deployment (SOP_PARTITIONS); default: the middle one",
    }
    props["pool"] = {
        **_nullable({"enum": list(pools)}),
        "description": "a pool this sidecar serves (SOP_POOLS)",
    }
    props["webhook_url"] = {
        **_nullable({"type": "string", "maxLength": 2048, "pattern": WEBHOOK_URL_PATTERN}),
        "description": "where the outcome is POSTed; refused (422) when the SSRF guard "
        "refuses it (see docs/webhooks.md)",
    }
    props["deadline"] = {
        "anyOf": [
            {"type": "string", "format": "date-time"},
            {"type": "integer", "minimum": DEADLINE_MIN_MS, "maximum": DEADLINE_MAX_MS - 1},
            _NULL,
        ],
        "description": "an RFC 3339 time with a zone, or milliseconds since the epoch",
    }
    props["prompt"]["description"] = "at most SOP_MAX_PROMPT_BYTES bytes of UTF-8"
    event["oneOf"] = [
        {"properties": {"prompt": _STR}, "required": ["prompt"]},
        {"properties": {"messages": {"type": "array"}}, "required": ["messages"]},
    ]
    return event


def _response_format(base: Json) -> Json:
    fmt = copy.deepcopy(base)
    needs = {
        "json_schema": {"properties": {"json_schema": ref("JsonSchemaSpec")}},
        "grammar": {"properties": {"grammar": {"type": "string", "minLength": 1}}},
    }
    fmt["allOf"] = [
        {"if": {"properties": {"type": {"const": kind}}}, "then": {**then, "required": [kind]}}
        for kind, then in needs.items()
    ]
    return fmt


def _model_spec(base: Json) -> Json:
    """The spec's schema with the rules its validator checks: which provider needs which field.
    One rule relates two values and no JSON Schema can state it: an in-process ``llama_cpp``
    model's ``concurrency`` and ``gpu_slots``, when given, equal its ``parallel`` (said in their
    descriptions; a spec that breaks it is a 422)."""
    spec = copy.deepcopy(base)
    props = spec["properties"]
    props["base_url"] = _nullable({"type": "string", "maxLength": 2048, "pattern": "^https?://"})
    props["overridable"]["uniqueItems"] = True
    follows = "llama_cpp: unset, or equal to parallel"
    for name in ("concurrency", "gpu_slots"):
        props[name]["description"] = f"{props[name].get('description', '')} ({follows})".strip()
    spec["allOf"] = [
        _when({"enum": _REMOTE}, {"properties": {"model_id": _STR}, "required": ["model_id"]}),
        _when({"const": "openai_compatible"},
              {"properties": {"base_url": {"type": "string", "minLength": 1}},
               "required": ["base_url"]}),
        _when({"const": "llama_cpp"}, {"properties": {"path": _STR}, "required": ["path"]}),
        _when({"not": {"const": "llama_cpp"}},
              {"properties": {"path": _NULL, "parallel": {"const": 1}}}),
        _when({"not": {"const": "openai_compatible"}},
              {"properties": {"structured_output": _NULL}}),
        _when({"enum": ["openai", "anthropic"]}, {"properties": {"gpu_slots": _NULL}}),
    ]  # fmt: skip
    return spec


def _dataclass_schema(tp: type[object]) -> _Json:
    schema: _Json = TypeAdapter(tp).json_schema(ref_template=SCHEMA_REF)
    schema["additionalProperties"] = False  # served through dataclasses.asdict: these fields only
    return schema


def schemas(pools: Sequence[str], partitions: Sequence[str]) -> dict[str, _Json]:
    """Every schema of the document but the console API's own (see .console_schemas);
    a submission may name ``pools`` and ``partitions``."""
    _, defs = models_json_schema(
        [(StatusRecord, "serialization"), (TaskResult, "serialization"),
         (TaskEvent, "validation"), (ModelSpec, "validation"),
         (DeadLetter, "serialization"), (AttemptRecord, "serialization")],
        ref_template=SCHEMA_REF,
    )  # fmt: skip
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
        "properties": {"partitions": {"type": "array", "items": ref("QueuePartition")}},
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
    out["TaskEvent"] = _task_event(out["TaskEvent"], pools, partitions)
    out["ResponseFormat"] = _response_format(out["ResponseFormat"])
    out["ModelSpec"] = _model_spec(out["ModelSpec"])
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
            "devices": {"type": "array", "items": ref("DeviceMemory")},
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
                        "holders": {"type": "array", "items": ref("SemaphoreHolder")},
                        "waiters": {"type": "array", "items": ref("SemaphoreWaiter")},
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
