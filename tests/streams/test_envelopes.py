"""FastStream envelopes: what FastStream writes is read, what we write FastStream reads, and
every malformed envelope is refused with a message naming the shapes read."""

from __future__ import annotations

import contextlib
import json
import re
import struct
from collections.abc import Mapping

import pytest
from faststream.redis.parser import BinaryMessageFormatV1
from hypothesis import given
from hypothesis import strategies as st

from sop_llm.schemas.errors import ErrorCode, InvalidTaskError
from sop_llm.streams.entries import Entry
from sop_llm.streams.envelopes import (
    FIELD_ENVELOPE,
    MAGIC,
    MAX_CORRELATION_ID,
    SHAPES,
    EnvelopeError,
    decode_envelope,
    encode_envelope,
    results_parser,
)

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TASK = {"task_id": "fs-1", "model": "echo", "prompt": "hi"}


async def faststream_envelope(body: object, headers: dict[str, str] | None = None) -> bytes:
    """What ``broker.publish(body, headers=..., correlation_id="cid-1")`` puts in ``__data__``."""
    return await BinaryMessageFormatV1.encode(
        message=body,
        reply_to=None,
        headers=headers,
        correlation_id="cid-1",
    )


async def test_reads_what_faststream_publishes() -> None:
    raw = await faststream_envelope(TASK, {"traceparent": TP})
    found = decode_envelope(raw)
    assert json.loads(found.body) == TASK
    assert found.headers == {
        "correlation_id": "cid-1",
        "content-type": "application/json",
        "traceparent": TP,
    }


def test_reads_the_json_envelope() -> None:
    headers = {"correlation_id": "c", "n": 5, "traceparent": "\ud800", "\udc00": "x"}
    raw = json.dumps({"data": json.dumps(TASK), "headers": headers})
    found = decode_envelope(raw.encode())
    assert json.loads(found.body) == TASK
    # a header that is no string, or no valid Unicode, is left out
    assert found.headers == {"correlation_id": "c"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"type": "task.completed", "traceparent": TP}, {"é": "ü" * 300, "": ""}],
)
def test_faststream_reads_what_we_write(headers: dict[str, str]) -> None:
    body = json.dumps(TASK).encode()
    raw = encode_envelope(body, headers)
    assert BinaryMessageFormatV1.parse(raw) == (body, headers)
    assert decode_envelope(raw).body == body
    assert dict(decode_envelope(raw).headers) == headers


def test_a_header_over_the_format_limit_cannot_be_written() -> None:
    with pytest.raises(ValueError, match="the format holds 65535"):
        encode_envelope(b"{}", {"k": "x" * 65_536})


async def test_every_cut_before_the_body_is_refused_as_truncated() -> None:
    raw = await faststream_envelope(TASK, {"traceparent": TP})
    body_at = struct.unpack_from(">I", raw, 14)[0]
    for n in range(body_at):
        with pytest.raises(EnvelopeError) as caught:
            decode_envelope(raw[:n])
        message = str(caught.value)
        assert message.endswith(f"; expected {SHAPES}"), (n, message)
        if n < len(MAGIC):  # not even the magic: no envelope at all
            assert message.startswith("not a FastStream envelope"), (n, message)
            continue
        assert message.startswith("truncated FastStream binary envelope: "), (n, message)
        if n < 18:
            assert "shorter than its 18-byte preamble" in message, (n, message)
        elif n < 20:
            assert "its header block at byte 18 is outside" in message, (n, message)
        else:  # inside the header block: the header that runs past the end is named
            assert re.search(rf"header [1-3] of 3 ends past its {n} bytes", message), (n, message)


async def test_a_cut_in_the_body_leaves_the_body_to_its_reader() -> None:
    """The format has no body length: a cut body decodes, and fails as JSON later."""
    raw = await faststream_envelope(TASK)
    assert decode_envelope(raw[:-3]).body == decode_envelope(raw).body[:-3]


def _binary(version: int = 1, headers_at: int = 18, body_at: int = 20, rest: bytes = b"") -> bytes:
    return MAGIC + struct.pack(">HII", version, headers_at, body_at) + rest


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "not a FastStream envelope"),
        (b"hello", "not a FastStream envelope"),
        (b"\x89BIN\r\n\x1a", "not a FastStream envelope"),
        (_binary(version=2, rest=b"\x00\x00{}"), "version 2 is not read"),
        (_binary(headers_at=4, rest=b"\x00\x00{}"), "header block at byte 4 is outside"),
        (_binary(headers_at=99, rest=b"\x00\x00{}"), "header block at byte 99 is outside"),
        (_binary(body_at=19, rest=b"\x00\x00{}"), "body offset 19 is outside bytes 20..22"),
        (_binary(body_at=23, rest=b"\x00\x00{}"), "body offset 23 is outside bytes 20..22"),
        (_binary(rest=b"\x00\x01\x00\x01\xff\x00\x00{}"), "the key of header 1 "),
        (_binary(rest=b"\x00\x01\x00\x01k\x00\x01\xfe{}"), "the value of header 1 "),
        (_binary(rest=b"\x00\x02\x00\x01k\x00\x01v"), "header 2 of 2 ends past its"),
        (b"{nope", "JSON envelope that is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not a FastStream envelope"),
        (b"{" + b'"a":{' * 100_000, "JSON envelope that is not valid JSON"),
        (json.dumps(TASK).encode(), "JSON envelope without a string 'data' member"),
        (b'{"data": {"task_id": "x"}}', "JSON envelope without a string 'data' member"),
        (b'{"data": "{}", "headers": []}', "JSON envelope whose 'headers' is not an object"),
        (b'{"data": "{\\"a\\": \\"\\ud800\\"}"}', "'data' is not valid Unicode"),
    ],
)
def test_malformed_envelopes_are_refused_naming_the_shapes_read(raw: bytes, problem: str) -> None:
    with pytest.raises(EnvelopeError) as caught:
        decode_envelope(raw)
    assert problem in str(caught.value)
    assert str(caught.value).endswith(f"; expected {SHAPES}")
    assert isinstance(caught.value, InvalidTaskError)
    assert caught.value.code == ErrorCode.INVALID_EVENT


