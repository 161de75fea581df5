"""Turning a raw stream entry into a runnable task, or a clear reason why it cannot run."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Final

from pydantic import ValidationError

from sop_llm.handlers.tasks.config import WorkerConfig
from sop_llm.providers.base import GenerationRequest
from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.task import (
    TASK_ID_PATTERN,
    TaskEvent,
    describe_validation_error,
    parse_task_event,
)
from sop_llm.schemas.wire import EventType
from sop_llm.streams.entries import Entry
from sop_llm.streams.envelopes import FIELD_ENVELOPE, SHAPES
from sop_llm.streams.errors import describe
from sop_llm.streams.keys import Keys
from sop_llm.streams.urlguard import AllowList, WebhookURLRefusedError, check_webhook_url

log = logging.getLogger(__name__)

_TASK_ID_RE = re.compile(TASK_ID_PATTERN)
# a malformed payload's tokens: a whole string, the text between strings, or an unterminated
# string's opening quote (possessive: no backtracking on hostile input)
_TOKEN = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"|[^"]++|"', re.DOTALL)
_COLON = re.compile(r"\s*:\s*")
_BODY_NOT_OBJECT: Final = (
    "the FastStream message body is not a JSON object (publish the task as a dict or a "
    "pydantic model)"
)
SCAN_STRINGS: Final = 50_000
"""How many strings of a payload that is not valid JSON are scanned for its ``task_id``: the
scan is plain Python, and one hostile entry must not hold the worker for long."""


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
    webhook_allow: AllowList | None = None,
) -> Prepared:
    """Validate an entry. Never raises: a bad entry comes back with ``error_code`` set and the
    best task id available (its own ``task_id`` when readable, see :func:`readable_task_id`,
    else the documented derived id).

    With ``webhook_allow`` (the parsed ``SOP_WEBHOOK_ALLOW``), a ``webhook_url`` that is unsafe
    on its face is refused here, as the SDK refuses it at submission (no name is resolved: that
    stays with the delivery); ``None`` leaves the URL to the delivery's guard alone."""

    def derived() -> str:
        pool, partition = keys.parse_tasks_stream(entry.stream)
        return keys.derived_task_id(pool, partition, entry.entry_id)

    def bad(message: str, task_id: str | None = None) -> Prepared:
        return Prepared(entry, task_id or derived(), None, ErrorCode.INVALID_EVENT, message)

    data = entry.data
    type_ = entry.type
    if entry.enveloped:
        # a FastStream publish: its body is the task, its headers the trace context; an
        # envelope that cannot be read has no payload to take a task id from
        problem = entry.envelope_error
        if problem is not None:
            return bad(f"{FIELD_ENVELOPE}: {problem}")
        # FastStream names no event type: on a task stream, an envelope is a submission
        type_ = type_ or EventType.TASK_SUBMITTED.value
    elif type_ is None and data is None:
        return bad(_unknown_shape(entry))
    if type_ != EventType.TASK_SUBMITTED.value:
        found = None if data is None else readable_task_id(data)
        return bad(f"type: expected {EventType.TASK_SUBMITTED.value!r}, got {type_!r}", found)
    if data is None:
        return bad("data: field missing from the entry")
    try:
        event = parse_task_event(
            data, max_prompt_bytes=max_prompt_bytes, max_metadata_bytes=max_metadata_bytes
        )
    except ValidationError as exc:
        message = describe_validation_error(exc)
        if entry.enveloped and _not_an_object(exc):
            message = f"{FIELD_ENVELOPE}: {_BODY_NOT_OBJECT}: {message}"
        return bad(message, readable_task_id(data))
    if webhook_allow is not None and event.webhook_url is not None:
        try:
            check_webhook_url(event.webhook_url, webhook_allow)
        except WebhookURLRefusedError as exc:
            return bad(f"webhook_url: {exc}", event.task_id)
    # the stream decides the priority: a plain-XADD producer's `priority` field is informational
    return Prepared(entry, event.task_id or derived(), event)


def _unknown_shape(entry: Entry) -> str:
    names = [name[:64] for name in sorted(entry.fields)[:8]]
    return (
        f"entry: no 'type' and 'data' fields and no FastStream '{FIELD_ENVELOPE}' envelope "
        f"(fields: {names}); expected type=task.submitted with data=<task JSON>, or {SHAPES}"
    )


def _not_an_object(exc: ValidationError) -> bool:
    """The payload is no JSON object at all (not JSON, or JSON of another type)."""
    return any(
        err["type"] in ("json_invalid", "model_type") and not err["loc"] for err in exc.errors()
    )


