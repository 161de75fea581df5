"""Tasks of instant models: written with their start, in the read batch, unless anything is
unusual, when they take the normal path. Against a real Redis."""

from __future__ import annotations

import json

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis

from handlers.metrics import Metrics
from providers.errors import OverloadedError
from providers.registry import ModelRegistry
from schemas.result import TaskState
from streams.keys import TASK_GROUP, Keys
from streams.status import read_status
from tests.fakes import InstantProvider, ScriptedProvider
from tests.harness import running_worker, stream_entries, wait_results, xadd_task


def registry_with(provider: InstantProvider, **others: ScriptedProvider) -> ModelRegistry:
    registry = ModelRegistry()
    registry.register("fast", provider)
    for name, other in others.items():
        registry.register(name, other)
    return registry


def task(task_id: str, model: str = "fast", **fields: object) -> dict[str, object]:
    return {"v": 1, "task_id": task_id, "model": model, "prompt": "hello", **fields}


async def test_instant_task_is_written_with_its_start(client: Redis, keys: Keys) -> None:
    fast = InstantProvider(["instant answer"])
    metrics = Metrics()
    await xadd_task(
        client,
        keys,
        task("i1", reply_to="svc", webhook_url="https://hooks.example.com/x", metadata={"a": 1}),
    )
    async with running_worker(client, keys, registry=registry_with(fast), metrics=metrics):
        [result] = await wait_results(client, keys, 1)
    assert (result.task_id, result.text) == ("i1", "instant answer")
    assert result.state == TaskState.COMPLETED
    assert (result.attempts, result.worker, result.metadata) == (1, "w1", {"a": 1})
    assert (len(fast.answered), len(fast.calls)) == (1, 0)  # never generated as a task
    status = await read_status(client, keys, "i1")
    assert status is not None and status.state == TaskState.COMPLETED and status.attempts == 1
    assert status.started_at is not None and status.finished_at is not None
    assert [e.type for e in await stream_entries(client, keys.results_for("svc"))] == [
        "task.completed"
    ]
    [job] = await stream_entries(client, keys.webhooks)
    assert json.loads(job.data or b"")["payload"]["task_id"] == "i1"
    stream = keys.tasks("default", "normal")
    assert (await client.xpending(stream, TASK_GROUP))["pending"] == 0
    sample = metrics.registry.get_sample_value
    assert sample("sop_task_outcomes_total", {"state": "completed"}) == 1
    assert sample("sop_tokens_total", {"direction": "output", "model": "fast"}) == 2
    assert sample("sop_task_run_seconds_count", {"model": "fast"}) == 1
    assert sample("sop_task_queue_wait_seconds_count") == 1


async def test_a_later_attempt_runs_as_a_task(client: Redis, keys: Keys) -> None:
    fast = InstantProvider(["instant answer"])
    entry_id = await xadd_task(client, keys, task("i2"))
    # attempt 1 began on a worker that died: the entry comes back (as after a reclaim)
    await client.hset(
        keys.task("i2"),
        mapping={"state": "running", "task_id": "i2", "entry_id": entry_id, "attempts": 1},
    )
    async with running_worker(client, keys, registry=registry_with(fast)):
        [result] = await wait_results(client, keys, 1)
    assert (result.text, result.attempts) == ("from generate", 2)
    assert (len(fast.answered), len(fast.calls)) == (1, 1)


async def test_a_provider_error_sends_the_task_the_normal_way(client: Redis, keys: Keys) -> None:
    fast = InstantProvider([OverloadedError("busy")], ["from generate"])
    await xadd_task(client, keys, task("i3"))
    async with running_worker(client, keys, registry=registry_with(fast)):
        [result] = await wait_results(client, keys, 1)
    assert (result.state, result.text, result.attempts) == (
        TaskState.COMPLETED, "from generate", 1,
    )  # fmt: skip
    assert (len(fast.answered), len(fast.calls)) == (1, 1)


async def test_with_tracing_on_every_task_gets_its_spans(client: Redis, keys: Keys) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    fast = InstantProvider(["instant answer"])
    await xadd_task(client, keys, task("i4"))
    async with running_worker(
        client, keys, registry=registry_with(fast), tracer=provider.get_tracer("test")
    ):
        [result] = await wait_results(client, keys, 1)
    assert result.text == "from generate" and len(fast.answered) == 0
    names = {s.name for s in exporter.get_finished_spans()}
    assert f"process {keys.tasks('default', 'normal')}" in names
    assert "text_completion fast" in names


async def test_streaming_deadline_and_schema_tasks_take_the_normal_path(
    client: Redis, keys: Keys
) -> None:
    fast = InstantProvider(["instant answer"])
    await xadd_task(client, keys, task("s1", stream=True))
    await xadd_task(client, keys, task("s2", deadline="2001-01-01T00:00:00Z"))
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    await xadd_task(client, keys, task("s3", response_format=schema))
    async with running_worker(client, keys, registry=registry_with(fast)):
        done = {r.task_id: r for r in await wait_results(client, keys, 3)}
    assert len(fast.answered) == 0
    assert done["s1"].text == "from generate"
    tokens = await stream_entries(client, keys.task_tokens("s1"))
    assert tokens and tokens[-1].type == "token.end"
    assert done["s2"].state == TaskState.EXPIRED
    assert done["s3"].task_id == "s3"  # ran by the runner (its validation decides the state)


async def test_a_mixed_batch_keeps_every_outcome_with_its_task(client: Redis, keys: Keys) -> None:
    fast = InstantProvider(["instant answer"])
    slow = ScriptedProvider(["slow answer"], per_token_s=0.01)
    for i in range(12):
        await xadd_task(client, keys, task(f"m{i}", model="fast" if i % 3 else "slow"))
        if i == 5:
            await xadd_task(client, keys, "not json at all")
    await xadd_task(client, keys, task("m0"))  # the same task id again: a duplicate
    async with running_worker(client, keys, slots=16, registry=registry_with(fast, slow=slow)):
        done = await wait_results(client, keys, 13)
    by_id = {r.task_id: r for r in done if r.state == TaskState.COMPLETED}
    assert sorted(by_id) == sorted(f"m{i}" for i in range(12))
    for i in range(12):
        assert by_id[f"m{i}"].text == ("instant answer" if i % 3 else "slow answer")
        assert by_id[f"m{i}"].attempts == 1
    [bad] = [r for r in done if r.state == TaskState.FAILED]
    assert bad.error is not None and bad.error.code.value == "invalid_event"
    assert len(done) == 13  # the duplicate entry was acked without a second result
    stream = keys.tasks("default", "normal")
    assert (await client.xpending(stream, TASK_GROUP))["pending"] == 0
