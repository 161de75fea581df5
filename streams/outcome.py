"""Starting an entry and writing its one terminal outcome.

``begin`` runs for a whole read batch in one round trip; ``finish`` calls made in the same
event-loop tick are written together in one pipeline (one round trip), each atomically: status,
``results`` (and the ``reply_to`` copy), the webhook job, the dead letter and the XACK.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis

from schemas.result import DeadLetter, TaskResult, WebhookJob
from schemas.wire import EventType
from streams.entries import Entry, text
from streams.keys import TASK_GROUP, Keys
from streams.scripts import BEGIN_SCRIPT, FINISH_SCRIPT, EncodableT, ScriptCall, run_batch

Verdict = Literal["run", "done", "duplicate", "conflict", "exhausted"]

_RESULT_TYPES = {
    "completed": EventType.TASK_COMPLETED,
    "failed": EventType.TASK_FAILED,
    "cancelled": EventType.TASK_CANCELLED,
    "expired": EventType.TASK_EXPIRED,
}


@dataclass(frozen=True, slots=True)
class Start:
    """What the worker knows about an entry before running it."""

    entry: Entry
    task_id: str
    model: str
    payload_hash: str = ""
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class BeginReply:
    verdict: Verdict
    attempts: int = 0
    other: str = ""
    """``done``: the terminal state; ``duplicate``/``conflict``: the task that owns the key."""


@dataclass(frozen=True, slots=True)
class Finish:
    entry: Entry
    result: TaskResult
    reply_to: str | None = None
    idempotency_key: str | None = None
    webhook: WebhookJob | None = None
    dead: DeadLetter | None = None


class Outcomes:
    def __init__(
        self,
        *,
        client: Redis,
        keys: Keys,
        worker: str,
        status_ttl_s: int,
        max_attempts: int,
        group: str = TASK_GROUP,
    ) -> None:
        self._client = client
        self._keys = keys
        self._worker = worker
        self._ttl = status_ttl_s
        self._max_attempts = max_attempts
        self._group = group
        self._queue: list[tuple[ScriptCall, asyncio.Future[Any]]] = []

    async def begin(self, starts: Sequence[Start], now_ms: int) -> list[BeginReply]:
        """Mark entries running (one round trip). Verdicts: ``run``; ``done`` (already terminal,
        acked); ``duplicate`` (another entry owns the task or key, acked); ``conflict`` (the
        idempotency key holds another payload); ``exhausted`` (over the attempt limit)."""
        if not starts:
            return []
        calls: list[ScriptCall] = []
        for s in starts:
            keys = [self._keys.task(s.task_id), s.entry.stream]
            if s.idempotency_key is not None:
                keys.append(self._keys.idem(s.idempotency_key))
            args: list[EncodableT] = [
                self._group,
                s.entry.entry_id,
                s.task_id,
                self._worker,
                now_ms,
                self._max_attempts,
                s.model,
                s.payload_hash,
                s.entry.timestamp_ms,
                self._ttl,
            ]
            calls.append((BEGIN_SCRIPT, keys, args))
        replies = await run_batch(self._client, calls)
        out = []
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
            verdict = text(reply[0])
            value = reply[1]
            if verdict in ("run", "exhausted"):
                out.append(BeginReply(verdict, attempts=int(value)))  # type: ignore[arg-type]
            else:
                out.append(BeginReply(verdict, other=text(value)))  # type: ignore[arg-type]
        return out

    async def finish(self, fin: Finish) -> bool:
        """Write the terminal outcome. Returns ``False`` when the task was already terminal
        (another attempt won): then only the entry is acknowledged (and dead-lettered if asked)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((self._finish_call(fin), future))
        if len(self._queue) == 1:
            # first in this tick: let the other finishers of the tick join, then write them all
            await asyncio.sleep(0)
            batch, self._queue = self._queue, []
            try:
                replies = await run_batch(self._client, [call for call, _ in batch])
            except asyncio.CancelledError:
                for _, fut in batch:
                    fut.cancel()
                raise
            except Exception as exc:  # handed to every caller of the batch, raised there
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                for (_, fut), reply in zip(batch, replies, strict=True):
                    if isinstance(reply, Exception):
                        fut.set_exception(reply)
                    else:
                        fut.set_result(reply)
        reply = await future
        return bool(int(reply))

    def _finish_call(self, fin: Finish) -> ScriptCall:
        result = fin.result
        k = self._keys
        keys = [k.task(result.task_id), k.results, fin.entry.stream, k.webhooks, k.dead]
        if fin.reply_to:
            keys.append(k.results_for(fin.reply_to))
        if fin.idempotency_key is not None:
            keys.append(k.idem(fin.idempotency_key))
        args: list[EncodableT] = [
            self._group,
            fin.entry.entry_id,
            result.state.value,
            _RESULT_TYPES[result.state.value].value,
            result.model_dump_json(exclude_none=True),
            self._ttl,
            fin.entry.traceparent,
            fin.webhook.model_dump_json(exclude_none=True) if fin.webhook else "",
            fin.dead.model_dump_json(exclude_none=True) if fin.dead else "",
            result.finished_at,
            "1" if fin.reply_to else "0",
            "1" if fin.idempotency_key is not None else "0",
            result.task_id,
        ]
        return FINISH_SCRIPT, keys, args
