"""A real FastStream app against a real worker: its own ``publish`` runs, its own ``StreamSub``
reads the outcomes in one documented shape, and its bad envelopes fail alone and clearly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.annotations import RedisStreamMessage
from faststream.redis.parser import BinaryMessageFormatV1
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer
from pydantic import BaseModel
from redis.asyncio import Redis

from sop_llm.handlers.tasks.prepare import _BODY_NOT_OBJECT
from sop_llm.providers.base import ProviderError
from sop_llm.providers.registry import ModelRegistry
from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.result import DeadLetter, TaskResult, TaskState
from sop_llm.streams.entries import text
from sop_llm.streams.envelopes import (
    FIELD_ENVELOPE,
    SHAPES,
    EnvelopeError,
    decode_envelope,
    encode_envelope,
)
from sop_llm.streams.envelopes import results_parser as parser
from sop_llm.streams.keys import Keys
from sop_llm.streams.status import read_status
from tests.conftest import ROOT, RedisServer, wait_for
from tests.fakes import ScriptedProvider
from tests.harness import running_worker, stream_entries, wait_results, xadd_task

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACE_ID = TP.split("-")[1]
Seen = tuple[TaskResult, dict[str, Any], str]


def tracing() -> tuple[Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


@contextlib.asynccontextmanager
async def started(broker: RedisBroker) -> AsyncIterator[RedisBroker]:
    async with broker:
        await broker.start()
        yield broker


async def test_a_publish_completes_under_its_task_id_and_reaches_a_faststream_group(
    client: Redis, keys: Keys, redis_url: str
) -> None:
    """The issue's acceptance: FastStream's own publish, FastStream's own consumer group."""
    seen: asyncio.Queue[Seen] = asyncio.Queue()
    app = RedisBroker(redis_url)
    reply = keys.results_for("billing")

    @app.subscriber(
        stream=StreamSub(reply, group="billing", consumer="b1", last_id="0"), parser=parser
    )
    async def on_result(result: TaskResult, msg: RedisStreamMessage) -> None:
        await seen.put((result, dict(msg.headers), msg.correlation_id))

    task = {"task_id": "fs-1", "model": "echo", "prompt": "hello from faststream",
            "max_tokens": 3, "reply_to": "billing"}  # fmt: skip
    tracer, spans = tracing()
    async with running_worker(client, keys, tracer=tracer), started(app):
        await app.publish(
            task, stream=keys.tasks("default", "normal"), correlation_id="order-42",
            headers={"traceparent": TP},
        )  # fmt: skip
        result, headers, correlation_id = await asyncio.wait_for(seen.get(), 15)
        # acknowledged once the handler returned
        await wait_for(lambda: _pending(client, reply, "billing", 0), 5)
    assert (result.task_id, result.state, result.text) == (
        "fs-1", TaskState.COMPLETED, "hello from faststream",
    )  # fmt: skip
    assert correlation_id == "order-42"
    assert headers["type"] == "task.completed" and headers["correlation_id"] == "order-42"
    # the publisher's trace goes on: the worker's span hangs under the header's
    [process] = [s for s in spans.get_finished_spans() if s.name.startswith("process ")]
    assert process.parent is not None
    assert (format(process.parent.trace_id, "032x"), format(process.parent.span_id, "016x")) == (
        TRACE_ID, TP.split("-")[2],
    )  # fmt: skip
    assert headers["traceparent"].split("-")[1] == TRACE_ID
    status = await read_status(client, keys, "fs-1")
    assert status is not None and status.state == TaskState.COMPLETED
    assert await client.hget(keys.task("fs-1"), "correlation_id") == b"order-42"
    # the plain wire format is unchanged, with the correlation id as one more field
    for stream in (keys.results, reply):
        [entry] = await stream_entries(client, stream)
        assert set(entry.fields) == {"type", "data", "traceparent", "correlation_id"}
        assert entry.type == "task.completed" and entry.correlation_id == "order-42"
        assert TaskResult.model_validate_json(entry.data or b"") == result


