"""The Python producer SDK: a convenience over the wire format, not a requirement.

async with Producer(settings) as p:
    task_id = await p.submit("echo", "hello world", priority="high")
    result = await p.wait(task_id, timeout=30)

Every error it raises is one of sop-llm's (:class:`~schemas.errors.SopError`): redis-py's are
translated here, once, into :class:`~schemas.errors.BrokerUnavailableError` (passing trouble)
or :class:`~schemas.errors.BrokerError` (a refusal), the original kept as ``__cause__``.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Self, Unpack

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Tracer
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from sop_llm.schemas.errors import (
    BacklogFullError,
    BrokerError,
    BrokerUnavailableError,
    DuplicateTaskIdError,
    IdempotencyConflictError,
    InvalidTaskError,
    NotReplicatedError,
    SopError,
    WaitTimeoutError,
)
from sop_llm.schemas.result import StatusRecord, TaskResult
from sop_llm.schemas.task import (
    CTX_MAX_METADATA_BYTES,
    CTX_MAX_PROMPT_BYTES,
    DEFAULT_MAX_METADATA_BYTES,
    DEFAULT_MAX_PROMPT_BYTES,
    TaskEvent,
    TaskFields,
    TaskId,
    describe_validation_error,
)
from sop_llm.schemas.wire import EventType
from sop_llm.streams.cancellation import raise_if_cancelled
from sop_llm.streams.control import CancelOutcome, cancel_task
from sop_llm.streams.durability import Durability
from sop_llm.streams.entries import entries_from_range, entries_from_read, text
from sop_llm.streams.errors import TRANSIENT_ERRORS, describe
from sop_llm.streams.keys import DEFAULT_NAMESPACE, DEFAULT_PARTITIONS, DEFAULT_POOL, Keys
from sop_llm.streams.scripts import SUBMIT_SCRIPT
from sop_llm.streams.status import read_status
from sop_llm.streams.tokens import read_tokens
from sop_llm.streams.tracecontext import current_traceparent
from sop_llm.streams.urlguard import check_webhook_url


@dataclass(frozen=True, slots=True)
class ProducerConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "sop"
    pool: str = DEFAULT_POOL
    partitions: Sequence[str] = DEFAULT_PARTITIONS
    default_priority: str = "normal"
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES
    webhook_allow: Sequence[str] = ()
    """Hosts or networks a ``webhook_url`` may point at although the SSRF rules refuse them."""
    max_backlog: int = 0
    """Refuse submissions while a partition holds this many unfinished entries (0: no limit)."""
    status_ttl_s: int = 86_400
    socket_timeout_s: float = 30.0
    durability: Durability = field(default_factory=Durability)
    """Replicas that must hold a submission before ``submit`` returns (see
    docs/reliability.md); 0: the master's acknowledgement."""


class HasProducerConfig(Protocol):
    def producer_config(self) -> ProducerConfig: ...


@contextlib.contextmanager
def _broker_errors() -> Iterator[None]:
    """The SDK's edge: redis-py's errors leave it as sop-llm's, the original as ``__cause__``."""
    try:
        yield
    except SopError:
        raise  # ours already (WaitTimeoutError is a TimeoutError too: never translated)
    except TRANSIENT_ERRORS as exc:
        raise BrokerUnavailableError(f"redis is unavailable: {describe(exc)}") from exc
    except RedisError as exc:
        raise BrokerError(f"redis refused the request: {describe(exc)}") from exc


