"""With tracing off (the default), a task's trace context still reaches its result: the
producer's `traceparent` goes on unchanged, so a consumer can join its own trace. And an
invalid entry does not show in the per-model metrics."""

from __future__ import annotations

import json

from prometheus_client import generate_latest
from redis.asyncio import Redis

from sop_llm.handlers.metrics import Metrics
from sop_llm.streams.keys import Keys
from tests.harness import running_worker, stream_entries, wait_results

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_the_producers_trace_context_reaches_the_result(client: Redis, keys: Keys) -> None:
    task = {"task_id": "traced", "model": "echo", "prompt": "a b"}
    await client.xadd(
        keys.tasks("default", "normal"),
        {"type": "task.submitted", "data": json.dumps(task), "traceparent": PARENT,
         "tracestate": "vendor=1"},
    )  # fmt: skip
    await client.xadd(
        keys.tasks("default", "normal"),
        {"type": "task.submitted", "data": json.dumps({**task, "task_id": "untraced"})},
    )
    async with running_worker(client, keys):  # no tracer
        await wait_results(client, keys, 2)
    by_task = {
        json.loads(e.data or b"")["task_id"]: e.fields
        for e in await stream_entries(client, keys.results)
    }
    assert by_task["traced"]["traceparent"] == PARENT.encode()
    assert not by_task["untraced"].get("traceparent")


async def test_invalid_entries_make_no_per_model_series(client: Redis, keys: Keys) -> None:
    metrics = Metrics()
    await client.xadd(keys.tasks("default", "normal"), {"type": "task.submitted", "data": "{"})
    await client.xadd(
        keys.tasks("default", "normal"),
        {"type": "task.submitted", "data": json.dumps({"model": "echo", "prompt": "a"})},
    )
    async with running_worker(client, keys, metrics=metrics):
        await wait_results(client, keys, 2)
    text = generate_latest(metrics.registry).decode()
    assert 'model=""' not in text
    assert 'sop_task_run_seconds_count{model="echo"} 1.0' in text
