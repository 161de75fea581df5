"""Starting an entry and writing its one terminal outcome.

The begins made in one event-loop tick go out as one ``BEGIN_MANY`` call, and the finishes of
one tick as one ``FINISH_MANY`` call (one round trip each, whatever the number of tasks), each
task atomic on its own: for a finish, the status record, the ``results`` entry (and the
``reply_to`` copy), the webhook job, the dead letter and the XACK.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from sop_llm.schemas.result import DeadLetter, ErrorInfo, TaskResult, WebhookJob
from sop_llm.schemas.wire import EventType
from sop_llm.streams.clock import CallClock
from sop_llm.streams.durability import Durability
from sop_llm.streams.entries import Entry, text
from sop_llm.streams.keys import TASK_GROUP, Keys
from sop_llm.streams.outcome_scripts import (
    ABANDON_SCRIPT,
    BEGIN_FIELDS,
    BEGIN_MANY_SCRIPT,
    FINISH_FIELDS,
    FINISH_MANY_SCRIPT,
    KEY_FIELDS,
)
from sop_llm.streams.scripts import RETRY_SCRIPT, EncodableT

log = logging.getLogger(__name__)

Verdict = Literal["run", "done", "duplicate", "conflict", "exhausted", "cancelled"]

_RESULT_TYPES = {
    "completed": EventType.TASK_COMPLETED,
    "failed": EventType.TASK_FAILED,
    "cancelled": EventType.TASK_CANCELLED,
    "expired": EventType.TASK_EXPIRED,
}


@dataclass(slots=True)
class Start:
    """What the worker knows about an entry before running it."""

    entry: Entry
    task_id: str
    model: str
    payload_hash: str = ""
    idempotency_key: str | None = None
    reply_to: str | None = None
    webhook_url: str | None = None
    max_attempts: int | None = None


@dataclass(slots=True)
class BeginReply:
    verdict: Verdict
    attempts: int = 0
    other: str = ""
    """``done``: the terminal state; ``duplicate``/``conflict``: the task that owns the key."""
    errors: tuple[ErrorInfo, ...] = ()
    """The errors of earlier attempts (retries), oldest first."""


@dataclass(slots=True)
class Finish:
    entry: Entry
    result: TaskResult
    reply_to: str | None = None
    idempotency_key: str | None = None
    webhook: WebhookJob | None = None
    dead: DeadLetter | None = None
    expect_state: str = ""
    """Write only if the task is in this state (cancelling a queued task); ``""``: any."""
    fenced: bool = False
    """The entry is malformed: it may end only a task that no other entry owns (else it gets
    only its own dead letter and acknowledgement)."""
    traceparent: str | None = None
    """Trace context for the results entry and webhook job; ``None``: the task entry's."""
    tracestate: str = ""


T = TypeVar("T")