async def _pending(client: Redis, stream: str, group: str, count: int) -> bool:
    return int((await client.xpending(stream, group))["pending"]) == count


class Ask(BaseModel):
    model: str
    prompt: str
    max_tokens: int


async def test_plain_and_batch_subscribers_read_one_shape(
    client: Redis, keys: Keys, redis_url: str
) -> None:
    """A pydantic model published with no task id (the derived id, FastStream's own correlation
    id) and two plain-XADD tasks (one with a correlation id, one without: its task id stands in),
    read by a plain and a batch subscriber of ``results``."""
    plain: asyncio.Queue[Seen] = asyncio.Queue()
    batches: list[tuple[list[TaskResult], list[dict[str, Any]], str]] = []
    app = RedisBroker(redis_url)

    @app.subscriber(stream=StreamSub(keys.results, last_id="0"), parser=parser)
    async def one(result: TaskResult, msg: RedisStreamMessage) -> None:
        await plain.put((result, dict(msg.headers), msg.correlation_id))

    @app.subscriber(stream=StreamSub(keys.results, batch=True, last_id="0"), parser=parser)
    async def many(results: list[TaskResult], msg: RedisStreamMessage) -> None:
        batches.append((results, [dict(h) for h in msg.batch_headers], msg.correlation_id))

    async with running_worker(client, keys), started(app):
        published = await app.publish(
            Ask(model="echo", prompt="no id given", max_tokens=3),
            stream=keys.tasks("default", "high"),
        )
        await xadd_task(client, keys, {"task_id": "plain-1", "model": "echo", "prompt": "p"})
        # a plain entry may name its correlation id too
        plain_2 = json.dumps({"task_id": "plain-2", "model": "echo", "prompt": "p"})
        await client.xadd(
            keys.tasks("default", "low"),
            {"type": "task.submitted", "data": plain_2, "correlation_id": "cid-2"},
        )
        got = [await asyncio.wait_for(plain.get(), 15) for _ in range(3)]
        await wait_for(lambda: sum(len(b[0]) for b in batches) == 3, 15)
    [task_entry] = await stream_entries(client, keys.tasks("default", "high"))
    sent = decode_envelope(task_entry.fields[FIELD_ENVELOPE]).headers["correlation_id"]
    derived = f"default.high.{text(published)}"
    expected = {derived: sent, "plain-1": "plain-1", "plain-2": "cid-2"}
    by_id = {r.task_id: (r, h, c) for r, h, c in got}
    assert set(by_id) == set(expected)
    for task_id, (result, headers, correlation_id) in by_id.items():
        assert result.state == TaskState.COMPLETED
        assert correlation_id == expected[task_id]
        assert headers == {
            "content-type": "application/json",
            "type": "task.completed",
            "correlation_id": expected[task_id],
        }
    # the batch subscriber: the same results, the same headers, entry by entry
    flat = [(r, h) for results, hs, _ in batches for r, h in zip(results, hs, strict=True)]
    assert {r.task_id: (r, h) for r, h in flat} == {t: (r, h) for t, (r, h, _) in by_id.items()}
    for results, _, correlation_id in batches:
        assert correlation_id == expected[results[0].task_id]


