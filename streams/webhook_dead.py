"""Dead webhook deliveries, and a task's delivery job found and sent again.

The Redis side of ``sop-llm webhooks dead`` and ``sop-llm webhooks redeliver <task_id>``; when a
redelivery is allowed is decided in ``handlers/webhooks/admin.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from pydantic import ValidationError
from redis.asyncio import Redis

from sop_llm.schemas.result import WebhookJob
from sop_llm.schemas.wire import FIELD_DATA, FIELD_TRACEPARENT
from sop_llm.streams import keys as k
from sop_llm.streams.entries import text
from sop_llm.streams.keys import Keys
from sop_llm.streams.scripts import LuaScript
from sop_llm.streams.webhook_store import WebhookDeadLetter, delivery_fields, status_pairs

# KEYS: webhooks, webhooks dead, status. ARGV: dead entry id ('' none), fields json,
#       HSET pairs...  Returns the new entry id.
_REQUEUE: Final = """
local id = redis.call('XADD', KEYS[1], '*', unpack(cjson.decode(ARGV[2])))
if ARGV[1] ~= '' then redis.call('XDEL', KEYS[2], ARGV[1]) end
if #ARGV > 2 and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], unpack(ARGV, 3))
end
return id
"""
_REQUEUE_SCRIPT: Final = LuaScript("webhook_requeue", _REQUEUE)

_Rows = list[tuple[str, dict[bytes, bytes]]]


@dataclass(frozen=True, slots=True)
class DeadDelivery:
    """An entry of ``{ns}:webhooks:dead``; ``letter`` is ``None`` when ``raw`` does not parse."""

    entry_id: str
    letter: WebhookDeadLetter | None
    raw: str


@dataclass(frozen=True, slots=True)
class FoundDelivery:
    """A task's delivery job, from a dead letter (``dead_entry_id``) or from the stream."""

    job: WebhookJob
    traceparent: str
    dead_entry_id: str | None = None


async def list_dead_deliveries(client: Redis, keys: Keys, count: int) -> list[DeadDelivery]:
    """The newest ``count`` dead letters, newest first."""
    rows: Any = await client.xrevrange(keys.webhooks_dead, "+", "-", count=count)
    out = []
    for eid, fields in rows:
        raw = text(fields.get(FIELD_DATA.encode(), b""))
        try:
            letter: WebhookDeadLetter | None = WebhookDeadLetter.model_validate_json(raw)
        except ValidationError:
            letter = None
        out.append(DeadDelivery(text(eid), letter, raw))
    return out


async def find_delivery(client: Redis, keys: Keys, task_id: str, scan: int) -> FoundDelivery | None:
    """The delivery job of ``task_id``: from its dead letter if it has one, else from the
    webhooks stream (the newest ``scan`` entries of each are searched); ``None`` when neither
    holds it."""
    for eid, fields in await _newest(client, keys.webhooks_dead, scan):
        try:
            letter = WebhookDeadLetter.model_validate_json(fields.get(FIELD_DATA.encode(), b""))
        except ValidationError:
            continue
        if letter.task_id == task_id and letter.job is not None:
            return FoundDelivery(letter.job, _traceparent(fields), dead_entry_id=eid)
    for _, fields in await _newest(client, keys.webhooks, scan):
        try:
            job = WebhookJob.model_validate_json(fields.get(FIELD_DATA.encode(), b""))
        except ValidationError:
            continue
        if job.task_id == task_id:
            return FoundDelivery(job, _traceparent(fields))
    return None


async def delivery_state(client: Redis, keys: Keys, task_id: str) -> str | None:
    """The task's ``webhook_state`` (``pending``, ``delivered``, ``failed``), ``None`` if unset."""
    state = await client.hget(keys.task(task_id), k.F_WEBHOOK_STATE)
    return None if state is None else text(state)


async def requeue_delivery(client: Redis, keys: Keys, found: FoundDelivery) -> str:
    """Publish ``found`` again as a fresh delivery (same ``webhook-id``, no attempts yet), drop
    its dead letter and mark the task's delivery ``pending``, atomically. Returns the new
    entry id."""
    job = found.job
    fields = delivery_fields(
        job.model_dump_json(exclude_none=True), [], found.traceparent, scheduled=False
    )
    args = [found.dead_entry_id or "", json.dumps(fields), *status_pairs("pending", 0, None, None)]
    script_keys = [keys.webhooks, keys.webhooks_dead, keys.task(job.task_id)]
    return text(await _REQUEUE_SCRIPT(client, script_keys, args))


async def _newest(client: Redis, stream: str, limit: int) -> _Rows:
    out: _Rows = []
    top = "+"
    while len(out) < limit:
        rows: Any = await client.xrevrange(stream, top, "-", count=min(500, limit - len(out)))
        if not rows:
            break
        out += [(text(eid), fields) for eid, fields in rows]
        top = "(" + out[-1][0]
    return out


def _traceparent(fields: dict[bytes, bytes]) -> str:
    return text(fields.get(FIELD_TRACEPARENT.encode(), b""))
