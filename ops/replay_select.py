"""What `sop-llm replay` works on: entries of a task, results or dead stream, by id range, time,
task id, model or state, each resolved to its original task event. Also the `tail` filters.

Reading only: nothing here writes to Redis. It imports nothing from ``ops``, so it can move to
``streams/`` (which owns replay reading) as it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final, Literal

from pydantic import JsonValue, ValidationError
from redis.asyncio import Redis

from sop_llm.schemas.result import DeadLetter, StatusRecord, TaskResult, TaskState
from sop_llm.schemas.wire import EventType
from sop_llm.streams import keys as k
from sop_llm.streams.entries import Entry, entries_from_range, text
from sop_llm.streams.status import decode_status

Source = Literal["tasks", "results", "dead"]
Event = dict[str, JsonValue]

_MAX_SEQ: Final = 2**64 - 1
_ID_RE: Final = re.compile(r"^(\d+)(?:-(\d+))?$")
_RELATIVE_RE: Final = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d|w)$")
_UNIT_MS: Final = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000,
                   "w": 604_800_000}  # fmt: skip
_PAGE: Final = 500


def parse_time(value: str, *, now_ms: int) -> int:
    """Milliseconds since the epoch for ``2h`` / ``30m`` / ``90s`` / ``7d`` (that long before
    ``now_ms``), an ISO 8601 time (no zone: UTC) or plain epoch milliseconds.
    Raises ``ValueError``."""
    value = value.strip()
    if (m := _RELATIVE_RE.match(value)) is not None:
        return now_ms - int(float(m[1]) * _UNIT_MS[m[2]])
    if value.isdigit():
        return int(value)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is neither an ISO time (2026-01-31T12:00:00Z) nor a relative one (2h)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _id_tuple(value: str, *, end: bool) -> tuple[int, int]:
    if value == "-":
        return (0, 0)
    if value == "+":
        return (_MAX_SEQ, _MAX_SEQ)
    m = _ID_RE.match(value)
    if m is None:
        raise ValueError(f"{value!r} is not a stream entry id (1700000000000-0)")
    seq = int(m[2]) if m[2] is not None else (_MAX_SEQ if end else 0)
    return (int(m[1]), seq)


@dataclass(frozen=True, slots=True)
class Filters:
    """Which entries to take; every condition given must hold. Ids and times are inclusive."""

    from_id: str | None = None
    to_id: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    task_ids: frozenset[str] = frozenset()
    model: str | None = None
    state: str | None = None
    limit: int | None = None

    def bounds(self) -> tuple[str, str] | None:
        """The XRANGE ``(start, end)`` the id and time limits leave; ``None`` when empty."""
        start, end = (0, 0), (_MAX_SEQ, _MAX_SEQ)
        if self.from_id is not None:
            start = max(start, _id_tuple(self.from_id, end=False))
        if self.since_ms is not None:
            start = max(start, (self.since_ms, 0))
        if self.to_id is not None:
            end = min(end, _id_tuple(self.to_id, end=True))
        if self.until_ms is not None:
            end = min(end, (self.until_ms, _MAX_SEQ))
        if start > end:
            return None
        return f"{start[0]}-{start[1]}", ("+" if end[0] == _MAX_SEQ else f"{end[0]}-{end[1]}")

    def matches(self, c: Candidate) -> bool:
        return (
            (not self.task_ids or c.task_id in self.task_ids)
            and (self.model is None or c.model == self.model)
            and (self.state is None or c.state == self.state)
        )


@dataclass(frozen=True, slots=True)
class Candidate:
    """One selected task: where it was found, its original event, and what it produced."""

    task_id: str
    source: Source
    stream: str
    entry_id: str
    origin_stream: str | None = None
    """The task partition the original event was published to."""
    event: Event | None = None
    model: str | None = None
    state: str | None = None
    recorded: TaskResult | None = None
    problem: str | None = None
    """Why the original event is not available (trimmed, expired, unreadable)."""


def source_streams(
    name: str, keys: k.Keys, *, pools: Sequence[str], partitions: Sequence[str]
) -> tuple[Source, list[str]]:
    """``results``, ``dead``, ``tasks`` (every partition of ``pools``), one partition name, or a
    full key of the namespace (a task partition or a ``results:<reply_to>`` stream).
    Raises ``ValueError``."""
    if name in ("results", keys.results) or name.startswith(keys.results_for("")):
        return "results", [keys.results if name == "results" else name]
    if name in ("dead", keys.dead):
        return "dead", [keys.dead]
    if name == "tasks":
        return "tasks", [keys.tasks(pool, part) for part in partitions for pool in pools]
    if name in partitions:
        return "tasks", [keys.tasks(pool, name) for pool in pools]
    try:
        keys.parse_tasks_stream(name)
    except ValueError:
        raise ValueError(
            f"unknown stream {name!r}: give results, dead, tasks, a partition name, "
            f"or a key of namespace {keys.namespace!r}"
        ) from None
    return "tasks", [name]


def _event(data: bytes | str | None) -> tuple[Event | None, str | None]:
    if data is None:
        return None, "the entry has no data field"
    if isinstance(data, str) and data.startswith("base64:"):
        return None, "the entry's data is not UTF-8"
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, "the entry's data is not JSON"
    if not isinstance(body, dict):
        return None, "the entry's data is not a JSON object"
    return body, None


def _str(event: Event | None, name: str) -> str | None:
    value = event.get(name) if event else None
    return value if isinstance(value, str) else None


def _derived(keys: k.Keys, stream: str, entry_id: str) -> str:
    try:
        pool, partition = keys.parse_tasks_stream(stream)
    except ValueError:
        return "?"  # not a task partition of this namespace: no documented id to derive
    return keys.derived_task_id(pool, partition, entry_id)


async def statuses(
    client: Redis, keys: k.Keys, task_ids: Sequence[str]
) -> list[StatusRecord | None]:
    """``read_status`` for many tasks in two pipelined rounds (the second for duplicates)."""
    pipe = client.pipeline(transaction=False)
    for task_id in task_ids:
        pipe.hgetall(keys.task(task_id))
    raws = await pipe.execute()
    aliases = {i: text(raw[k.F_DUPLICATE_OF.encode()]) for i, raw in enumerate(raws)
               if raw and raw.get(k.F_DUPLICATE_OF.encode())}  # fmt: skip
    out = [decode_status(t, raw) for t, raw in zip(task_ids, raws, strict=True)]
    if aliases:
        pipe = client.pipeline(transaction=False)
        for original in aliases.values():
            pipe.hgetall(keys.task(original))
        for (i, original), raw in zip(aliases.items(), await pipe.execute(), strict=True):
            record = decode_status(original, raw)
            out[i] = record and record.model_copy(update={"duplicate_of": original})
    return out


def _from_entry(source: Source, keys: k.Keys, e: Entry) -> Candidate:
    blank = Candidate(task_id="?", source=source, stream=e.stream, entry_id=e.entry_id)
    if source == "results":
        try:
            result = TaskResult.model_validate_json(e.data or b"")
        except ValidationError:
            return replace(blank, problem="unreadable result entry")
        return replace(blank, task_id=result.task_id, model=result.model,
                       state=result.state.value, recorded=result)  # fmt: skip
    if source == "dead":
        try:
            letter = DeadLetter.model_validate_json(e.data or b"")
        except ValidationError:
            return replace(blank, problem="unreadable dead letter")
        event, problem = _event(letter.fields.get("data"))
        task_id = letter.task_id or _derived(keys, letter.source_stream, letter.entry_id)
        return replace(blank, task_id=task_id, origin_stream=letter.source_stream, event=event,
                       model=_str(event, "model"), problem=problem)  # fmt: skip
    event, problem = _event(e.data)
    if e.type != EventType.TASK_SUBMITTED.value:
        event, problem = None, f"entry type is {e.type!r}, not a task submission"
    task_id = _str(event, "task_id") or _derived(keys, e.stream, e.entry_id)
    return replace(blank, task_id=task_id, origin_stream=e.stream, event=event,
                   model=_str(event, "model"), problem=problem)  # fmt: skip


def _with_status(c: Candidate, record: StatusRecord | None) -> Candidate:
    state = record.state.value if record else None
    if state is None and c.source == "dead":
        state = TaskState.FAILED.value  # a dead-lettered task ends failed
    return replace(c, state=state, recorded=record.result if record else None)


async def _scan(
    client: Redis, keys: k.Keys, source: Source, stream: str, filters: Filters
) -> list[Candidate]:
    bounds = filters.bounds()
    if bounds is None:
        return []
    start, end = bounds
    chosen: list[Candidate] = []
    seen: set[str] = set()
    while filters.limit is None or len(chosen) < filters.limit:
        page = entries_from_range(stream, await client.xrange(stream, start, end, count=_PAGE))
        found = [_from_entry(source, keys, e) for e in page]
        if source != "results":
            records = await statuses(client, keys, [c.task_id for c in found])
            found = [_with_status(c, r) for c, r in zip(found, records, strict=True)]
        for c in found:
            # a retried task has one entry per round of attempts: take it once, the first time
            if filters.matches(c) and (c.task_id == "?" or c.task_id not in seen):
                seen.add(c.task_id)
                chosen.append(c)
        if len(page) < _PAGE:
            break
        start = "(" + page[-1].entry_id
    return chosen[: filters.limit]


async def _originals(client: Redis, keys: k.Keys, chosen: list[Candidate]) -> list[Candidate]:
    """Find each result's task event through its status record (``stream`` + ``entry_id``)."""
    records = await statuses(client, keys, [c.task_id for c in chosen])
    pipe = client.pipeline(transaction=False)
    for r in records:
        if r is not None and r.stream and r.entry_id:
            pipe.xrange(r.stream, r.entry_id, r.entry_id)
    replies = iter(await pipe.execute())
    out = []
    for c, r in zip(chosen, records, strict=True):
        if r is None or not r.stream or not r.entry_id:
            out.append(replace(c, problem="status record expired: original event unknown"))
            continue
        found = entries_from_range(r.stream, next(replies))
        if not found:
            gone = f"original event {r.entry_id} was trimmed from {r.stream}"
            out.append(replace(c, origin_stream=r.stream, problem=gone))
            continue
        event, problem = _event(found[0].data)
        out.append(replace(c, origin_stream=r.stream, event=event, problem=problem))
    return out


