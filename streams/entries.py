"""Stream entries as read from Redis (raw bytes, decoded lazily).

An entry is either plain (``type``, ``data``, ``traceparent``, ``tracestate``, ``correlation_id``
fields) or a FastStream envelope: the one field ``__data__`` (no ``type``, no ``data``), whose
body is the entry's ``data`` and whose headers give its ``type`` (none: the reader decides),
``traceparent``, ``tracestate`` and ``correlation_id`` (see :mod:`streams.envelopes`). Every
reader sees the same properties either way; the raw fields stay as they came (dead letters).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

from sop_llm.schemas.wire import FIELD_DATA, FIELD_TRACEPARENT, FIELD_TRACESTATE, FIELD_TYPE
from sop_llm.streams.envelopes import (
    FIELD_CORRELATION_ID,
    FIELD_ENVELOPE,
    Envelope,
    EnvelopeError,
    correlation_id_of,
    decode_envelope,
)

FIELD_OVERSIZE = "__oversize"
FIELD_STUB_TASK_ID = "__task_id"
_TASK_ID_IN_DATA = re.compile(rb'"task_id"\s*:\s*"([A-Za-z0-9._:\-]+)"')


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(slots=True)
class Entry:
    """One stream entry. Field values stay bytes: producers may send anything."""

    stream: str
    entry_id: str
    fields: dict[str, bytes]
    deliveries: int = 1
    """How many times the group has delivered it (a new read is the first)."""
    _unwrapped: Envelope | str | None = field(default=None, init=False, repr=False, compare=False)
    """The decoded envelope, or why it could not be decoded (``None``: not decoded yet)."""

    @classmethod
    def from_reply(cls, stream: str, entry_id: bytes | str, raw: Any) -> Entry:
        fields: dict[str, bytes] = {}
        if raw:
            items = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
            for k, v in items:
                key = k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)
                fields[key] = v if isinstance(v, bytes) else str(v).encode()
        return cls(stream=stream, entry_id=text(entry_id), fields=fields)

    @property
    def enveloped(self) -> bool:
        """A FastStream envelope: ``__data__`` and neither ``type`` nor ``data``."""
        f = self.fields
        return FIELD_ENVELOPE in f and FIELD_TYPE not in f and FIELD_DATA not in f

    @property
    def envelope_error(self) -> str | None:
        """Why the envelope of an enveloped entry cannot be read (it names the shapes read);
        ``None`` for a readable envelope or a plain entry."""
        found = self._envelope()
        return found if isinstance(found, str) else None

    def _envelope(self) -> Envelope | str | None:
        if not self.enveloped:
            return None
        if self._unwrapped is None:
            try:
                self._unwrapped = decode_envelope(self.fields[FIELD_ENVELOPE])
            except EnvelopeError as exc:
                self._unwrapped = str(exc)
        return self._unwrapped

    def _header(self, name: str) -> str | None:
        found = self._envelope()
        return found.headers.get(name) if isinstance(found, Envelope) else None

    @property
    def type(self) -> str | None:
        raw = self.fields.get(FIELD_TYPE)
        if raw is None:
            return self._header(FIELD_TYPE)
        return raw.decode("utf-8", "replace")

    @property
    def data(self) -> bytes | None:
        raw = self.fields.get(FIELD_DATA)
        if raw is None:
            found = self._envelope()
            return found.body if isinstance(found, Envelope) else None
        return raw

    @property
    def traceparent(self) -> str:
        raw = self.fields.get(FIELD_TRACEPARENT)
        if raw is None:
            return (self._header(FIELD_TRACEPARENT) or "")[:128]
        return raw.decode("ascii", "replace")[:128] if raw else ""

    @property
    def tracestate(self) -> str:
        raw = self.fields.get(FIELD_TRACESTATE)
        if raw is None:
            return (self._header(FIELD_TRACESTATE) or "")[:512]
        return raw.decode("ascii", "replace")[:512] if raw else ""

    @property
    def correlation_id(self) -> str:
        """The ``correlation_id`` field, or a FastStream envelope's header of that name (a task
        entry's goes back on its result entries); ``""`` for none or one over
        :data:`streams.envelopes.MAX_CORRELATION_ID` characters."""
        raw = self.fields.get(FIELD_CORRELATION_ID)
        if raw is None:
            return correlation_id_of(self._header(FIELD_CORRELATION_ID))
        return correlation_id_of(raw.decode("utf-8", "replace"))

    @property
    def oversize(self) -> int:
        """The entry's size in bytes when it was over the limit and only a stub came back (its
        type, size and the ``task_id`` found near the start of its data); else 0."""
        raw = self.fields.get(FIELD_OVERSIZE)
        return int(raw) if raw is not None and raw.isdigit() else 0

    def task_id_hint(self) -> str | None:
        """The ``task_id`` found by a bounded scan of the start of ``data`` (or a stub's), read
        without parsing the entry: for entries that must not be parsed (too big, or delivered
        too often, maybe because parsing them kills a worker)."""
        if FIELD_OVERSIZE in self.fields:
            found = self.fields.get(FIELD_STUB_TASK_ID, b"")
            return found.decode() if found else None
        match = _TASK_ID_IN_DATA.search((self.data or b"")[:65536])
        return match.group(1).decode() if match else None

    def capped(self, limit: int) -> Entry:
        """This entry, or its stub when its fields add up to more than ``limit`` bytes."""
        size = sum(len(k) + len(v) for k, v in self.fields.items())
        if size <= limit:
            return self
        stub = {
            FIELD_TYPE: (self.fields.get(FIELD_TYPE) or b"")[:64],
            FIELD_OVERSIZE: str(size).encode(),
            FIELD_STUB_TASK_ID: (self.task_id_hint() or "").encode(),
        }
        return Entry(self.stream, self.entry_id, stub, self.deliveries)

    @property
    def timestamp_ms(self) -> int:
        """When Redis accepted the entry (the time part of its id)."""
        return int(self.entry_id.split("-", 1)[0])

    def printable_fields(self, limit: int = 64 << 10) -> dict[str, str]:
        """The raw fields for a dead letter: UTF-8 kept, anything else base64, long values cut."""
        out: dict[str, str] = {}
        for key, value in self.fields.items():
            try:
                shown = value.decode()
            except UnicodeDecodeError:
                shown = "base64:" + base64.b64encode(value).decode()
            if len(shown) > limit:
                shown = shown[:limit] + f"...[{len(value)} bytes in all]"
            out[key] = shown
        return out


def entries_from_read(reply: Any) -> list[Entry]:
    """The entries of an XREAD / XREADGROUP reply (RESP2 list or RESP3 map), in order."""
    out: list[Entry] = []
    if not reply:
        return out
    items = reply.items() if isinstance(reply, dict) else reply
    for stream, messages in items:
        name = text(stream)
        out.extend(Entry.from_reply(name, eid, fields) for eid, fields in messages or ())
    return out


def entries_from_range(stream: str, reply: Any) -> list[Entry]:
    """The entries of an XRANGE / XREVRANGE / XCLAIM reply (deleted entries left out)."""
    return [
        Entry.from_reply(stream, eid, fields) for eid, fields in reply or () if fields is not None
    ]