class _Coalesced(Generic[T]):
    """Calls made in one event-loop tick go out together in one round trip. The write runs on
    its own: cancelling a caller never cuts it in half (the caller just stops waiting)."""

    def __init__(
        self,
        send: Callable[[list[T]], Awaitable[list[Any]]],
        *,
        timeout_s: float,
        clock: CallClock,
        what: str,
    ) -> None:
        self._send = send
        self._timeout_s = timeout_s
        self._clock = clock
        self._what = what
        self._queue: list[tuple[T, asyncio.Future[Any]]] = []
        self.writes: set[asyncio.Future[None]] = set()

    async def __call__(self, item: T) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if len(self._queue) == 1:
            # first in this tick: let the other callers of the tick join, then send them all
            self.writes.add(write := asyncio.ensure_future(self._flush()))
            write.add_done_callback(self.writes.discard)
        return await future

    async def _flush(self) -> None:
        # this task first runs on the loop's next pass: the callers of this pass are all queued
        batch, self._queue = self._queue, []
        try:
            async with asyncio.timeout(self._timeout_s):
                with self._clock.timing(self._what):
                    replies = await self._send([item for item, _ in batch])
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - handed to the callers
            # nothing of the batch is known to be written: every caller may try again (a cut
            # call counts as connection trouble; anything else is the callers' to judge)
            error = (
                RedisConnectionError(f"call cut short: {exc!r}")
                if isinstance(exc, asyncio.CancelledError)
                else exc
            )
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(error)
            return
        for (_, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue
            if isinstance(reply, Exception):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)


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
        write_timeout_s: float = 15.0,
        durability: Durability | None = None,
    ) -> None:
        """With ``durability``, each batch of terminal writes waits for that many replicas
        before its callers go on (and free their slots)."""
        self._client = client
        self._durability = durability or Durability()
        self._keys = keys
        self._worker = worker
        self._ttl = status_ttl_s
        self._max_attempts = max_attempts
        self._group = group
        self.clock = CallClock()
        """The begins and terminal writes out now (a stalled worker's tell)."""
        self._begin = _Coalesced(
            self._begin_many, timeout_s=write_timeout_s, clock=self.clock, what="begin"
        )
        self._finish = _Coalesced(
            self._finish_many, timeout_s=write_timeout_s, clock=self.clock, what="terminal write"
        )

    async def begin(self, starts: Sequence[Start], now_ms: int) -> list[BeginReply]:
        """Mark entries running. Verdicts: ``run``; ``done`` (already terminal, acked);
        ``duplicate`` (another entry owns the task or key, acked); ``conflict`` (the
        idempotency key holds another payload); ``exhausted`` (over the attempt limit);
        ``cancelled`` (a cancel came before the start). Raises a Redis error when the call
        failed (then nothing is known to have started) or ``ResponseError`` for an entry whose
        begin failed in Redis."""
        if len(starts) == 1:
            return [await self._begin((starts[0], now_ms))]
        return list(await asyncio.gather(*(self._begin((s, now_ms)) for s in starts)))

    async def retry(self, entry: Entry, task_id: str, *, due_ms: int, error: ErrorInfo) -> int:
        """Park a retry in the delayed set and acknowledge the entry, atomically.

        Returns 1 (scheduled), 0 (the task was already terminal) or -1 (a cancel was requested:
        nothing scheduled, the caller ends the task ``cancelled``)."""
        member = json.dumps(
            {"task_id": task_id, "stream": entry.stream, "entry_id": entry.entry_id,
             "data": (entry.data or b"").decode(), "traceparent": entry.traceparent},
            separators=(",", ":"),
        )  # fmt: skip
        reply = await RETRY_SCRIPT(
            self._client,
            [self._keys.task(task_id), self._keys.tasks_delayed, entry.stream],
            [self._group, entry.entry_id, member, due_ms, error.model_dump_json()],
        )
        return int(reply)

    async def finish(self, fin: Finish) -> int:
        """Write the terminal outcome. Returns 1 when written; 0 when the task was already
        terminal (another attempt won: only the entry is acknowledged, and dead-lettered if
        asked); -1 when ``expect_state`` did not hold (nothing written); -2 when the entry was
        fenced off another entry's task (only its dead letter and acknowledgement).

        The finishes of one event-loop tick go out as one script call. Raises a Redis error
        when the batch could not be written; nothing was written for this task then, and the
        caller may try again."""
        return int(await self._finish(fin))

    async def abandon(self, fin: Finish) -> bool:
        """Write ``fin``'s result to ``results`` and its dead letter, and acknowledge its entry,
        without touching the task's own keys (they refused the write). False when the entry was
        no longer pending (written by an earlier call)."""
        assert fin.dead is not None
        result = fin.result
        tp = (fin.entry.traceparent if fin.traceparent is None else fin.traceparent) or ""
        reply = await ABANDON_SCRIPT(
            self._client,
            [self._keys.results, self._keys.dead, fin.entry.stream],
            [self._group, fin.entry.entry_id, _RESULT_TYPES[result.state.value].value,
             result.model_dump_json(exclude_none=True), fin.dead.model_dump_json(exclude_none=True),
             tp, fin.entry.correlation_id],
        )  # fmt: skip
        return bool(reply)

    async def drain(self, timeout: float = 15.0) -> None:
        """Wait for the begins and terminal writes under way (at shutdown)."""
        writes = self._begin.writes | self._finish.writes
        if writes:
            await asyncio.wait(writes, timeout=timeout)

    async def _begin_many(self, batch: list[tuple[Start, int]]) -> list[Any]:
        # one `now` per call: the earliest of the batch
        b = _Batch(self._keys, [self._group, self._worker, min(n for _, n in batch), self._ttl])
        b.args.append(len(batch))
        for s, _ in batch:
            b.add(BEGIN_FIELDS, {
                "status": self._keys.task(s.task_id), "source": s.entry.stream,
                "idem": self._keys.idem(s.idempotency_key) if s.idempotency_key else None,
                "entry_id": s.entry.entry_id, "task_id": s.task_id,
                "max_attempts": s.max_attempts or self._max_attempts, "model": s.model,
                "payload_hash": s.payload_hash, "created_ms": s.entry.timestamp_ms,
                "reply_to": s.reply_to or "", "webhook_url": s.webhook_url or "",
                "correlation_id": s.entry.correlation_id,
            })  # fmt: skip
        replies = await BEGIN_MANY_SCRIPT(self._client, b.keys, b.args)
        return [_begin_reply(r) for r in replies]

    async def _finish_many(self, batch: list[Finish]) -> list[Any]:
        b = _Batch(self._keys, [self._group, self._ttl, len(batch)])
        k = self._keys
        for fin in batch:
            result = fin.result
            b.add(FINISH_FIELDS, {
                "status": k.task(result.task_id), "source": fin.entry.stream,
                "reply": k.results_for(fin.reply_to) if fin.reply_to else None,
                "idem": k.idem(fin.idempotency_key) if fin.idempotency_key is not None else None,
                "entry_id": fin.entry.entry_id, "task_id": result.task_id,
                "state": result.state.value, "event_type": _RESULT_TYPES[result.state.value].value,
                "result": result.model_dump_json(exclude_none=True),
                "finished_at": result.finished_at, "worker": result.worker,
                "attempts": result.attempts,
                "traceparent": (
                    fin.entry.traceparent if fin.traceparent is None else fin.traceparent
                ) or "",
                "webhook": fin.webhook.model_dump_json(exclude_none=True) if fin.webhook else "",
                "dead": fin.dead.model_dump_json(exclude_none=True) if fin.dead else "",
                "expect": fin.expect_state, "fence": "1" if fin.fenced else "",
                "correlation_id": fin.entry.correlation_id,
            })  # fmt: skip
        replies, acked = await self._durability.call(
            self._client, FINISH_MANY_SCRIPT, b.keys, b.args
        )
        if acked is not None and acked < self._durability.replicas:
            log.warning(
                "outcomes written to the master, not yet to enough replicas",
                extra={"acked": acked, "wanted": self._durability.replicas, "count": len(batch)},
            )
        return [ResponseError(text(r)) if isinstance(r, bytes | str) else int(r) for r in replies]


