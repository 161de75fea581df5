"""Webhook deliveries in Redis: settling an attempt, the delayed set, dead letters, redelivery.

A delivery job lives on ``{ns}:webhooks`` (group ``webhook-senders``). After each attempt the
sender *settles* the entry in one script, fenced on still owning it: acknowledge it and either
mark the task delivered, park the next attempt in ``{ns}:webhooks:delayed`` (a sorted set scored
by due time, server clock), or write a dead letter to ``{ns}:webhooks:dead``; the task's status
hash gets the delivery log only while it still exists (an HSET on an expired record would
recreate it without a TTL). Due members return to the stream as new entries (``promote``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from redis.asyncio import Redis

from schemas.errors import SopError
from schemas.result import WebhookJob
from schemas.wire import FIELD_DATA, FIELD_TRACEPARENT, FIELD_TYPE, EventType
from streams import keys as k
from streams.entries import Entry, text
from streams.keys import WEBHOOK_GROUP, Keys
from streams.scripts import LuaScript

# extra field of a retried delivery entry: the attempts made so far, as JSON
# (wished for in streams/keys.py; kept here because that module is not ours to edit)
F_ATTEMPT_LOG: Final = "attempt_log"
WEBHOOK_DEAD_TYPE: Final = "webhook.dead"

DeadReason = Literal["exhausted", "gone", "refused", "invalid_job", "payload_too_large"]
Outcome = Literal["delivered", "retry", "dead"]
_STATUS_STATE: Final[dict[str, str]] = {"delivered": "delivered", "retry": "pending", "dead": "failed"}

# KEYS: webhooks, delayed, webhooks dead, status
# ARGV: group, entry_id, consumer, outcome, delay_ms, member | dead json, traceparent,
#       dead type, has_status, HSET field/value pairs...
# Returns 1 when settled, 0 when the entry is no longer ours (reclaimed by another sender).
_SETTLE: Final = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if ARGV[4] == 'retry' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[6])
elseif ARGV[4] == 'dead' then
  if ARGV[7] ~= '' then
    redis.call('XADD', KEYS[3], '*', 'type', ARGV[8], 'data', ARGV[6], 'traceparent', ARGV[7])
  else
    redis.call('XADD', KEYS[3], '*', 'type', ARGV[8], 'data', ARGV[6])
  end
end
if ARGV[9] == '1' and #ARGV > 9 and redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('HSET', KEYS[4], unpack(ARGV, 10))
end
return 1
"""