@given(st.binary(max_size=64))
def test_decoding_raises_nothing_but_envelope_errors(tail: bytes) -> None:
    for raw in (tail, MAGIC + tail, _binary() + tail, b"{" + tail):
        with contextlib.suppress(EnvelopeError):
            decode_envelope(raw)


# -- Entry: an envelope reads like a plain entry ---------------------------------------------


async def test_an_enveloped_entry_reads_like_a_plain_one() -> None:
    raw = await faststream_envelope(TASK, {"traceparent": TP, "tracestate": "k=v"})
    entry = Entry("s", "1-0", {FIELD_ENVELOPE: raw})
    assert entry.enveloped and entry.envelope_error is None
    assert entry.type is None  # FastStream names no event type: the reader decides
    assert entry.data is not None and json.loads(entry.data) == TASK
    assert (entry.traceparent, entry.tracestate) == (TP, "k=v")
    assert entry.correlation_id == "cid-1"
    assert entry.task_id_hint() == "fs-1"


def test_a_plain_entry_with_a_stray_envelope_field_stays_plain() -> None:
    entry = Entry("s", "1-0", {"type": b"task.submitted", FIELD_ENVELOPE: b"\x89BIN"})
    assert not entry.enveloped and entry.envelope_error is None
    assert entry.data is None and entry.correlation_id == ""


def test_an_unreadable_envelope_says_why() -> None:
    entry = Entry("s", "1-0", {FIELD_ENVELOPE: MAGIC + b"\x00"})
    assert entry.enveloped and entry.data is None and entry.type is None
    assert entry.envelope_error is not None and entry.envelope_error.startswith("truncated")
    assert entry.traceparent == "" and entry.correlation_id == ""


def test_a_correlation_id_over_the_limit_is_not_carried() -> None:
    for cid, carried in (("x" * MAX_CORRELATION_ID, True), ("x" * (MAX_CORRELATION_ID + 1), False)):
        raw = encode_envelope(b"{}", {"correlation_id": cid})
        assert Entry("s", "1-0", {FIELD_ENVELOPE: raw}).correlation_id == (cid if carried else "")


# -- results_parser: sop-llm's entries handed to FastStream's parser as envelopes -------------


async def _hand_over(message: Mapping[str, object]) -> Mapping[str, object]:
    return message


def _result(task_id: str) -> bytes:
    return json.dumps({"v": 1, "task_id": task_id, "state": "completed"}).encode()


async def test_the_parser_hands_a_plain_entry_over_as_an_envelope() -> None:
    fields = {b"type": b"task.completed", b"data": _result("a"), b"traceparent": TP.encode()}
    message = {"type": "stream", "channel": "x", "message_ids": [b"1-0"], "data": fields}
    out = await results_parser(message, _hand_over)
    assert {k: v for k, v in out.items() if k != "data"} == {
        k: v for k, v in message.items() if k != "data"
    }
    converted = out["data"]
    assert isinstance(converted, dict) and list(converted) == [b"__data__"]
    body, headers = BinaryMessageFormatV1.parse(converted[b"__data__"])
    assert body == _result("a")
    assert headers == {
        "content-type": "application/json",
        "type": "task.completed",
        "traceparent": TP,
        "correlation_id": "a",  # none on the entry: the task id
    }


async def test_the_parser_converts_each_entry_of_a_batch() -> None:
    batch = [
        {"type": "task.failed", "data": _result("a").decode(), "correlation_id": "order-1"},
        {b"__data__": b"left alone"},
        {b"type": b"task.completed", b"data": b"not json"},
    ]
    out = await results_parser({"data": batch}, _hand_over)
    converted = out["data"]
    assert isinstance(converted, list) and converted[1] == {b"__data__": b"left alone"}
    first = BinaryMessageFormatV1.parse(converted[0][b"__data__"])
    assert first == (_result("a"), {"content-type": "application/json", "type": "task.failed",
                                    "correlation_id": "order-1"})  # fmt: skip
    # no task id to fall back on: FastStream makes a correlation id up
    last = BinaryMessageFormatV1.parse(converted[2][b"__data__"])
    assert last == (b"not json", {"content-type": "application/json", "type": "task.completed"})


async def test_the_parser_leaves_other_messages_alone() -> None:
    message = {"type": "stream", "data": None}
    assert await results_parser(message, _hand_over) is message