def _begin_reply(reply: Any) -> BeginReply | ResponseError:
    verdict = text(reply[0])
    value = reply[1]
    if verdict == "error":
        return ResponseError(f"begin failed: {text(value)}")
    if verdict in ("run", "exhausted"):
        raw = json.loads(text(reply[2]) or "[]")
        errors = tuple(ErrorInfo.model_validate(e) for e in raw)
        return BeginReply(verdict, attempts=int(value), errors=errors)  # type: ignore[arg-type]
    if verdict == "cancelled":
        return BeginReply("cancelled", attempts=int(value))
    return BeginReply(verdict, other=text(value))  # type: ignore[arg-type]


class _Batch:
    """KEYS and ARGV of a batch script. KEYS: the four every terminal write may touch
    (results, webhooks, dead, reply-streams set), then each task's own, once each, by index.
    ARGV: the fixed arguments, then each task's values as a JSON object of its field list."""

    __slots__ = ("_index", "args", "keys")

    def __init__(self, keys: Keys, fixed: list[EncodableT]) -> None:
        self.keys = [keys.results, keys.webhooks, keys.dead, keys.reply_streams]
        self._index: dict[str, int] = {}
        self.args = fixed

    def key(self, name: str | None) -> int:
        if name is None:
            return 0
        found = self._index.get(name)
        if found is None:
            self.keys.append(name)
            found = self._index[name] = len(self.keys)  # Lua indexes from 1
        return found

    def add(self, names: Sequence[str], values: Mapping[str, Any]) -> None:
        """One task's values, as one JSON object with exactly the fields ``names`` (strings, so
        that Lua reads numbers such as times exactly, not as floats)."""
        doc = {n: self.key(values[n]) if n in KEY_FIELDS else str(values[n]) for n in names}
        self.args.append(json.dumps(doc, separators=(",", ":")))


def webhook_job(result: TaskResult, url: str) -> WebhookJob:
    """The delivery job for a task's outcome; its id stays the same across delivery retries."""
    return WebhookJob(
        delivery_id=f"msg_{uuid.uuid4().hex}",
        task_id=result.task_id,
        url=url,
        event=f"task.{result.state.value}",
        payload=result,
        created_at=result.finished_at,
    )
