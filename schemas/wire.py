"""Wire-format constants shared by every producer and consumer.

An entry on any sop-llm stream is a flat Redis hash of UTF-8 strings:

* ``type``: the event type (one of :class:`EventType`),
* ``data``: the JSON payload of the versioned schema (it carries ``"v": 1``),
* ``traceparent`` / ``tracestate`` (optional): W3C trace context.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from pydantic import BaseModel, ConfigDict

WIRE_VERSION: Final = 1

FIELD_TYPE: Final = "type"
FIELD_DATA: Final = "data"
FIELD_TRACEPARENT: Final = "traceparent"
FIELD_TRACESTATE: Final = "tracestate"


class EventType(StrEnum):
    """The ``type`` field of a stream entry."""

    TASK_SUBMITTED = "task.submitted"
    TASK_COMPLETED = "task.completed"
    TASK_FAILED = "task.failed"
    TASK_CANCELLED = "task.cancelled"
    TASK_EXPIRED = "task.expired"
    TASK_DEAD = "task.dead"
    WEBHOOK_DELIVERY = "webhook.delivery"
    TASK_CANCEL = "task.cancel"


class StrictModel(BaseModel):
    """Base of every wire model: unknown fields are refused, and a parsed value never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
