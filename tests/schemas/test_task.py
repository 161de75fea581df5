from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from sop_llm.schemas.task import (
    DEADLINE_MAX_MS,
    DEADLINE_MIN_MS,
    TaskEvent,
    describe_validation_error,
    parse_task_event,
)


def _error(data: str, **limits: int) -> str:
    with pytest.raises(ValidationError) as info:
        parse_task_event(data, **limits)
    return describe_validation_error(info.value)


def test_minimal_event_and_version() -> None:
    event = parse_task_event('{"model": "echo", "prompt": "hi"}')
    assert event.v == 1
    assert json.loads(event.to_wire()) == {"v": 1, "model": "echo", "prompt": "hi", "stream": False}


def test_temperature_zero_is_kept() -> None:
    event = parse_task_event('{"model": "echo", "prompt": "hi", "temperature": 0}')
    assert event.temperature == 0.0
    assert json.loads(event.to_wire())["temperature"] == 0.0


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ('{"prompt": "x"}', "model: Field required"),
        ('{"model": "echo", "prompt": "x", "colour": 1}', "colour: Extra inputs are not permitted"),
        ('{"model": "echo", "prompt": "x", "temperature": 2.5}', "temperature:"),
        ('{"model": "echo", "prompt": "x", "top_p": 0}', "top_p:"),
        ('{"model": "echo", "prompt": "x", "max_tokens": 0}', "max_tokens:"),
        ('{"model": "echo", "prompt": "x", "task_id": "has space"}', "task_id:"),
        ('{"model": "echo", "prompt": "x", "webhook_url": "ftp://x"}', "webhook_url:"),
        ('{"model": "echo", "prompt": "x", "deadline": "2030-01-01T00:00:00"}', "deadline:"),
        ('{"model": "echo"}', "exactly one of 'prompt' and 'messages'"),
        (
            '{"model": "echo", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}',
            "exactly one",
        ),
        ('{"model": "echo", "messages": [{"role": "robot", "content": "y"}]}', "messages.0.role"),
        ("not json", "Invalid JSON"),
    ],
)
def test_bad_events_name_the_field(data: str, named: str) -> None:
    assert named in _error(data)


def test_size_limits_come_from_the_caller() -> None:
    big = json.dumps({"model": "echo", "prompt": "x" * 100})
    assert "prompt is 100 bytes, over the limit of 99 bytes" in _error(big, max_prompt_bytes=99)
    parse_task_event(big, max_prompt_bytes=100)
    meta = json.dumps({"model": "echo", "prompt": "x", "metadata": {"k": "v" * 50}})
    assert "metadata is" in _error(meta, max_metadata_bytes=20)
    msgs = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "é" * 10}]})
    assert "messages is 20 bytes" in _error(msgs, max_prompt_bytes=10)


def test_stop_accepts_a_single_string() -> None:
    assert parse_task_event('{"model": "m", "prompt": "x", "stop": "END"}').stop == ["END"]


def test_payload_hash_ignores_identity_fields_only() -> None:
    a = TaskEvent(model="echo", prompt="hi", task_id="a", idempotency_key="k")
    b = TaskEvent(model="echo", prompt="hi", task_id="b")
    c = TaskEvent(model="echo", prompt="hi", temperature=0)
    assert a.payload_hash() == b.payload_hash()
    assert a.payload_hash() != c.payload_hash()


# item 7 of issue 24: the documented JSON type, never a coercion into it
@pytest.mark.parametrize(
    ("member", "named"),
    [
        ('"max_tokens": "5"', "max_tokens: Input should be a valid integer"),
        ('"max_tokens": 5.0', "max_tokens: Input should be a valid integer"),
        ('"seed": true', "seed: Input should be a valid integer"),
        ('"temperature": true', "temperature: Input should be a valid number"),
        ('"temperature": "0.5"', "temperature: Input should be a valid number"),
        ('"stream": "yes"', "stream: Input should be a valid boolean"),
        ('"stream": 1', "stream: Input should be a valid boolean"),
        ('"v": true', "v: must be the integer 1"),
        ('"temperature": NaN', "temperature: Input should be a finite number"),
        ('"timeout_s": Infinity', "timeout_s: Input should be a finite number"),
        ('"top_p": 1e400', "top_p: Input should be a finite number"),
        ('"metadata": {"a": {"b": [1, NaN]}}', "metadata: NaN and Infinity are not JSON numbers"),
        ('"metadata": {"big": 1e400}', "metadata: NaN and Infinity are not JSON numbers (at big)"),
        (
            '"response_format": {"type": "json_schema", "json_schema": '
            '{"schema": {"maximum": -Infinity}}}',
            "response_format.json_schema.schema: NaN and Infinity",
        ),
        (
            '"response_format": {"type": "json_schema", "json_schema": '
            '{"schema": {}, "strict": "true"}}',
            "response_format.json_schema.strict: Input should be a valid boolean",
        ),
        ('"deadline": 123', "deadline: 123 is not a time in milliseconds since the epoch"),
        ('"deadline": 1767225600', "deadline: 1767225600 is not a time in milliseconds"),
        ('"deadline": "123"', "deadline: must be an RFC 3339 time with a zone"),
        ('"deadline": 1767225600000.0', "deadline: must be an RFC 3339 time with a zone"),
        ('"deadline": true', "deadline: must be an RFC 3339 time with a zone"),
    ],
)
def test_wire_types_are_strict(member: str, named: str) -> None:
    assert named in _error(f'{{"model": "echo", "prompt": "x", {member}}}')


