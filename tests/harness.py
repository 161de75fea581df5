"""Running a real worker in-process against a test's namespace."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from typing import Any

from opentelemetry.trace import Tracer
from redis.asyncio import Redis

from sop_llm.handlers.metrics import Metrics
from sop_llm.handlers.tasks import Worker, WorkerConfig
from sop_llm.handlers.tasks.gpu import GpuGate
from sop_llm.providers.echo import EchoProvider
from sop_llm.providers.registry import ModelRegistry
from sop_llm.schemas.result import TaskResult
from sop_llm.streams.entries import Entry, entries_from_range, text
from sop_llm.streams.keys import Keys


def echo_registry(tokens_per_s: float = 0.0, slots: int = 64) -> ModelRegistry:
    registry = ModelRegistry()
    registry.register("echo", EchoProvider(tokens_per_s=tokens_per_s, slots=slots))
    return registry


@contextlib.asynccontextmanager
async def running_worker(
    client: Redis,
    keys: Keys,
    *,
    slots: int | None = 8,
    tokens_per_s: float = 0.0,
    registry: ModelRegistry | None = None,
    consumer: str = "w1",
    tracer: Tracer | None = None,
    metrics: Metrics | None = None,
    gpu: GpuGate | None = None,
    **config: Any,
) -> AsyncIterator[Worker]:
    settings: dict[str, Any] = {
        "consumer": consumer,
        "pools": ("default",),
        "partitions": ("high", "normal", "low"),
        "slots": slots,
        "block_ms": 200,
        "lease_ttl_ms": 2_000,
        "reclaim_interval_ms": 200,
        "aging_ms": 0,
        "shutdown_grace_s": 5.0,
    }
    settings.update(config)
    worker = Worker(
        client=client,
        keys=keys,
        registry=registry or echo_registry(tokens_per_s, slots or 64),
        config=WorkerConfig(**settings),
        tracer=tracer,
        metrics=metrics,
        gpu=gpu,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(10):
            while not worker.ready:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield worker
    finally:
        stop.set()
        done, _ = await asyncio.wait({task}, timeout=30)
        if not done:
            # say what the worker was still waiting for
            stacks = []
            for other in asyncio.all_tasks():
                if other is not asyncio.current_task():
                    buf = io.StringIO()
                    other.print_stack(limit=10, file=buf)
                    stacks.append(buf.getvalue())
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise AssertionError("the worker did not stop within 30 s:\n" + "\n".join(stacks))
        task.result()


async def results(client: Redis, keys: Keys) -> list[TaskResult]:
    """Every entry of the results stream, in order."""
    entries = entries_from_range(keys.results, await client.xrange(keys.results))
    return [TaskResult.model_validate_json(e.data or b"") for e in entries]


async def stream_entries(client: Redis, stream: str) -> list[Entry]:
    return entries_from_range(stream, await client.xrange(stream))


async def wait_results(
    client: Redis, keys: Keys, count: int, timeout: float = 15.0
) -> list[TaskResult]:
    async with asyncio.timeout(timeout):
        while await client.xlen(keys.results) < count:
            await asyncio.sleep(0.02)
    return await results(client, keys)


async def xadd_task(
    client: Redis,
    keys: Keys,
    data: Any,
    *,
    partition: str = "normal",
    type_: str = "task.submitted",
) -> str:
    """Publish like a plain-XADD producer in any language would."""
    raw = data if isinstance(data, (str, bytes)) else json.dumps(data)
    entry_id = await client.xadd(keys.tasks("default", partition), {"type": type_, "data": raw})
    return text(entry_id)
