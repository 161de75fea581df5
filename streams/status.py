"""Reading status records (``{ns}:task:<id>``)."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from sop_llm.schemas.result import StatusRecord, TaskResult, TaskState, WebhookStatus
from sop_llm.streams import keys as k
from sop_llm.streams.entries import text


def decode_status(task_id: str, raw: dict[Any, Any]) -> StatusRecord | None:
    """A status hash as a model; ``None`` for an empty hash or a bare alias."""
    if not raw:
        return None
    f = {text(a): text(b) for a, b in raw.items()}
    if k.F_STATE not in f:
        return None

    def num(name: str) -> int | None:
        return int(f[name]) if f.get(name) else None

    return StatusRecord(
        task_id=f.get(k.F_TASK_ID, task_id),
        state=TaskState(f[k.F_STATE]),
        model=f.get(k.F_MODEL),
        stream=f.get(k.F_STREAM),
        entry_id=f.get(k.F_ENTRY_ID),
        created_at=num(k.F_CREATED_AT),
        started_at=num(k.F_STARTED_AT),
        finished_at=num(k.F_FINISHED_AT),
        attempts=num(k.F_ATTEMPTS) or 0,
        worker=f.get(k.F_WORKER),
        duplicate_of=f.get(k.F_DUPLICATE_OF),
        result=TaskResult.model_validate_json(f[k.F_RESULT]) if f.get(k.F_RESULT) else None,
        webhook=WebhookStatus(
            state=f[k.F_WEBHOOK_STATE],
            attempts=num(k.F_WEBHOOK_ATTEMPTS) or 0,
            last_status_code=num(k.F_WEBHOOK_LAST_STATUS),
            last_error=f.get(k.F_WEBHOOK_LAST_ERROR) or None,
        )
        if f.get(k.F_WEBHOOK_STATE)
        else None,
    )


async def read_status(client: Redis, keys: k.Keys, task_id: str) -> StatusRecord | None:
    """The status of ``task_id``, or ``None`` when unknown (never submitted, or expired).

    A plain-XADD duplicate (same idempotency key and payload as an earlier task) answers with
    the earlier task's record, its ``duplicate_of`` naming that task. Raises what redis-py
    raises: this is a building block; the SDK's :meth:`Producer.status` raises sop-llm's errors.
    """
    raw = await client.hgetall(keys.task(task_id))
    alias = raw.get(k.F_DUPLICATE_OF.encode()) if raw else None
    if alias:
        original = text(alias)
        record = decode_status(original, await client.hgetall(keys.task(original)))
        if record is None:
            return None
        return record.model_copy(update={"duplicate_of": original})
    return decode_status(task_id, raw)
