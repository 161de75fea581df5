from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas.task import TaskEvent, describe_validation_error, parse_task_event


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
