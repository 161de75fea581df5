"""The HTTP API's rarer refusals: each is a documented JSON answer, never a 500."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
from redis.asyncio import Redis

from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.result import DeadLetter
from sop_llm.streams.entries import text
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import RedisServer, wait_for
from tests.ops.apicheck import serving


async def test_a_repeated_idempotency_key_header_is_refused(
    client: Redis, redis_url: str, namespace: str
) -> None:
    async with (
        serving(client, redis_url, namespace) as api,
        api.http.post(
            api.base + "/v1/tasks",
            json={"model": "echo", "prompt": "x"},
            headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
        ) as r,
    ):
        assert r.status == 422 and (await r.json())["error"] == "invalid_event"
    assert await client.xlen(Keys(namespace).tasks("default", "normal")) == 0


async def test_a_task_id_in_use_is_a_409(client: Redis, redis_url: str, namespace: str) -> None:
    async with serving(client, redis_url, namespace) as api:
        first = {"task_id": "mine", "model": "echo", "prompt": "x"}
        await api.call("POST", "/v1/tasks", "/v1/tasks", 202, body=first)
        again = await api.call("POST", "/v1/tasks", "/v1/tasks", 202, body=first)  # a resend
        assert again["task_id"] == "mine"
        other = {**first, "prompt": "another payload"}
        refused = await api.call("POST", "/v1/tasks", "/v1/tasks", 409, body=other)
        assert refused["error"] == ErrorCode.DUPLICATE_TASK_ID.value


async def test_a_full_backlog_is_a_429_with_retry_after(
    client: Redis, redis_url: str, namespace: str
) -> None:
    async with serving(client, redis_url, namespace, max_backlog=1) as api:
        task = {"model": "echo", "prompt": "x"}
        await api.call("POST", "/v1/tasks", "/v1/tasks", 202, body=task)
        refused = await api.call("POST", "/v1/tasks", "/v1/tasks", 429, body=task)
        assert refused["error"] == "backlog_full"
        assert api.last_headers["Retry-After"] == "1"


async def test_a_submission_no_replica_acknowledged_is_a_503(
    client: Redis, redis_url: str, namespace: str
) -> None:
    # the shared test server has no replica: one that must hold the task never answers
    async with serving(
        client, redis_url, namespace, durability_replicas=1, durability_timeout_ms=50
    ) as api:
        refused = await api.call(
            "POST", "/v1/tasks", "/v1/tasks", 503, body={"model": "echo", "prompt": "x"}
        )
    assert refused["error"] == "not_replicated" and "again" in refused["message"]


async def test_a_dead_letter_without_a_usable_event_is_reported_not_requeued(
    client: Redis, redis_url: str, namespace: str
) -> None:
    keys = Keys(namespace)
    letter = DeadLetter(
        source_stream=keys.tasks("default", "normal"), entry_id="1-0", task_id="garbled",
        reason=ErrorCode.INVALID_EVENT, message="not JSON", fields={"data": "{not json"},
        dead_at=1,
    )  # fmt: skip
    entry_id = await client.xadd(keys.dead, {"type": "task.dead", "data": letter.model_dump_json()})
    async with serving(client, redis_url, namespace) as api:
        answer = await api.call(
            "POST", "/v1/dead/requeue", "/v1/dead/requeue", 200, body={"task_id": "garbled"}
        )
    assert answer["requeued"] == [] and [f["id"] for f in answer["failed"]] == [text(entry_id)]
    assert "not JSON" in answer["failed"][0]["message"]
    assert await client.xlen(keys.dead) == 1  # left where it was


async def test_redis_lost_mid_stream_ends_the_stream_quietly(
    private_redis: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = Redis.from_url(private_redis.url, socket_timeout=1, socket_connect_timeout=1)
    try:
        producer = Producer(ProducerConfig(namespace=namespace), client=client)
        task_id = await producer.submit("echo", "waits", stream=True)  # no worker: it waits
        async with serving(client, private_redis.url, namespace) as api:
            timeout = aiohttp.ClientTimeout(total=20)
            async with api.http.get(f"{api.base}/v1/tasks/{task_id}/stream", timeout=timeout) as r:
                assert r.status == 200 and r.content_type == "text/event-stream"
                private_redis.stop()
                body = await asyncio.wait_for(r.read(), 20)  # the server ends it
            assert b"event: end" not in body
            async with api.http.get(api.base + "/health/live") as r:
                assert r.status == 200
        await wait_for(lambda: any("token stream cut" in m for m in caplog.messages), 5)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    finally:
        await client.aclose()


def test_the_json_of_a_refusal_is_documented_for_every_new_change() -> None:
    """Every POST, PUT and DELETE documents 400/413/415 (bodies), 403 and 503."""
    from tests.ops.apicheck import DOC

    for path, item in DOC["paths"].items():
        for method, op in item.items():
            if method == "get":
                continue
            codes = set(op["responses"])
            assert {"401", "403", "503"} <= codes, (method, path)
            if "requestBody" in op:
                assert {"400", "413", "415", "422"} <= codes, (method, path)
            assert json.dumps(op)  # plain JSON
