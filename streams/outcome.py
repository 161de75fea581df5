"""Starting an entry and writing its one terminal outcome.

``begin`` runs for a whole read batch in one round trip; ``finish`` calls made in the same
event-loop tick are written together in one script call (one round trip), each atomically:
status, ``results`` (and the ``reply_to`` copy), the webhook job, the dead letter and the XACK.
An entry whose outcome is known before it starts (an instant model) carries it into ``begin``,
which writes it in the same step when this is the task's first attempt: one round trip for the
whole life of the task.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from schemas.result import DeadLetter, ErrorInfo, TaskResult, WebhookJob
from schemas.wire import EventType
from streams.entries import Entry, text
from streams.keys import TASK_GROUP, Keys
from streams.link import Link
from streams.outcome_scripts import BEGIN_MANY_SCRIPT, FINISH_MANY_SCRIPT
from streams.scripts import RETRY_SCRIPT, EncodableT

Verdict = Literal["run", "finished", "done", "duplicate", "conflict", "exhausted", "cancelled"]

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
    finish: Finish | None = None
    """The outcome, already computed: written by ``begin`` itself on the first attempt (the
    verdict is then ``finished``); on a later attempt ``begin`` answers ``run`` as usual."""


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
    traceparent: str | None = None
    """Trace context for the results entry and webhook job; ``None``: the task entry's."""
    tracestate: str = ""


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
        link: Link | None = None,
    ) -> None:
        """With a ``link`` (``streams/link.py``), begins and finishes go through it."""
        self._client = client
        self._link = link
        self._keys = keys
        self._worker = worker
        self._ttl = status_ttl_s
        self._max_attempts = max_attempts
        self._group = group
        self._queue: list[tuple[Finish, asyncio.Future[int]]] = []
        self._writes: set[asyncio.Future[None]] = set()
        self._write_timeout_s = write_timeout_s

    async def begin(self, starts: Sequence[Start], now_ms: int) -> list[BeginReply]:
        """Mark entries running (one round trip). Verdicts: ``run``; ``finished`` (the start's
        ``finish`` was written: the task is over); ``done`` (already terminal, acked);
        ``duplicate`` (another entry owns the task or key, acked); ``conflict`` (the
        idempotency key holds another payload); ``exhausted`` (over the attempt limit);
        ``cancelled`` (a cancel came before the start)."""
        return await self.send_begin(starts, now_ms)

    def send_begin(self, starts: Sequence[Start], now_ms: int) -> Awaitable[list[BeginReply]]:
        """:meth:`begin`, its command sent before this returns when the worker's link is
        connected (on the latency path nothing waits on the event loop before it leaves)."""
        if not starts:
            return _no_replies()
        keys, args = self.begin_command(starts, now_ms)
        return _begin_replies(BEGIN_MANY_SCRIPT.send(self._link or self._client, keys, args))

    def begin_command(
        self, starts: Sequence[Start], now_ms: int
    ) -> tuple[list[str], list[EncodableT]]:
        """The KEYS and ARGV of ``BEGIN_MANY`` for ``starts``, as :meth:`send_begin` sends them."""
        b = _Batch(self._keys, [self._group, self._worker, now_ms, self._ttl, len(starts)])
        key, args = b.key, b.args
        for s in starts:
            idem = key(self._keys.idem(s.idempotency_key)) if s.idempotency_key is not None else 0
            args += (
                key(self._keys.task(s.task_id)), key(s.entry.stream), idem,
                s.entry.entry_id, s.task_id, s.max_attempts or self._max_attempts,
                s.model, s.payload_hash, s.entry.timestamp_ms,
                s.reply_to or "", s.webhook_url or "", 1 if s.finish is not None else 0,
            )  # fmt: skip
            if s.finish is not None:
                self._finish_args(s.finish, b)
        return b.keys, b.args

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
        asked); -1 when ``expect_state`` did not hold (nothing written).

        The finishes of one event-loop tick go out as one script call. The write runs on its
        own: cancelling a caller never cuts it in half (the caller just stops waiting). Raises a
        Redis error when the batch could not be written; nothing was written for this task
        then, and the caller may try again."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((fin, future))
        if len(self._queue) == 1:
            # first in this tick: let the other finishers of the tick join, then write them all
            self._writes.add(write := asyncio.ensure_future(self._write_soon()))
            write.add_done_callback(self._writes.discard)
        return await future

    async def drain(self, timeout: float = 15.0) -> None:
        """Wait for the terminal writes under way (at shutdown)."""
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout)

    async def _write_soon(self) -> None:
        await asyncio.sleep(0)
        batch, self._queue = self._queue, []
        try:
            async with asyncio.timeout(self._write_timeout_s):
                replies = await FINISH_MANY_SCRIPT(
                    self._link or self._client, *self._finish_many(batch)
                )
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - handed to the callers
            # nothing of the batch is known to be written: every caller retries (a task the
            # script did finish answers 0, "already terminal", on the retry)
            error = (
                exc
                if isinstance(exc, RedisError)
                else RedisConnectionError(f"terminal write failed: {exc!r}")
            )
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(error)
            return
        for (_, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue
            if isinstance(reply, bytes | str):
                fut.set_exception(ResponseError(text(reply)))
            else:
                fut.set_result(int(reply))

    def _finish_args(self, fin: Finish, b: _Batch) -> None:
        """One task's terminal write, as the scripts' ``finish_one`` takes it."""
        k = self._keys
        key = b.key
        result = fin.result
        b.args += (
            key(k.task(result.task_id)),
            key(fin.entry.stream),
            key(k.results_for(fin.reply_to)) if fin.reply_to else 0,
            key(k.idem(fin.idempotency_key)) if fin.idempotency_key is not None else 0,
            fin.entry.entry_id,
            result.task_id,
            result.state.value,
            _RESULT_TYPES[result.state.value].value,
            result.model_dump_json(exclude_none=True),
            result.finished_at,
            (fin.entry.traceparent if fin.traceparent is None else fin.traceparent) or "",
            fin.webhook.model_dump_json(exclude_none=True) if fin.webhook else "",
            fin.dead.model_dump_json(exclude_none=True) if fin.dead else "",
            fin.expect_state,
        )

    def _finish_many(
        self, batch: list[tuple[Finish, asyncio.Future[int]]]
    ) -> tuple[list[str], list[EncodableT]]:
        b = _Batch(self._keys, [self._group, self._ttl, len(batch)])
        for fin, _ in batch:
            self._finish_args(fin, b)
        return b.keys, b.args


async def _no_replies() -> list[BeginReply]:
    return []


async def _begin_replies(sent: Awaitable[Any]) -> list[BeginReply]:
    replies = await sent
    out = []
    for reply in replies:
        verdict = text(reply[0])
        if verdict == "error":
            raise ResponseError(f"begin failed: {text(reply[1])}")
        value = reply[1]
        if verdict == "finished":
            out.append(BeginReply("finished", attempts=int(value)))
        elif verdict in ("run", "exhausted"):
            raw = json.loads(text(reply[2]) or "[]")
            errors = tuple(ErrorInfo.model_validate(e) for e in raw)
            out.append(BeginReply(verdict, attempts=int(value), errors=errors))  # type: ignore[arg-type]
        elif verdict == "cancelled":
            out.append(BeginReply("cancelled", attempts=int(value)))
        else:
            out.append(BeginReply(verdict, other=text(value)))  # type: ignore[arg-type]
    return out


class _Batch:
    """KEYS and ARGV of a batch script. KEYS: the four every terminal write may touch
    (results, webhooks, dead, reply-streams set), then each task's own, once each, by index.
    ARGV: the fixed arguments (the task count last), then each task's positional values, the
    documents (result, webhook job, dead letter) among them as they are: neither side escapes
    or parses them a second time."""

    __slots__ = ("_index", "args", "keys")

    def __init__(self, keys: Keys, fixed: list[EncodableT]) -> None:
        self.keys = [keys.results, keys.webhooks, keys.dead, keys.reply_streams]
        self._index: dict[str, int] = {}
        self.args = fixed

    def key(self, name: str) -> int:
        found = self._index.get(name)
        if found is None:
            self.keys.append(name)
            found = self._index[name] = len(self.keys)  # Lua indexes from 1
        return found


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