def generation_request(event: TaskEvent) -> GenerationRequest:
    """What the provider is asked for this task."""
    return GenerationRequest(
        model=event.model, prompt=event.prompt, messages=event.messages,
        temperature=event.temperature, top_p=event.top_p, max_tokens=event.max_tokens,
        stop=tuple(event.stop or ()), seed=event.seed, response_format=event.response_format,
    )  # fmt: skip


def readable_task_id(data: bytes) -> str | None:
    """The ``task_id`` of a payload that cannot run, when one is readable; never raises.

    Readable means: ``data`` (decoded as UTF-8, invalid bytes replaced) is a JSON object, or
    starts like one, with a top-level ``task_id`` member whose value is a string matching
    ``TASK_ID_PATTERN``, whatever else is wrong. Of several ``task_id`` members the last
    well-formed one counts (a JSON parser keeps the last). Valid JSON is parsed; JSON that is
    not (a syntax error, nesting deeper than the parser goes) is scanned token by token,
    without recursion, for its first :data:`SCAN_STRINGS` strings.
    """
    text = data.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, dict):
        found = obj.get("task_id")
        if isinstance(found, str) and _TASK_ID_RE.fullmatch(found):
            return found
    # not JSON, or its last task_id is no id: an earlier one may be
    return _scan_task_id(text)


def _scan_task_id(text: str) -> str | None:
    """The last well-formed top-level ``task_id`` of a possibly malformed JSON object.

    Nesting is a count of the brackets outside strings, so any depth costs no stack; a
    top-level member is a key at depth 1 right after ``{`` or ``,``, then ``:``, then a string.
    """
    body = text.lstrip(" \t\r\n\ufeff")
    if not body.startswith("{"):
        return None
    found = None
    depth = 0
    strings = 0
    key_next = False  # the next string would start a top-level member
    after_key = False  # the last string was a top-level "task_id" key
    value_next = False  # ...and a colon followed it
    for match in _TOKEN.finditer(body):
        token = match.group()
        if token[0] != '"':
            value_next = after_key and _COLON.fullmatch(token) is not None
            after_key = False
            depth += token.count("{") + token.count("[") - token.count("}") - token.count("]")
            key_next = depth == 1 and token.rstrip().endswith(("{", ","))
            continue
        if len(token) == 1:
            break  # an unterminated string runs to the end: nothing after it is readable
        strings += 1
        if strings > SCAN_STRINGS:
            break
        if value_next:
            value = _json_string(token, limit=1024)
            if value is not None and _TASK_ID_RE.fullmatch(value):
                found = value
        after_key = key_next and (
            token == '"task_id"' or ("\\" in token and _json_string(token, 64) == "task_id")
        )
        key_next = value_next = False
    return found


def _json_string(token: str, limit: int) -> str | None:
    """A JSON string token's value (escapes decoded), or ``None`` if malformed or too long."""
    if len(token) > limit:
        return None
    try:
        value = json.loads(token)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def prepare_entry(entry: Entry, *, keys: Keys, config: WorkerConfig) -> Prepared:
    """The entry validated, or refused with a clear reason; never raises, so that one entry
    cannot fail the others of its read."""
    if entry.oversize:
        message = f"entry: {entry.oversize} bytes, over the limit of {config.max_entry_bytes}"
        return _refused(entry, keys, ErrorCode.INVALID_EVENT, message)
    if entry.deliveries > config.max_attempts:
        # delivered again and again without reaching its start: maybe reading it is what ends
        # the worker, so it is not read again
        message = (
            f"delivered {entry.deliveries} times without starting, over the limit of "
            f"{config.max_attempts}"
        )
        return _refused(entry, keys, ErrorCode.MAX_ATTEMPTS, message)
    try:
        return prepare(
            entry, keys=keys,
            max_prompt_bytes=config.max_prompt_bytes,
            max_metadata_bytes=config.max_metadata_bytes, webhook_allow=config.webhook_allow,
        )  # fmt: skip
    except Exception as exc:
        log.exception("an entry could not be read")
        return _refused(entry, keys, ErrorCode.INTERNAL, f"entry unreadable: {describe(exc)}")


def _refused(entry: Entry, keys: Keys, code: ErrorCode, message: str) -> Prepared:
    # an oversized entry came as a stub: its id is the one found near its start; any other is
    # read by the bounded scan, which never raises
    task_id = entry.task_id_hint() if entry.oversize else readable_task_id(entry.data or b"")
    if task_id is None:
        pool, partition = keys.parse_tasks_stream(entry.stream)
        task_id = keys.derived_task_id(pool, partition, entry.entry_id)
    return Prepared(entry, task_id, None, code, message)
