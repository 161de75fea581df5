"""Token deltas of a streaming task: ``{ns}:tokens:<id>``.

Entries: ``type=token.delta`` with ``data={"v":1,"text":...}`` (deltas batched every few ms,
not one round trip per token), then one ``type=token.end`` with
``data={"v":1,"state":...,"finish_reason":...}`` written after the task's outcome. The stream
expires ``ttl_s`` after its last write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Self

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sop_llm.schemas.result import TERMINAL_STATES, TaskState
from sop_llm.streams.cancellation import raise_if_cancelled
from sop_llm.streams.entries import entries_from_read
from sop_llm.streams.keys import Keys
from sop_llm.streams.status import read_status

DELTA = "token.delta"
END = "token.end"


@dataclass(frozen=True, slots=True)
class TokenEvent:
    kind: Literal["delta", "end"]
    text: str = ""
    state: str | None = None
    finish_reason: str | None = None


class TokenWriter:
    """Collects deltas and appends them in batches (every ``flush_ms``) while the task runs."""

    def __init__(
        self, *, client: Redis, keys: Keys, task_id: str, ttl_s: int = 3600, flush_ms: int = 20
    ) -> None:
        self._client = client
        self._key = keys.task_tokens(task_id)
        self._ttl = ttl_s
        self._flush_s = flush_ms / 1000
        self._buffer: list[str] = []
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False

    def add(self, text: str) -> None:
        """Queue a delta (sync: usable as a provider's ``on_delta``)."""
        self._buffer.append(text)
        self._wake.set()

    async def __aenter__(self) -> Self:
        self._flusher = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        self._wake.set()
        if self._flusher is not None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._flusher), 5)
            self._flusher.cancel()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._closing:
                await asyncio.sleep(self._flush_s)  # gather the tokens of the next few ms
            await self._flush()
            if self._closing and not self._buffer:
                return

    async def _flush(self) -> None:
        if not self._buffer:
            return
        text, self._buffer = "".join(self._buffer), []
        pipe = self._client.pipeline(transaction=False)
        pipe.xadd(self._key, {"type": DELTA, "data": json.dumps({"v": 1, "text": text})})
        pipe.expire(self._key, self._ttl)
        async with asyncio.timeout(5):
            await pipe.execute()


@dataclass(frozen=True, slots=True)
class TokenStreams:
    """Where a worker writes the token streams of the tasks that ask for them."""

    client: Redis
    keys: Keys
    ttl_s: int = 3600
    flush_ms: int = 20

    def writer(self, task_id: str) -> TokenWriter:
        return TokenWriter(
            client=self.client,
            keys=self.keys,
            task_id=task_id,
            ttl_s=self.ttl_s,
            flush_ms=self.flush_ms,
        )

    async def end(self, task_id: str, *, state: str, finish_reason: str | None) -> None:
        """The closing entry, written after the task's outcome."""
        key = self.keys.task_tokens(task_id)
        pipe = self.client.pipeline(transaction=False)
        body = {"v": 1, "state": state, "finish_reason": finish_reason}
        pipe.xadd(key, {"type": END, "data": json.dumps(body)})
        pipe.expire(key, self.ttl_s)
        async with asyncio.timeout(5):
            await pipe.execute()


async def read_tokens(
    client: Redis, keys: Keys, task_id: str, *, block_ms: int = 1000
) -> AsyncIterator[TokenEvent]:
    """Every delta from the start (a late reader gets what was already generated), then new
    ones as they come, ending with the ``end`` event. A finished task without a token stream
    (it did not ask for streaming) yields its whole text as one delta, then the end."""
    key = keys.task_tokens(task_id)
    last = "0-0"
    ended = False
    while True:
        # once the task is known to be over, one last non-blocking read drains what is left
        reply = await client.xread({key: last}, count=500, block=None if ended else block_ms)
        raise_if_cancelled()
        for entry in entries_from_read(reply):
            last = entry.entry_id
            body = json.loads(entry.data or b"{}")
            if entry.type == END:
                yield TokenEvent(
                    "end", state=body.get("state"), finish_reason=body.get("finish_reason")
                )
                return
            yield TokenEvent("delta", text=str(body.get("text", "")))
        if reply:
            continue
        # nothing new for a while: has the task ended without an end entry (or a stream)?
        record = await read_status(client, keys, task_id)
        if record is None or record.state not in TERMINAL_STATES:
            continue
        if not ended:
            ended = True  # deltas are flushed before the outcome: read once more, then stop
            continue
        if last == "0-0" and record.result is not None and record.result.text:
            yield TokenEvent("delta", text=record.result.text)
        reason = record.result.finish_reason if record.result else None
        yield TokenEvent("end", state=TaskState(record.state).value, finish_reason=reason)
        return