async def test_without_the_parser_faststream_reads_these_shapes(
    client: Redis, keys: Keys, redis_url: str
) -> None:
    """What docs/wire-format.md says a StreamSub gets by itself (FastStream's fallback): the
    result JSON without `type` or `traceparent` in plain mode, raw field maps in batch mode."""
    plain: asyncio.Queue[tuple[Any, dict[str, Any]]] = asyncio.Queue()
    batch: asyncio.Queue[Any] = asyncio.Queue()
    app = RedisBroker(redis_url)

    @app.subscriber(stream=StreamSub(keys.results, last_id="0"))
    async def one(body: Any, msg: RedisStreamMessage) -> None:
        await plain.put((body, dict(msg.headers)))

    @app.subscriber(stream=StreamSub(keys.results, batch=True, last_id="0"))
    async def many(body: Any) -> None:
        await batch.put(body)

    async with running_worker(client, keys, tracer=tracing()[0]), started(app):
        await app.publish(
            {"task_id": "raw-1", "model": "echo", "prompt": "x"},
            stream=keys.tasks("default", "normal"), headers={"traceparent": TP},
        )  # fmt: skip
        body, headers = await asyncio.wait_for(plain.get(), 15)
        [fields] = await asyncio.wait_for(batch.get(), 15)
    assert body["task_id"] == "raw-1" and body["state"] == "completed"
    assert "type" not in headers and "traceparent" not in headers
    assert set(fields) == {"type", "data", "traceparent", "correlation_id"}
    assert isinstance(fields["data"], str) and json.loads(fields["data"]) == body


async def test_bad_envelopes_fail_alone_and_clearly(client: Redis, keys: Keys) -> None:
    """Every failure path of an enveloped entry, between good tasks: each ends ``failed`` with
    ``invalid_event``, a message naming what was expected, and a dead letter; the good ones
    complete."""
    task = json.dumps({"task_id": "fs-good", "model": "echo", "prompt": "fine"}).encode()
    stream = keys.tasks("default", "normal")
    cut = encode_envelope(task, {"correlation_id": "c", "content-type": "application/json"})
    bad: dict[str, tuple[dict[str, bytes], str, str]] = {
        # name: (fields, message start, task id: "" for the derived one)
        "unknown": ({FIELD_ENVELOPE: b"hello"}, "__data__: not a FastStream envelope", ""),
        "truncated": ({FIELD_ENVELOPE: cut[:30]}, "__data__: truncated FastStream binary", ""),
        "not JSON": (
            {FIELD_ENVELOPE: encode_envelope(b"not json", {"correlation_id": "c"})},
            f"__data__: {_BODY_NOT_OBJECT}: event: Invalid JSON", "",
        ),
        "cut body": (
            {FIELD_ENVELOPE: cut[:-9]}, f"__data__: {_BODY_NOT_OBJECT}: event: Invalid JSON",
            "fs-good",  # its own task id is readable: but that task is another entry's
        ),
        "JSON envelope, not JSON body": (
            {FIELD_ENVELOPE: b'{"data": "nope", "headers": {}}'},
            f"__data__: {_BODY_NOT_OBJECT}", "",
        ),
        "no shape": ({"payload": b"x"}, "entry: no 'type' and 'data' fields", ""),
    }  # fmt: skip
    ids: dict[str, str] = {}
    async with running_worker(client, keys):
        await client.xadd(stream, {FIELD_ENVELOPE: cut})  # the good one first: it owns fs-good
        for name, (fields, _, _) in bad.items():
            ids[name] = text(await client.xadd(stream, fields))  # type: ignore[arg-type]
        await xadd_task(client, keys, {"task_id": "after", "model": "echo", "prompt": "ok"})
        await wait_for(lambda: _dead(client, keys, len(bad)), 15)
        done = await wait_results(client, keys, 2 + len(bad) - 1)  # "cut body" is fenced off
    by_id = {r.task_id: r for r in done}
    assert by_id["fs-good"].state == TaskState.COMPLETED
    assert by_id["after"].state == TaskState.COMPLETED
    letters = {
        d.entry_id: d
        for d in (DeadLetter.model_validate_json(e.data or b"")
                  for e in await stream_entries(client, keys.dead))
    }  # fmt: skip
    for name, (_, start, own_id) in bad.items():
        task_id = own_id or f"default.normal.{ids[name]}"
        letter = letters[ids[name]]
        assert letter.task_id == task_id, name
        assert letter.reason == ErrorCode.INVALID_EVENT and letter.message.startswith(start), (
            name, letter.message,
        )  # fmt: skip
        if name != "cut body":
            result = by_id[task_id]
            assert result.state == TaskState.FAILED and result.error is not None
            assert result.error.code == ErrorCode.INVALID_EVENT, name
            assert result.error.message == letter.message, name
        if name in ("unknown", "truncated", "no shape"):
            assert letter.message.endswith(SHAPES), name
    assert letters[ids["truncated"]].fields[FIELD_ENVELOPE].startswith("base64:")
    assert (await client.xpending(stream, "workers"))["pending"] == 0


