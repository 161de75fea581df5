"""Webhook deliveries in Redis: reading jobs, settling an attempt, the delayed set.

A delivery job lives on ``{ns}:webhooks`` (group ``webhook-senders``). After each attempt the
sender *settles* the entry in one script, fenced on still owning it: acknowledge it and either
mark the task delivered, park the next attempt in ``{ns}:webhooks:delayed`` (a sorted set scored
by due time, server clock), or write a dead letter to ``{ns}:webhooks:dead``; the task's status
hash gets the delivery log only while it still exists (an HSET on an expired record would
recreate it without a TTL). Due members return to the stream as new entries (``promote``).

What an attempt means (retry or not, when) is decided in ``handlers/webhooks/policy.py``; this
module only knows how a decision is written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sop_llm.schemas.result import WebhookJob
from sop_llm.schemas.wire import FIELD_DATA, FIELD_TRACEPARENT, FIELD_TYPE, EventType, StrictModel
from sop_llm.streams import keys as k
from sop_llm.streams.entries import Entry, entries_from_read
from sop_llm.streams.keys import WEBHOOK_GROUP, Keys
from sop_llm.streams.scripts import LuaScript
from sop_llm.streams.topology import ensure_groups, is_missing_group

# extra field of a retried delivery entry: the attempts made so far, as JSON
# (it belongs with the other names in streams/keys.py, which is not this module's to edit)
F_ATTEMPT_LOG: Final = "attempt_log"
WEBHOOK_DEAD_TYPE: Final = "webhook.dead"

Outcome = Literal["delivered", "retry", "dead"]
DeadReason = Literal["exhausted", "gone", "refused", "invalid_job", "payload_too_large"]

_STATUS_STATE: Final[dict[str, str]] = {
    "delivered": "delivered",
    "retry": "pending",
    "dead": "failed",
}

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

_SETTLE_SCRIPT: Final = LuaScript("webhook_settle", _SETTLE)
_PROMOTE_SCRIPT: Final = LuaScript("webhook_promote", _PROMOTE)


class AttemptRecord(StrictModel):
    """One delivery attempt: when (ms since the epoch), the HTTP status, the error class."""

    at: int
    status: int | None = None
    error: str | None = None


class WebhookDeadLetter(StrictModel):
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


def parse_attempt_log(raw: bytes | None) -> list[AttemptRecord]:
    """The attempts recorded on an entry; an unreadable log counts as none."""
    if not raw:
        return []
    try:
        return [AttemptRecord.model_validate(a) for a in json.loads(raw)]
    except (ValueError, TypeError, ValidationError):
        return []


def delivery_fields(
    data: str, attempts: Sequence[AttemptRecord], traceparent: str, *, scheduled: bool = True
) -> list[str]:
    """The fields of a delivery entry, flat, as ``XADD`` takes them. An entry with an attempt
    log (even an empty one) has had its first delay; a fresh one (``scheduled=False``) not."""
    out = [FIELD_TYPE, EventType.WEBHOOK_DELIVERY.value, FIELD_DATA, data]
    if attempts or scheduled:
        log = json.dumps([a.model_dump(exclude_none=True) for a in attempts], separators=(",", ":"))
        out += [F_ATTEMPT_LOG, log]
    if traceparent:
        out += [FIELD_TRACEPARENT, traceparent]
    return out


def status_pairs(state: str, attempts: int, status: int | None, error: str | None) -> list[str]:
    """The delivery log of a task's status hash, flat, as ``HSET`` takes it."""
    return [
        k.F_WEBHOOK_STATE, state, k.F_WEBHOOK_ATTEMPTS, str(attempts),
        k.F_WEBHOOK_LAST_STATUS, "" if status is None else str(status),
        k.F_WEBHOOK_LAST_ERROR, error or "",
    ]  # fmt: skip


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


class WebhookStore:
    """The sender's side of ``{ns}:webhooks``: read jobs, settle attempts, promote retries."""

    def __init__(self, *, client: Redis, keys: Keys, group: str = WEBHOOK_GROUP) -> None:
        self._client = client
        self._keys = keys
        self._group = group

    async def read(self, consumer: str, count: int, block_ms: int) -> list[Entry]:
        """Up to ``count`` new jobs for ``consumer``, blocking up to ``block_ms``. A stream or
        group that vanished (FLUSHALL, a restore) is created again and the read answers none.
        Raises the ``streams.errors.TRANSIENT_ERRORS`` while Redis is away."""
        stream = self._keys.webhooks
        try:
            reply: Any = await self._client.xreadgroup(
                self._group, consumer, {stream: ">"}, count=count, block=block_ms
            )
        except ResponseError as exc:
            if not is_missing_group(exc):
                raise
            await ensure_groups(self._client, [stream], self._group)
            return []
        return entries_from_read(reply)

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
        args += status_pairs(_STATUS_STATE[s.outcome], s.attempts, s.last_status, s.last_error)
        status_key = kk.task(s.task_id or "-")
        keys = [kk.webhooks, kk.webhooks_delayed, kk.webhooks_dead, status_key]
        return bool(int(await _SETTLE_SCRIPT(self._client, keys, args)))

    async def promote(self, limit: int = 100) -> tuple[int, int]:
        """Move due retries back to the stream: ``(moved, ms until the next is due or -1)``."""
        keys = [self._keys.webhooks_delayed, self._keys.webhooks]
        moved, wait = await _PROMOTE_SCRIPT(self._client, keys, [limit])
        return int(moved), int(wait)