def test_deadline_is_rfc3339_or_milliseconds_within_the_window() -> None:
    def deadline(value: int | str) -> datetime | None:
        return parse_task_event(
            json.dumps({"model": "m", "prompt": "x", "deadline": value})
        ).deadline

    assert deadline("2030-01-01T00:00:00.5+01:00") == datetime(
        2029, 12, 31, 23, 0, 0, 500_000, tzinfo=UTC
    )
    assert deadline(1_767_225_600_123) == datetime(2026, 1, 1, 0, 0, 0, 123_000, tzinfo=UTC)
    assert deadline(DEADLINE_MIN_MS) == datetime(2000, 1, 1, tzinfo=UTC)
    assert deadline(DEADLINE_MAX_MS - 1) == datetime(2200, 1, 1, tzinfo=UTC) - timedelta(
        milliseconds=1
    )
    for outside in (DEADLINE_MIN_MS - 1, DEADLINE_MAX_MS, -1, 0):
        with pytest.raises(ValidationError, match="not a time in milliseconds"):
            deadline(outside)


def test_python_values_as_the_sdk_passes_them_still_validate() -> None:
    # the SDK, the CLI (`--event` JSON, then keywords) and replay validate plain Python values;
    # strict types must not refuse what they pass for a valid task
    event = TaskEvent.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
         "top_p": 1, "stop": "END", "deadline": "2030-01-01T00:00:00+01:00", "stream": True,
         "response_format": {"type": "json_schema", "json_schema": {"schema": {"max": 1.5}}},
         "metadata": {"n": 1, "f": 0.5, "ok": None}}
    )  # fmt: skip
    assert event.temperature == 0.0 and event.top_p == 1.0
    assert event.deadline == datetime(2029, 12, 31, 23, tzinfo=UTC)
    assert parse_task_event(event.to_wire()) == event  # what the SDK publishes parses back
    with pytest.raises(ValidationError, match="max_tokens"):
        TaskEvent.model_validate({"model": "m", "prompt": "x", "max_tokens": "5"})
    with pytest.raises(ValidationError, match="deadline"):
        TaskEvent.model_validate({"model": "m", "prompt": "x", "deadline": 123})


_INTEGERS = ("max_tokens", "max_attempts", "seed", "v")
_NUMBERS = ("temperature", "top_p", "timeout_s")
_BOOLEANS = ("stream",)

# a valid value of each number or boolean field, in a JSON type the table does not allow
_DISGUISED = st.one_of(
    st.tuples(
        st.sampled_from(_INTEGERS),
        st.sampled_from(["1", 1.0, True, [1]]),  # 1 is valid for each of them
    ),
    st.tuples(
        st.sampled_from(_NUMBERS),
        st.floats(0.01, 1.0).flatmap(lambda x: st.sampled_from([str(x), True, [x]])),
    ),
    st.tuples(st.sampled_from(_BOOLEANS), st.sampled_from(["true", "false", "yes", 1, 0])),
)


def _scalar_fields() -> set[str]:
    """The fields whose JSON type is an integer, a number or a boolean."""
    found = set()
    for name, prop in TaskEvent.model_json_schema()["properties"].items():
        types = {option.get("type") for option in prop.get("anyOf", [prop])}
        if types & {"integer", "number", "boolean"}:
            found.add(name)
    return found


@given(case=_DISGUISED)
def test_no_field_takes_a_value_of_another_json_type(case: tuple[str, object]) -> None:
    # a number or boolean field added later must join the strategy (and be declared strict)
    assert _scalar_fields() == {*_INTEGERS, *_NUMBERS, *_BOOLEANS}
    field, wrong = case
    named = _error(json.dumps({"model": "m", "prompt": "x", field: wrong}))
    assert named.startswith(f"{field}:")


json_values = st.recursive(
    st.one_of(st.floats(), st.integers(), st.text(max_size=4), st.booleans(), st.none()),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=12,
)


@given(metadata=st.dictionaries(st.text(max_size=4), json_values, max_size=4))
def test_nan_and_infinity_are_refused_anywhere_in_metadata(metadata: dict[str, object]) -> None:
    data = json.dumps({"model": "m", "prompt": "x", "metadata": metadata})  # writes NaN, Infinity
    if _has_non_finite(metadata):
        assert "metadata: NaN and Infinity are not JSON numbers" in _error(
            data, max_metadata_bytes=1 << 20
        )
    else:
        assert parse_task_event(data, max_metadata_bytes=1 << 20).metadata == metadata


def _has_non_finite(value: object) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_non_finite(v) for v in value)
    return False
