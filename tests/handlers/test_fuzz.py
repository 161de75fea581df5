"""Property-based: whatever lands on a task stream, the worker answers it and keeps going."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from sop_llm.schemas.result import TaskResult, TaskState
from sop_llm.streams.keys import Keys
from tests.conftest import SHARED_REDIS_URL, drop_namespace
from tests.harness import running_worker, stream_entries

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    [
        "model",
        "prompt",
        "messages",
        "temperature",
        "max_tokens",
        "task_id",
        "stop",
        "seed",
        "metadata",
        "deadline",
        "colour",
        "v",
        "stream",
    ]
)


def deep(n: int) -> str:
    return "[" * n + "]" * n


data_values = st.one_of(
    st.binary(max_size=64),  # often not UTF-8
    st.text(max_size=64),
    json_value.map(json.dumps),
    st.dictionaries(field_names, json_value, max_size=6).map(json.dumps),
    st.integers(min_value=1, max_value=5000).map(deep),  # deeply nested JSON
    st.just(json.dumps({"model": "echo", "prompt": "x" * 3000})),  # over the test's size limit
    st.just(json.dumps({"model": "echo", "prompt": "ok", "temperature": "hot"})),  # wrong type
)
raw_entries = st.dictionaries(
    st.sampled_from(["type", "data", "traceparent", "other", "\xff"]),
    data_values,
    min_size=1,
    max_size=3,
).map(lambda d: {**d, "type": d.get("type", "task.submitted")} if "data" in d else d)


async def _scenario(entries: list[dict[str, Any]]) -> None:
    keys = Keys(f"fz{uuid.uuid4().hex[:10]}")
    client = Redis.from_url(SHARED_REDIS_URL, socket_timeout=15)
    try:
        stream = keys.tasks("default", "normal")
        good: list[str] = []
        for i, fields in enumerate(entries):
            await client.xadd(stream, fields)  # type: ignore[arg-type]
            good_id = f"good-{i}"
            await client.xadd(
                stream,
                {
                    "type": "task.submitted",
                    "data": json.dumps({"task_id": good_id, "model": "echo", "prompt": "fine"}),
                },
            )
            good.append(good_id)
        async with running_worker(client, keys, max_prompt_bytes=2000):
            async with asyncio.timeout(20):
                while await client.xlen(keys.dead) < len(entries) or not await _all_done(
                    client, keys, good
                ):
                    await asyncio.sleep(0.02)
            pending = await client.xpending(stream, "workers")
        results = [
            TaskResult.model_validate_json(e.data or b"")
            for e in await stream_entries(client, keys.results)
        ]
        by_id = {r.task_id: r for r in results}
        # no task id got two outcomes; good tasks completed; every bad entry answered and
        # dead-lettered exactly once (two bad entries may share a task id: one outcome, two letters)
        assert len(results) == len(by_id)
        assert all(by_id[g].state == TaskState.COMPLETED for g in good)
        assert all(
            r.state == TaskState.FAILED and r.error is not None
            for r in results
            if r.task_id not in good
        )
        assert await client.xlen(keys.dead) == len(entries)
        assert pending["pending"] == 0
    finally:
        await client.aclose()
        drop_namespace(keys.namespace)


async def _all_done(client: Redis, keys: Keys, ids: list[str]) -> bool:
    states = await asyncio.gather(*(client.hget(keys.task(t), "state") for t in ids))
    return all(s == b"completed" for s in states)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(raw_entries, min_size=1, max_size=8))
def test_malformed_entries_never_crash_the_worker(entries: list[dict[str, Any]]) -> None:
    # bad entries must not reuse a good task's id: a given task_id owns its task
    cleaned = []
    for fields in entries:
        data = fields.get("data")
        if isinstance(data, str) and "good-" in data:
            fields = {**fields, "data": data.replace("good-", "bad-")}
        cleaned.append(fields)
    asyncio.run(_scenario(cleaned))