async def select(
    client: Redis, keys: k.Keys, source: Source, streams: Sequence[str], filters: Filters
) -> list[Candidate]:
    """The matching entries of ``streams``, oldest first, at most ``filters.limit``."""
    chosen: list[Candidate] = []
    for stream in streams:
        chosen.extend(await _scan(client, keys, source, stream, filters))
    chosen.sort(key=lambda c: _id_tuple(c.entry_id, end=False))
    chosen = chosen[: filters.limit]
    if source == "results" and chosen:
        chosen = await _originals(client, keys, chosen)
    return chosen


# ---- `sop-llm tail` filters ------------------------------------------------------------------


def _field(doc: Mapping[str, object], name: str) -> object:
    """``name`` of an entry as `tail` decodes it: from its payload, a webhook job's outcome, or
    a dead letter's raw event (a dead-lettered task ends ``failed``)."""
    data = doc.get("data")
    if not isinstance(data, dict):
        return None
    if name in data:
        return data[name]
    if isinstance(payload := data.get("payload"), dict):
        return payload.get(name)
    if doc.get("type") != EventType.TASK_DEAD.value:
        return None
    if name == "state":
        return TaskState.FAILED.value
    raw = data.get("fields")
    body = raw.get("data") if isinstance(raw, dict) else None
    event = _event(body)[0] if isinstance(body, str) else None
    return event.get(name) if event else None


def entry_matches(
    doc: Mapping[str, object],
    task_id: str | Sequence[str] | None,
    type_: str | None,
    state: str | None,
    model: str | None,
) -> bool:
    """Whether an entry as `tail` decodes it (``{"id", "type", "data": <parsed JSON>}``) passes
    the filters; ``None`` (or no task ids) means no condition. Results, task events, webhook
    jobs and dead letters all answer by task id, state and model."""
    wanted = {task_id} if isinstance(task_id, str) else set(task_id or ())
    return (
        (type_ is None or doc.get("type") == type_)
        and (not wanted or _field(doc, "task_id") in wanted)
        and (state is None or _field(doc, "state") == state)
        and (model is None or _field(doc, "model") == model)
    )
