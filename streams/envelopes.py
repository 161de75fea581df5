"""FastStream's message envelope on sop-llm's streams: read on the task streams, written for a
FastStream subscriber of the result streams.

FastStream (0.7) publishes to a stream as one field, ``__data__``, holding its envelope: the
message body plus headers (``correlation_id``, ``content-type``, ``reply_to``, and whatever the
app adds, such as ``traceparent``). Two envelopes exist, and FastStream reads both:

* binary format v1, what ``broker.publish`` writes by default; integers big-endian::

      8 bytes    magic b"\\x89BIN\\r\\n\\x1a\\n"
      u16        version, 1
      u32        offset of the header block (18)
      u32        offset of the body
      u16        at the header block: the number of headers
      ...        per header: u16 length + UTF-8 key, u16 length + UTF-8 value
      ...        from the body offset to the end: the body (JSON for a dict or a pydantic model)

* the older JSON envelope, ``{"data": "<body>", "headers": {"<key>": "<value>", ...}}``.

A task entry in either envelope runs like a plain ``type``/``data`` entry (see
:class:`streams.entries.Entry`); one in anything else fails with :class:`EnvelopeError`, whose
message names what was expected. The other way, :func:`results_parser` is a FastStream parser
that hands a ``StreamSub`` subscriber of ``results`` (or ``results:<reply_to>``) each entry as a
binary envelope, so that plain and batch subscribers see one shape: the result JSON as the body,
``type``, ``traceparent`` and ``correlation_id`` as headers.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from sop_llm.schemas.errors import InvalidTaskError
from sop_llm.schemas.wire import FIELD_DATA, FIELD_TRACEPARENT, FIELD_TRACESTATE, FIELD_TYPE

FIELD_ENVELOPE: Final = "__data__"
"""The one field of a FastStream stream entry."""
FIELD_CORRELATION_ID: Final = "correlation_id"
"""FastStream's correlation header; also the result entries' field that carries it back."""
MAX_CORRELATION_ID: Final = 256
"""A longer correlation id is not carried (never cut: a cut id would match nothing)."""

MAGIC: Final = b"\x89BIN\r\n\x1a\n"
VERSION: Final = 1
_HEAD = struct.Struct(">HII")  # version, header block offset, body offset (after the magic)
_U16 = struct.Struct(">H")
_MAX_STRING: Final = 0xFFFF  # a header key or value: u16 length
_FIXED: Final = len(MAGIC) + _HEAD.size  # 18: where FastStream puts the header block
_CONTENT_TYPE: Final = "content-type"
_JSON: Final = "application/json"

SHAPES: Final = (
    "FastStream's binary envelope v1 (magic b'\\x89BIN\\r\\n\\x1a\\n', version 1: "
    "what broker.publish writes) or its JSON envelope "
    '{"data": "<task JSON>", "headers": {...}}'
)


class EnvelopeError(InvalidTaskError):
    """``__data__`` holds no envelope sop-llm reads; the message says what is wrong and what was
    expected."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded FastStream envelope: the body as sent, and the string headers."""

    body: bytes
    headers: Mapping[str, str]


def decode_envelope(raw: bytes) -> Envelope:
    """Decode a ``__data__`` value. Raises :class:`EnvelopeError` for anything but a complete
    binary envelope v1 or a JSON envelope whose ``data`` is a string (headers that are not
    strings, or not valid Unicode, are left out). Never reads past ``raw``; the body itself is
    not checked."""
    if raw.startswith(MAGIC):
        return _decode_binary(raw)
    if raw.lstrip(b" \t\r\n").startswith(b"{"):
        return _decode_json(raw)
    raise _bad("not a FastStream envelope")


def _decode_binary(raw: bytes) -> Envelope:
    size = len(raw)
    if size < _FIXED:
        raise _truncated(f"{size} bytes, shorter than its {_FIXED}-byte preamble")
    version, headers_at, body_at = _HEAD.unpack_from(raw, len(MAGIC))
    if version != VERSION:
        raise _bad(f"FastStream binary envelope version {version} is not read")
    if not _FIXED <= headers_at <= size - _U16.size:
        raise _truncated(f"its header block at byte {headers_at} is outside its {size} bytes")
    (count,) = _U16.unpack_from(raw, headers_at)
    pos = headers_at + _U16.size
    headers: dict[str, str] = {}
    for n in range(count):
        pair = []
        for part in ("key", "value"):
            if pos + _U16.size > size:
                raise _truncated(f"header {n + 1} of {count} ends past its {size} bytes")
            (length,) = _U16.unpack_from(raw, pos)
            pos += _U16.size
            if pos + length > size:
                raise _truncated(f"header {n + 1} of {count} ends past its {size} bytes")
            try:
                pair.append(raw[pos : pos + length].decode())
            except UnicodeDecodeError:
                raise _bad(
                    f"the {part} of header {n + 1} of the binary envelope is not UTF-8"
                ) from None
            pos += length
        headers[pair[0]] = pair[1]
    if not pos <= body_at <= size:
        raise _truncated(f"its body offset {body_at} is outside bytes {pos}..{size}")
    return Envelope(raw[body_at:], headers)