class Producer:
    """Submits tasks and reads their outcomes. Use as an async context manager.

    Every method that talks to Redis raises :class:`~schemas.errors.BrokerUnavailableError`
    while Redis cannot be reached and :class:`~schemas.errors.BrokerError` when it refuses a
    command, besides the errors each method names."""

    def __init__(
        self,
        config: ProducerConfig | HasProducerConfig | None = None,
        *,
        client: Redis | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._tracer = tracer or trace.get_tracer("sop_llm.producer")
        if config is None:
            config = ProducerConfig()
        elif not isinstance(config, ProducerConfig):
            config = config.producer_config()
        self._config = config
        self.keys = Keys(config.namespace)
        self._own_client = client is None
        self._client = client or Redis.from_url(
            config.redis_url,
            socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=10,
            health_check_interval=30,
        )

    @property
    def client(self) -> Redis:
        return self._client

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_client:
            with _broker_errors():
                await self._client.aclose()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        pool: str = DEFAULT_POOL,
        **config: Any,
    ) -> Self:
        """A producer for the Redis at ``url`` (``redis://``, ``rediss://``, ``unix://``);
        ``config``: other :class:`ProducerConfig` fields (``partitions``, ``durability``...)."""
        return cls(ProducerConfig(redis_url=url, namespace=namespace, pool=pool, **config))

    def build(
        self, model: str, prompt: str | None = None, **fields: Unpack[TaskFields]
    ) -> TaskEvent:
        """Validate a task as :meth:`submit` would. Raises :class:`InvalidTaskError`."""
        try:
            return TaskEvent.model_validate(
                {"model": model, "prompt": prompt, **fields},
                context={
                    CTX_MAX_PROMPT_BYTES: self._config.max_prompt_bytes,
                    CTX_MAX_METADATA_BYTES: self._config.max_metadata_bytes,
                },
            )
        except ValidationError as exc:
            raise InvalidTaskError(describe_validation_error(exc)) from exc

    async def submit(
        self, model: str | TaskEvent, prompt: str | None = None, **fields: Unpack[TaskFields]
    ) -> TaskId:
        """Publish a task and return its id.

        ``fields`` are any :class:`~schemas.task.TaskEvent` fields (``messages``, ``priority``,
        ``temperature``, ``idempotency_key``...). With an ``idempotency_key``, a second submission
        of the same payload returns the first task's id and runs nothing.

        Raises :class:`InvalidTaskError` (bad field, unknown partition),
        :class:`IdempotencyConflictError` (key bound to another payload) and
        :class:`DuplicateTaskIdError` (``task_id`` already in use by another payload; the same
        payload under the same ``task_id`` again is accepted once, so a resend after a lost reply
        is safe).
        """
        event = model if isinstance(model, TaskEvent) else self.build(model, prompt, **fields)
        if event.webhook_url is not None:
            # what the URL alone shows to be unsafe is refused now; names are vetted at delivery
            check_webhook_url(event.webhook_url, self._config.webhook_allow)
        priority = event.priority or self._config.default_priority
        if priority not in self._config.partitions:
            have = ", ".join(self._config.partitions)
            raise InvalidTaskError(f"priority: {priority!r} is not a partition (have {have})")
        task_id = event.task_id or f"t-{uuid.uuid4().hex}"
        if event.task_id is None:
            event = event.model_copy(update={"task_id": task_id})
        stream = self.keys.tasks(event.pool or self._config.pool, priority)
        with self._tracer.start_as_current_span(
            f"publish {stream}", kind=SpanKind.PRODUCER,
            attributes={"messaging.system": "redis", "messaging.operation.type": "send",
                        "messaging.destination.name": stream, "sop.task_id": task_id},
        ), _broker_errors():  # fmt: skip
            return await self._publish(event, task_id, stream, current_traceparent()[0])

    async def _publish(
        self, event: TaskEvent, task_id: str, stream: str, traceparent: str
    ) -> TaskId:
        keys = [stream, self.keys.task(task_id)]
        if event.idempotency_key is not None:
            keys.append(self.keys.idem(event.idempotency_key))
        durability = self._config.durability
        reply, acked = await durability.call(
            self._client,
            SUBMIT_SCRIPT,
            keys,
            [
                task_id,
                event.payload_hash(),
                EventType.TASK_SUBMITTED.value,
                event.to_wire(),
                event.model,
                int(time.time() * 1000),
                traceparent,
                event.reply_to or "",
                event.webhook_url or "",
                self._config.max_backlog,
            ],
        )
        verdict, owner = text(reply[0]), text(reply[1])
        if verdict == "conflict":
            raise IdempotencyConflictError(
                f"idempotency_key {event.idempotency_key!r} is already bound to a task with a "
                "different payload"
            )
        if verdict == "exists":
            raise DuplicateTaskIdError(f"task_id {owner!r} is already in use")
        if verdict == "backlog":
            raise BacklogFullError(
                f"partition {stream} holds {owner} unfinished tasks, at the limit of "
                f"{self._config.max_backlog}: try again later"
            )
        if acked is not None and acked < durability.replicas:
            raise NotReplicatedError(
                f"task {owner} is on the master, but {acked} of {durability.replicas} replicas "
                f"acknowledged it within {durability.timeout_ms} ms: a failover now could lose "
                "it (submit it again, with the same task_id or idempotency_key, to be sure)",
                task_id=owner,
            )
        return TaskId(owner)

    async def cancel(self, task_id: str) -> CancelOutcome:
        """Cancel a task: a queued one ends ``cancelled`` at once; a running one stops between
        tokens; a finished or unknown one is left alone (the outcome says which)."""
        with _broker_errors():
            return await cancel_task(
                self._client, self.keys, task_id, status_ttl_s=self._config.status_ttl_s
            )

    async def stream(self, task_id: str) -> AsyncGenerator[str, None]:
        """The text of a task as it is generated (from the start, also for a late reader);
        ends when the task does. A task that did not ask for ``stream`` yields its whole text
        once it has finished."""
        with _broker_errors():
            async for event in read_tokens(self._client, self.keys, task_id):
                if event.kind == "delta":
                    yield event.text

    async def status(self, task_id: str) -> StatusRecord | None:
        """The task's status record; ``None`` when unknown (never submitted, or expired)."""
        with _broker_errors():
            return await read_status(self._client, self.keys, task_id)

    async def wait(self, task_id: str, *, timeout: float) -> TaskResult:
        """The terminal result of ``task_id``. Raises :class:`WaitTimeoutError` after ``timeout`` s.

        Watches the shared ``results`` stream; services that wait on many tasks read their own
        ``reply_to`` stream with :meth:`results` instead."""
        with _broker_errors():
            return await self._wait(task_id, timeout)

    async def _wait(self, task_id: str, timeout: float) -> TaskResult:
        deadline = time.monotonic() + timeout
        newest = entries_from_range(
            self.keys.results, await self._client.xrevrange(self.keys.results, count=1)
        )
        last = newest[0].entry_id if newest else "0-0"
        record = await read_status(self._client, self.keys, task_id)
        if record is not None and record.result is not None:
            return record.result
        needle = json.dumps(task_id).encode()
        while (left := deadline - time.monotonic()) > 0:
            reply = await self._client.xread(
                {self.keys.results: last}, count=500, block=max(1, int(min(left, 2.0) * 1000))
            )
            raise_if_cancelled()
            for entry in entries_from_read(reply):
                last = entry.entry_id
                data = entry.data or b""
                if needle in data:
                    result = TaskResult.model_validate_json(data)
                    if result.task_id == task_id:
                        return result
        raise WaitTimeoutError(f"task {task_id} did not finish within {timeout} s")

    async def results(
        self,
        *,
        reply_to: str | None = None,
        group: str | None = None,
        consumer: str = "sdk",
        start: str = "$",
        block_ms: int = 2000,
    ) -> AsyncGenerator[TaskResult, None]:
        """Results as they arrive, forever. Each blocking read waits up to ``block_ms``: keep it
        below the client's socket timeout (sop-llm's clients time out 4 s after 2 s reads).

        With ``group``, read through that consumer group (created on first use, from the start of
        the stream): at least once. A result is acknowledged when the loop asks for the next one;
        one the loop did not finish with (a ``break``, a crash) stays pending and is delivered
        again first by the next ``results()`` of the same group and consumer."""
        stream = self.keys.results_for(reply_to) if reply_to else self.keys.results
        with _broker_errors():
            if group is not None:
                try:
                    await self._client.xgroup_create(stream, group, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
            last = start
            backlog = True  # a group consumer first re-reads what it left unacknowledged
            while True:
                reply: Any
                if group is None:
                    reply = await self._client.xread({stream: last}, count=100, block=block_ms)
                else:
                    reply = await self._client.xreadgroup(
                        group, consumer, {stream: "0" if backlog else ">"}, count=100,
                        block=None if backlog else block_ms,
                    )  # fmt: skip
                raise_if_cancelled()
                entries = entries_from_read(reply)
                if group is not None and backlog and not entries:
                    backlog = False
                    continue
                for entry in entries:
                    last = entry.entry_id
                    yield TaskResult.model_validate_json(entry.data or b"")
                    if group is not None:
                        await self._client.xack(stream, group, entry.entry_id)
