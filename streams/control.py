"""Cancellation: the status flag, the control stream and the guarded terminal write.

A cancel reaches a task in every state it can be in:

* queued (SDK intake, or waiting for a retry): it ends ``cancelled`` at once, without running;
* running: ``cancel_requested`` is set on its status and a ``task.cancel`` event goes to
  ``{ns}:control``; the worker running it stops the generation between tokens and ends it
  ``cancelled`` (a worker that picks the task up later sees the flag and does not run it);
* finished or unknown: nothing happens, and nothing is remembered that could touch a later task.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from enum import StrEnum

from redis.asyncio import Redis

from sop_llm.schemas.result import TERMINAL_STATES, TaskResult, TaskState
from sop_llm.streams import keys as k
from sop_llm.streams.cancellation import raise_if_cancelled
from sop_llm.streams.entries import Entry, entries_from_range, entries_from_read, text
from sop_llm.streams.outcome import Finish, Outcomes, webhook_job
from sop_llm.streams.scripts import CANCEL_SCRIPT


class CancelOutcome(StrEnum):
    CANCELLED = "cancelled"
    """It was queued; it is now ``cancelled`` and will not run."""
    REQUESTED = "requested"
    """It is running; it stops between tokens and ends ``cancelled``."""
    FINISHED = "finished"
    """It had already ended: nothing changed."""
    UNKNOWN = "unknown"
    """No such task (never seen, or its record expired): nothing changed."""


async def cancel_task(
    client: Redis, keys: k.Keys, task_id: str, *, status_ttl_s: int, notify: bool = True
) -> CancelOutcome:
    """Cancel ``task_id`` (see the module doc). ``notify=False`` when called for a control
    event that the worker running the task receives itself."""
    fields = [k.F_STATE, k.F_MODEL, k.F_CREATED_AT, k.F_ATTEMPTS, k.F_STREAM, k.F_ENTRY_ID,
              k.F_REPLY_TO, k.F_WEBHOOK_URL]  # fmt: skip
    raw = await client.hmget(keys.task(task_id), fields)
    got = {name: text(v) if v is not None else None for name, v in zip(fields, raw, strict=True)}
    state = got[k.F_STATE]
    if state is None:
        return CancelOutcome.UNKNOWN
    if TaskState(state) in TERMINAL_STATES:
        return CancelOutcome.FINISHED
    if state == TaskState.QUEUED and got[k.F_STREAM] and got[k.F_ENTRY_ID]:
        now = int(time.time() * 1000)
        created = int(got[k.F_CREATED_AT] or now)
        result = TaskResult(
            task_id=task_id, state=TaskState.CANCELLED, model=got[k.F_MODEL] or None,
            finish_reason="cancelled", queued_ms=max(0, now - created),
            attempts=int(got[k.F_ATTEMPTS] or 0), finished_at=now,
        )  # fmt: skip
        entry = Entry(stream=got[k.F_STREAM] or "", entry_id=got[k.F_ENTRY_ID] or "", fields={})
        url = got[k.F_WEBHOOK_URL]
        outcomes = Outcomes(
            client=client, keys=keys, worker="cancel", status_ttl_s=status_ttl_s, max_attempts=1
        )
        written = await outcomes.finish(
            Finish(
                entry=entry,
                result=result,
                reply_to=got[k.F_REPLY_TO] or None,
                webhook=webhook_job(result, url) if url else None,
                expect_state=TaskState.QUEUED.value,
            )
        )
        if written == 1:
            return CancelOutcome.CANCELLED
        if written == 0:
            return CancelOutcome.FINISHED
    seen = text(
        await CANCEL_SCRIPT(
            client, [keys.task(task_id), keys.control], [task_id, "1" if notify else "0"]
        )
    )
    if not seen:
        return CancelOutcome.UNKNOWN
    if TaskState(seen) in TERMINAL_STATES:
        return CancelOutcome.FINISHED
    return CancelOutcome.REQUESTED


async def control_events(
    client: Redis,
    keys: k.Keys,
    *,
    block_ms: int = 1000,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[str]:
    """Task ids of ``task.cancel`` events published from now on (every reader sees every one),
    until ``stop`` is set. ``stop`` bounds the end even where a cancellation gets lost: redis-py's
    asyncio client can swallow the cancellation of a blocking read (redis/redis-py#2028), and
    this loop would then read on forever."""
    stream = keys.control
    newest = entries_from_range(stream, await client.xrevrange(stream, count=1))
    last = newest[0].entry_id if newest else "0-0"
    while stop is None or not stop.is_set():
        reply = await client.xread({stream: last}, count=100, block=block_ms)
        raise_if_cancelled()
        for entry in entries_from_read(reply):
            last = entry.entry_id
            if entry.type != "task.cancel":
                continue
            try:
                task_id = json.loads(entry.data or b"{}").get("task_id")
            except (ValueError, AttributeError):
                continue
            if isinstance(task_id, str):
                yield task_id