def _truncated(why: str) -> EnvelopeError:
    return _bad(f"truncated FastStream binary envelope: {why}")


def _bad(what: str) -> EnvelopeError:
    return EnvelopeError(f"{what}; expected {SHAPES}")


def _decode_json(raw: bytes) -> Envelope:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"JSON envelope that is not valid JSON ({exc})") from None
    data = doc.get(FIELD_DATA) if isinstance(doc, dict) else None
    if not isinstance(data, str):
        raise _bad("JSON envelope without a string 'data' member")
    found = doc.get("headers")
    if found is not None and not isinstance(found, dict):
        raise _bad("JSON envelope whose 'headers' is not an object")
    try:
        body = data.encode()
    except UnicodeEncodeError:  # a lone surrogate escaped in JSON ("\ud800") has no UTF-8
        raise _bad("JSON envelope whose 'data' is not valid Unicode") from None
    headers = {
        k: v for k, v in (found or {}).items() if isinstance(v, str) and _utf8(k) and _utf8(v)
    }
    return Envelope(body, headers)


def _utf8(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def encode_envelope(body: bytes, headers: Mapping[str, str]) -> bytes:
    """``body`` and ``headers`` as FastStream's binary envelope v1 (what ``broker.publish``
    writes). Raises ``ValueError`` for a header key or value over 65,535 bytes."""
    block = bytearray(_U16.pack(len(headers)))
    for key, value in headers.items():
        for part in (key.encode(), value.encode()):
            if len(part) > _MAX_STRING:
                raise ValueError(f"a header of {len(part)} bytes; the format holds {_MAX_STRING}")
            block += _U16.pack(len(part))
            block += part
    head = _HEAD.pack(VERSION, _FIXED, _FIXED + len(block))
    return b"".join((MAGIC, head, block, body))


def correlation_id_of(value: str | None) -> str:
    """The correlation id to carry, or ``""``: absent, empty or over the limit."""
    if not value or len(value) > MAX_CORRELATION_ID:
        return ""
    return value


T = TypeVar("T")


async def results_parser(
    message: Mapping[str, object], original: Callable[[Mapping[str, object]], Awaitable[T]]
) -> T:
    """A FastStream parser for ``StreamSub`` subscribers of ``results`` or
    ``results:<reply_to>`` (``@broker.subscriber(stream=..., parser=results_parser)``), plain
    or ``batch=True``: each sop-llm entry reaches FastStream's own parser as a binary envelope
    whose body is the entry's ``data`` (the result JSON) and whose headers are
    ``content-type: application/json``, ``type``, ``traceparent``/``tracestate`` when the entry
    has them, and ``correlation_id``: the entry's own (the correlation id of the FastStream
    publish that submitted the task) or else the result's ``task_id``. A plain subscriber then
    gets one result per message, a batch subscriber a list of them (per-entry headers in
    ``msg.batch_headers``). Entries of any other shape are passed on unchanged."""
    data = message.get("data")
    if isinstance(data, list):
        converted: object = [_as_envelope(f) if isinstance(f, Mapping) else f for f in data]
    elif isinstance(data, Mapping):
        converted = _as_envelope(data)
    else:
        return await original(message)
    return await original({**message, "data": converted})


def _as_envelope(fields: Mapping[object, object]) -> Mapping[object, object]:
    named = {_text(k): v for k, v in fields.items()}
    body = named.get(FIELD_DATA)
    if FIELD_ENVELOPE in named or not isinstance(body, bytes | str):
        return fields
    body = body.encode() if isinstance(body, str) else body
    headers = {_CONTENT_TYPE: _JSON}
    for name in (FIELD_TYPE, FIELD_TRACEPARENT, FIELD_TRACESTATE):
        value = named.get(name)
        if isinstance(value, bytes | str):
            headers[name] = _text(value)
    found = named.get(FIELD_CORRELATION_ID)
    cid = correlation_id_of(_text(found) if isinstance(found, bytes | str) else None)
    headers[FIELD_CORRELATION_ID] = cid or _task_id(body)
    if not headers[FIELD_CORRELATION_ID]:
        del headers[FIELD_CORRELATION_ID]  # FastStream makes one up
    try:
        return {FIELD_ENVELOPE.encode(): encode_envelope(body, headers)}
    except ValueError:
        return fields


def _task_id(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    found = doc.get("task_id") if isinstance(doc, dict) else None
    return found if isinstance(found, str) else ""


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