async def _dead(client: Redis, keys: Keys, count: int) -> bool:
    return int(await client.xlen(keys.dead)) >= count


def _limited() -> ProviderError:
    return ProviderError("slow down", code=ErrorCode.RATE_LIMITED, retryable=True, retry_after=0.05)


async def test_a_retried_task_keeps_its_correlation_id(
    client: Redis, keys: Keys, redis_url: str
) -> None:
    """A retry goes back to its partition as a plain entry: the correlation id is the status
    record's then."""
    registry = ModelRegistry()
    registry.register("m", ScriptedProvider([_limited(), "second time"]))
    app = RedisBroker(redis_url)
    async with running_worker(client, keys, registry=registry, retry_poll_ms=20), app:
        await app.publish(
            {"task_id": "again-1", "model": "m", "prompt": "x"},
            stream=keys.tasks("default", "normal"), correlation_id="retry-7",
        )  # fmt: skip
        [result] = await wait_results(client, keys, 1)
    assert result.state == TaskState.COMPLETED and result.attempts == 2
    [entry] = await stream_entries(client, keys.results)
    assert entry.correlation_id == "retry-7"


# -- the FastStream section of docs/wire-format.md, run verbatim ------------------------------


def _doc_blocks() -> list[str]:
    doc = (ROOT / "docs" / "wire-format.md").read_text()
    section = doc[doc.index("\n## FastStream\n") :]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


async def test_the_doc_names_the_real_messages() -> None:
    doc = (ROOT / "docs" / "wire-format.md").read_text()
    assert f"`__data__: not a FastStream envelope; expected {SHAPES}`" in doc
    assert f"`__data__: {_BODY_NOT_OBJECT}: event: Invalid JSON: ...`" in doc
    # the truncation example: what broker.publish writes, cut at 40 bytes
    raw = await BinaryMessageFormatV1.encode(
        message={"model": "echo"}, reply_to=None, headers=None, correlation_id=str(uuid.uuid4())
    )
    with pytest.raises(EnvelopeError) as cut:
        decode_envelope(raw[:40])
    shown = str(cut.value).removesuffix(SHAPES)
    assert f"`__data__: {shown}...`" in doc


async def test_the_doc_examples_run_verbatim(
    private_redis: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    publish, subscribe, batch = _doc_blocks()
    url = "redis://localhost:6379"
    assert url in publish and url in subscribe
    pub: dict[str, Any] = {}
    sub: dict[str, Any] = {}
    # the doc talks to "the" Redis: only the address changes
    exec(publish.replace(url, private_redis.url), pub)
    exec(subscribe.replace(url, private_redis.url), sub)
    exec(batch, sub)  # it adds a subscriber to the same broker
    printed: list[str] = []

    def output() -> str:
        printed.append(capsys.readouterr().out)
        return "".join(printed)

    client = Redis.from_url(private_redis.url)
    try:
        async with running_worker(client, Keys("sop")), started(sub["broker"]):
            await pub["submit"]()
            await wait_for(lambda: "outcomes" in output(), 15)
            await wait_for(lambda: "fs-1" in output(), 15)
    finally:
        await client.aclose()
    lines = output().splitlines()
    assert "fs-1 completed task.completed order-42" in lines
    assert "1 outcomes" in lines
