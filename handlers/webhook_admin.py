"""Operator actions on webhook deliveries: list the dead ones, send one again.

Used by ``sop-llm webhooks dead`` and ``sop-llm webhooks redeliver <task_id>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from pydantic import ValidationError
from redis.asyncio import Redis

from handlers.webhook_store import WebhookDeadLetter, delivery_fields, status_pairs
from schemas.errors import SopError
from schemas.result import WebhookJob
from schemas.wire import FIELD_DATA, FIELD_TRACEPARENT
from streams import keys as k
from streams.entries import text
from streams.keys import Keys
from streams.scripts import LuaScript

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
REQUEUE_SCRIPT: Final = LuaScript("webhook_requeue", _REQUEUE)


class WebhookNotFoundError(SopError, LookupError):
    """No delivery job of that task is left in the dead letters or the webhooks stream."""


class WebhookBusyError(SopError):
    """The task's delivery is still under way; redelivering would send it twice at once."""


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


class WebhookAdmin:
    def __init__(self, *, client: Redis, keys: Keys) -> None:
        self._client = client
        self._keys = keys

    async def dead_letters(self, count: int) -> list[DeadEntry]:
        """The newest ``count`` dead letters, newest first."""
        rows: Any = await self._client.xrevrange(self._keys.webhooks_dead, "+", "-", count=count)
        out = []
        for eid, fields in rows:
            raw = text(fields.get(FIELD_DATA.encode(), b""))
            try:
                letter: WebhookDeadLetter | None = WebhookDeadLetter.model_validate_json(raw)
            except ValidationError:
                letter = None
            out.append(DeadEntry(text(eid), letter, raw))
        return out

    async def redeliver(
        self, task_id: str, *, force: bool = False, scan: int = 10_000
    ) -> Redelivery:
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
            state = await self._client.hget(kk.task(task_id), k.F_WEBHOOK_STATE)
            if state == b"pending" and not force:
                raise WebhookBusyError(
                    f"the webhook of task {task_id} is still being delivered (webhook_state="
                    "pending); wait for it, or force a second delivery"
                )
        data = job.model_dump_json(exclude_none=True)
        fields = delivery_fields(data, [], traceparent, scheduled=False)
        args = [dead_id, json.dumps(fields), *status_pairs("pending", 0, None, None)]
        keys = [kk.webhooks, kk.webhooks_dead, kk.task(task_id)]
        eid = await REQUEUE_SCRIPT(self._client, keys, args)
        return Redelivery(text(eid), job.delivery_id, from_dead=bool(dead_id))

    async def _scan(self, stream: str, limit: int) -> list[tuple[str, dict[bytes, bytes]]]:
        out: list[tuple[str, dict[bytes, bytes]]] = []
        top = "+"
        while len(out) < limit:
            rows: Any = await self._client.xrevrange(
                stream, top, "-", count=min(500, limit - len(out))
            )
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
