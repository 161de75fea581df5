"""Turning a raw stream entry into a runnable task, or a clear reason why it cannot run."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pydantic import ValidationError

from providers.base import GenerationRequest
from schemas.errors import ErrorCode
from schemas.task import TASK_ID_PATTERN, TaskEvent, describe_validation_error, parse_task_event
from schemas.wire import EventType
from streams.entries import Entry
from streams.keys import Keys

_TASK_ID_RE = re.compile(TASK_ID_PATTERN)


@dataclass(slots=True)
class Prepared:
    entry: Entry
    task_id: str
    event: TaskEvent | None
    error_code: ErrorCode | None = None
    error: str = ""

    @property
    def model(self) -> str:
        return self.event.model if self.event else ""

    def deadline_ms(self) -> int | None:
        """Absolute deadline in ms since the epoch, from ``deadline`` or ``timeout_s``."""
        if self.event is None:
            return None
        ends = []
        if self.event.deadline is not None:
            ends.append(int(self.event.deadline.timestamp() * 1000))
        if self.event.timeout_s is not None:
            ends.append(self.entry.timestamp_ms + int(self.event.timeout_s * 1000))
        return min(ends) if ends else None


def prepare(
    entry: Entry,
    *,
    keys: Keys,
    max_prompt_bytes: int,
    max_metadata_bytes: int,
) -> Prepared:
    """Validate an entry. Never raises: a bad entry comes back with ``error_code`` set and the
    best task id available (its own ``task_id`` when readable, else the documented derived id)."""

    def derived() -> str:
        pool, partition = keys.parse_tasks_stream(entry.stream)
        return keys.derived_task_id(pool, partition, entry.entry_id)

    def bad(message: str, task_id: str | None = None) -> Prepared:
        return Prepared(entry, task_id or derived(), None, ErrorCode.INVALID_EVENT, message)

    if entry.type != EventType.TASK_SUBMITTED.value:
        return bad(f"type: expected {EventType.TASK_SUBMITTED.value!r}, got {entry.type!r}")
    data = entry.data
    if data is None:
        return bad("data: field missing from the entry")
    try:
        event = parse_task_event(
            data, max_prompt_bytes=max_prompt_bytes, max_metadata_bytes=max_metadata_bytes
        )
    except ValidationError as exc:
        return bad(describe_validation_error(exc), _salvage_task_id(data))
    # the stream decides the priority: a plain-XADD producer's `priority` field is informational
    return Prepared(entry, event.task_id or derived(), event)


def generation_request(event: TaskEvent) -> GenerationRequest:
    """What the provider is asked for this task."""
    return GenerationRequest(
        model=event.model, prompt=event.prompt, messages=event.messages,
        temperature=event.temperature, top_p=event.top_p, max_tokens=event.max_tokens,
        stop=tuple(event.stop or ()), seed=event.seed, response_format=event.response_format,
    )  # fmt: skip


def _salvage_task_id(data: bytes) -> str | None:
    """The ``task_id`` of an event that failed validation, if it is readable and well-formed."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    task_id = obj.get("task_id") if isinstance(obj, dict) else None
    if isinstance(task_id, str) and _TASK_ID_RE.match(task_id):
        return task_id
    return None
