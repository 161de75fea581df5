"""Preparing a FastStream-enveloped task entry: it runs like a plain one, and a bad envelope is
refused with a message that names the shapes sop-llm reads.

Pure functions over an :class:`Entry`: no Redis needed (tests/e2e/test_faststream.py drives the
same paths through a real worker).
"""

from __future__ import annotations

import json

import pytest

from sop_llm.handlers.tasks.prepare import Prepared, prepare
from sop_llm.schemas.errors import ErrorCode
from sop_llm.streams.entries import Entry
from sop_llm.streams.envelopes import FIELD_ENVELOPE, MAGIC, SHAPES, encode_envelope
from sop_llm.streams.keys import Keys

KEYS = Keys("sop")
STREAM = KEYS.tasks("default", "normal")
ENTRY_ID = "1767225600000-3"
DERIVED = f"default.normal.{ENTRY_ID}"
TASK = {"task_id": "fs-1", "model": "echo", "prompt": "hello"}


def prepared(fields: dict[str, bytes]) -> Prepared:
    return prepare(
        Entry(STREAM, ENTRY_ID, fields), keys=KEYS, max_prompt_bytes=1 << 20,
        max_metadata_bytes=16 << 10,
    )  # fmt: skip


def enveloped(body: bytes, **headers: str) -> dict[str, bytes]:
    return {FIELD_ENVELOPE: encode_envelope(body, {"correlation_id": "c-1", **headers})}


def test_an_envelope_runs_under_the_task_id_it_carries() -> None:
    p = prepared(enveloped(json.dumps(TASK).encode()))
    assert p.error_code is None and p.event is not None
    assert (p.task_id, p.event.prompt) == ("fs-1", "hello")


def test_an_envelope_without_a_task_id_gets_the_derived_id() -> None:
    p = prepared(enveloped(json.dumps({"model": "echo", "prompt": "x"}).encode()))
    assert p.error_code is None and p.task_id == DERIVED


def test_the_json_envelope_runs_too() -> None:
    raw = json.dumps({"data": json.dumps(TASK), "headers": {"correlation_id": "c-1"}})
    p = prepared({FIELD_ENVELOPE: raw.encode()})
    assert p.error_code is None and p.task_id == "fs-1"


def test_a_type_header_must_name_a_submission() -> None:
    p = prepared(enveloped(json.dumps(TASK).encode(), type="task.cancel"))
    assert p.error_code == ErrorCode.INVALID_EVENT and p.task_id == "fs-1"
    assert p.error == "type: expected 'task.submitted', got 'task.cancel'"
    ok = prepared(enveloped(json.dumps(TASK).encode(), type="task.submitted"))
    assert ok.error_code is None


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        pytest.param(b"hello", "not a FastStream envelope", id="unknown"),
        pytest.param(MAGIC + b"\x00\x01\x00\x00", "truncated FastStream binary envelope",
                     id="truncated"),
        pytest.param(encode_envelope(json.dumps(TASK).encode(), {"k": "v"})[:24],
                     "truncated FastStream binary envelope", id="truncated in a header"),
        pytest.param(json.dumps(TASK).encode(), "JSON envelope without a string 'data' member",
                     id="bare task JSON"),
    ],
)  # fmt: skip
def test_an_unreadable_envelope_is_refused_under_the_derived_id(raw: bytes, problem: str) -> None:
    p = prepared({FIELD_ENVELOPE: raw})
    assert p.error_code == ErrorCode.INVALID_EVENT and p.event is None
    # no payload could be read, so no task id either: never another task's
    assert p.task_id == DERIVED
    assert p.error.startswith(f"{FIELD_ENVELOPE}: {problem}")
    assert p.error.endswith(f"; expected {SHAPES}")


@pytest.mark.parametrize(
    ("body", "task_id"),
    [
        pytest.param(b"not json", DERIVED, id="not JSON"),
        pytest.param(b'["a list"]', DERIVED, id="a list"),
        pytest.param(b'{"task_id":"cut-1","model":"echo","pro', "cut-1", id="cut short"),
    ],
)
def test_a_body_that_is_no_json_object_is_refused(body: bytes, task_id: str) -> None:
    p = prepared(enveloped(body))
    assert p.error_code == ErrorCode.INVALID_EVENT and p.task_id == task_id
    assert p.error.startswith(
        f"{FIELD_ENVELOPE}: the FastStream message body is not a JSON object (publish the task "
        "as a dict or a pydantic model): event: "
    ), p.error


def test_a_body_with_a_bad_field_says_which() -> None:
    p = prepared(enveloped(json.dumps({**TASK, "temperature": 3}).encode()))
    assert p.error_code == ErrorCode.INVALID_EVENT and p.task_id == "fs-1"
    assert p.error == "temperature: Input should be less than or equal to 2"


def test_an_entry_of_no_known_shape_names_the_shapes_read() -> None:
    p = prepared({"payload": b"x", "kind": b"y"})
    assert p.error_code == ErrorCode.INVALID_EVENT and p.task_id == DERIVED
    assert p.error == (
        "entry: no 'type' and 'data' fields and no FastStream '__data__' envelope (fields: "
        f"['kind', 'payload']); expected type=task.submitted with data=<task JSON>, or {SHAPES}"
    )