# Move due members of the delayed set back to the stream (each member is a JSON list of
# entry fields). KEYS: delayed, webhooks. ARGV: limit
# Returns {moved, ms until the next member is due (-1: none)}
_PROMOTE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  local ok, fields = pcall(cjson.decode, m)
  if ok and type(fields) == 'table' and #fields >= 2 and #fields % 2 == 0 then
    redis.call('XADD', KEYS[2], '*', unpack(fields))
  else
    -- never dropped: the sender dead-letters what it cannot read, with the raw value
    redis.call('XADD', KEYS[2], '*', 'data', m)
  end
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = -1
if #nxt > 0 then wait = math.max(0, tonumber(nxt[2]) - now) end
return {#due, wait}
"""

# KEYS: webhooks, webhooks dead, status. ARGV: dead entry id ('' none), fields json,
#       has_status, HSET pairs...  Returns the new entry id.
_REQUEUE: Final = """
local id = redis.call('XADD', KEYS[1], '*', unpack(cjson.decode(ARGV[2])))
if ARGV[1] ~= '' then redis.call('XDEL', KEYS[2], ARGV[1]) end
if ARGV[3] == '1' and #ARGV > 3 and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], unpack(ARGV, 4))
end
return id
"""

SETTLE_SCRIPT: Final = LuaScript("webhook_settle", _SETTLE)
PROMOTE_SCRIPT: Final = LuaScript("webhook_promote", _PROMOTE)
REQUEUE_SCRIPT: Final = LuaScript("webhook_requeue", _REQUEUE)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttemptRecord(_Strict):
    """One delivery attempt: when (ms since the epoch), the HTTP status, the error class."""

    at: int
    status: int | None = None
    error: str | None = None


class WebhookDeadLetter(_Strict):
    """An entry on ``{ns}:webhooks:dead``: a delivery that will not be attempted again."""

    v: Literal[1] = 1
    reason: DeadReason
    delivery_id: str | None = None
    task_id: str | None = None
    url: str | None = None
    event: str | None = None
    attempts: list[AttemptRecord]
    source_stream: str
    entry_id: str
    job: WebhookJob | None = None
    fields: dict[str, str] | None = None
    dead_at: int


class WebhookNotFoundError(SopError, LookupError):
    """No delivery job of that task is left in the dead letters or the webhooks stream."""


class WebhookBusyError(SopError):
    """The task's delivery is still under way; redelivering would send it twice at once."""


def parse_attempt_log(raw: bytes | None) -> list[AttemptRecord]:
    """The attempts recorded on an entry; an unreadable log counts as none."""
    if not raw:
        return []
    try:
        return [AttemptRecord.model_validate(a) for a in json.loads(raw)]
    except (ValueError, TypeError, ValidationError):
        return []


def delivery_fields(data: str, attempts: Sequence[AttemptRecord], traceparent: str) -> list[str]:
    """The fields of a delivery entry, flat, as ``XADD`` takes them."""
    out = [FIELD_TYPE, EventType.WEBHOOK_DELIVERY.value, FIELD_DATA, data]
    if attempts:
        log = json.dumps([a.model_dump(exclude_none=True) for a in attempts], separators=(",", ":"))
        out += [F_ATTEMPT_LOG, log]
    if traceparent:
        out += [FIELD_TRACEPARENT, traceparent]
    return out


@dataclass(frozen=True, slots=True)
class Settlement:
    """What one attempt (or the refusal to make one) leaves behind."""

    outcome: Outcome
    task_id: str | None
    attempts: int
    last_status: int | None = None
    last_error: str | None = None
    delay_ms: int = 0
    next_fields: Sequence[str] = ()
    dead: WebhookDeadLetter | None = None


@dataclass(frozen=True, slots=True)
class DeadEntry:
    entry_id: str
    letter: WebhookDeadLetter | None
    raw: str


@dataclass(frozen=True, slots=True)
class Redelivery:
    entry_id: str
    delivery_id: str
    from_dead: bool


def _status_pairs(state: str, attempts: int, status: int | None, error: str | None) -> list[str]:
    return [
        k.F_WEBHOOK_STATE, state, k.F_WEBHOOK_ATTEMPTS, str(attempts),
        k.F_WEBHOOK_LAST_STATUS, "" if status is None else str(status),
        k.F_WEBHOOK_LAST_ERROR, error or "",
    ]  # fmt: skip


class WebhookStore:
    def __init__(self, *, client: Redis, keys: Keys, group: str = WEBHOOK_GROUP) -> None:
        self._client = client
        self._keys = keys
        self._group = group

    async def settle(self, entry: Entry, consumer: str, s: Settlement) -> bool:
        """Acknowledge ``entry`` and record ``s`` atomically; ``False`` when ``consumer`` no
        longer owns the entry (another sender reclaimed it: its attempt will settle it)."""
        kk = self._keys
        payload = ""
        if s.outcome == "retry":
            payload = json.dumps(list(s.next_fields), separators=(",", ":"))
        elif s.dead is not None:
            payload = s.dead.model_dump_json(exclude_none=True)
        args: list[str | int] = [
            self._group, entry.entry_id, consumer, s.outcome, s.delay_ms, payload,
            entry.traceparent, WEBHOOK_DEAD_TYPE, "1" if s.task_id else "0",
        ]  # fmt: skip
        args += _status_pairs(_STATUS_STATE[s.outcome], s.attempts, s.last_status, s.last_error)
        status_key = kk.task(s.task_id or "-")
        keys = [kk.webhooks, kk.webhooks_delayed, kk.webhooks_dead, status_key]
        return bool(int(await SETTLE_SCRIPT(self._client, keys, args)))

    async def promote(self, limit: int = 100) -> tuple[int, int]:
        """Move due retries back to the stream: ``(moved, ms until the next is due or -1)``."""
        keys = [self._keys.webhooks_delayed, self._keys.webhooks]
        moved, wait = await PROMOTE_SCRIPT(self._client, keys, [limit])
        return int(moved), int(wait)

    async def dead_letters(self, count: int) -> list[DeadEntry]:
        """The newest ``count`` dead letters, newest first."""
        rows = await self._client.xrevrange(self._keys.webhooks_dead, "+", "-", count=count)
        out = []
        for eid, fields in rows:
            raw = text(fields.get(FIELD_DATA.encode(), b""))
            try:
                letter: WebhookDeadLetter | None = WebhookDeadLetter.model_validate_json(raw)
            except ValidationError:
                letter = None
            out.append(DeadEntry(text(eid), letter, raw))
        return out

    async def redeliver(self, task_id: str, *, force: bool = False, scan: int = 10_000) -> Redelivery:
        """Send a task's delivery again from its first attempt, with the same webhook-id.

        Looks in the dead letters first (the entry leaves them), then in the webhooks stream
        (newest ``scan`` entries of each). Raises :class:`WebhookNotFoundError` when neither
        holds it, :class:`WebhookBusyError` when the status still says ``pending`` (unless
        ``force``).
        """
        kk = self._keys
        found = await self._find_dead(task_id, scan)
        dead_id = ""
        if found is not None:
            dead_id, job, traceparent = found
        else:
            live = await self._find_live(task_id, scan)
            if live is None:
                raise WebhookNotFoundError(f"no webhook delivery found for task {task_id}")
            job, traceparent = live
            state = await self._client.hget(kk.task(task_id), k.F_WEBHOOK_STATE)  # type: ignore[misc]
            if state == b"pending" and not force:
                raise WebhookBusyError(
                    f"the webhook of task {task_id} is still being delivered (webhook_state="
                    "pending); wait for it, or force a second delivery"
                )
        fields = delivery_fields(job.model_dump_json(exclude_none=True), [], traceparent)
        args = [dead_id, json.dumps(fields), "1", *_status_pairs("pending", 0, None, None)]
        keys = [kk.webhooks, kk.webhooks_dead, kk.task(task_id)]
        eid = await REQUEUE_SCRIPT(self._client, keys, args)
        return Redelivery(text(eid), job.delivery_id, from_dead=bool(dead_id))

    async def _scan(self, stream: str, limit: int) -> list[tuple[str, dict[bytes, bytes]]]:
        out: list[tuple[str, dict[bytes, bytes]]] = []
        top = "+"
        while len(out) < limit:
            rows = await self._client.xrevrange(stream, top, "-", count=min(500, limit - len(out)))
            if not rows:
                break
            out += [(text(eid), fields) for eid, fields in rows]
            top = "(" + out[-1][0]
        return out

    async def _find_dead(self, task_id: str, scan: int) -> tuple[str, WebhookJob, str] | None:
        for eid, fields in await self._scan(self._keys.webhooks_dead, scan):
            try:
                letter = WebhookDeadLetter.model_validate_json(fields.get(FIELD_DATA.encode(), b""))
            except ValidationError:
                continue
            if letter.task_id == task_id and letter.job is not None:
                return eid, letter.job, text(fields.get(FIELD_TRACEPARENT.encode(), b""))
        return None

    async def _find_live(self, task_id: str, scan: int) -> tuple[WebhookJob, str] | None:
        for _, fields in await self._scan(self._keys.webhooks, scan):
            try:
                job = WebhookJob.model_validate_json(fields.get(FIELD_DATA.encode(), b""))
            except ValidationError:
                continue
            if job.task_id == task_id:
                return job, text(fields.get(FIELD_TRACEPARENT.encode(), b""))
        return None
