from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from ops.gpu_setup import build_gpu_runtime
from ops.settings import Settings
from ops.sidecar import Sidecar
from streams.keys import TASK_GROUP, Keys
from streams.producer import Producer, ProducerConfig
from tests.conftest import RedisServer
from tests.harness import running_worker


def _settings(redis_url: str, namespace: str, **kw: object) -> Settings:
    return Settings(redis_url=SecretStr(redis_url), namespace=namespace, sidecar_port=0, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def sidecar(client: Redis, redis_url: str, namespace: str) -> AsyncIterator[str]:
    side = Sidecar(client=client, settings=_settings(redis_url, namespace))
    async with side.running():
        yield f"http://127.0.0.1:{side.port}"


async def test_task_lookup(sidecar: str, client: Redis, keys: Keys) -> None:
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    task_id = await p.submit("echo", "look me up", max_tokens=3)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sidecar}/v1/tasks/{task_id}") as r:
            assert r.status == 200
            assert (await r.json())["state"] == "queued"
        async with running_worker(client, keys):
            await p.wait(task_id, timeout=5)
        async with http.get(f"{sidecar}/v1/tasks/{task_id}") as r:
            body = await r.json()
        assert body["state"] == "completed" and body["result"]["text"] == "look me up"
        async with http.get(f"{sidecar}/v1/tasks/nope") as r:
            assert r.status == 404 and (await r.json())["error"] == "not_found"
        async with http.get(f"{sidecar}/v1/tasks/bad%20id") as r:
            assert r.status == 400


async def test_queue_figures_match_xinfo(sidecar: str, client: Redis, keys: Keys) -> None:
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    for i in range(3):
        await p.submit("echo", f"q{i}", priority="low")
    stream = keys.tasks("default", "low")
    await client.xgroup_create(stream, TASK_GROUP, id="0")
    await client.xreadgroup(TASK_GROUP, "someone", {stream: ">"}, count=1)
    async with aiohttp.ClientSession() as http, http.get(f"{sidecar}/v1/queue") as r:
        rows = {row["partition"]: row for row in (await r.json())["partitions"]}
    [group] = await client.xinfo_groups(stream)
    assert rows["low"]["length"] == await client.xlen(stream) == 3
    assert rows["low"]["pending"] == group["pending"] == 1
    assert rows["low"]["lag"] == group["lag"] == 2
    assert rows["low"]["oldest_pending_age_ms"] >= 0
    assert rows["high"]["length"] == 0 and rows["high"]["group"] is False


async def test_health(private_redis: RedisServer, namespace: str) -> None:
    client = Redis.from_url(private_redis.url, socket_timeout=2, socket_connect_timeout=1)
    side = Sidecar(client=client, settings=_settings(private_redis.url, namespace))
    try:
        async with side.running(), aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{side.port}"
            async with http.get(f"{base}/health/ready") as r:
                assert r.status == 503  # no groups yet
                assert "consumer group missing" in str(await r.json())
            async with (
                running_worker(client, Keys(namespace)),
                http.get(f"{base}/health/ready") as r,
            ):
                assert r.status == 200
            private_redis.stop()
            async with http.get(f"{base}/health/ready") as r:
                assert r.status == 503
                assert "redis unreachable" in str(await r.json())
            async with http.get(f"{base}/health/live") as r:
                assert r.status == 200
    finally:
        await client.aclose()


async def test_bearer_token(client: Redis, redis_url: str, namespace: str) -> None:
    side = Sidecar(
        client=client, settings=_settings(redis_url, namespace, sidecar_token=SecretStr("s3cret"))
    )
    async with side.running(), aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{side.port}"
        async with http.get(f"{base}/v1/queue") as r:
            assert r.status == 401
        async with http.get(f"{base}/v1/queue", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with http.get(f"{base}/v1/queue", headers={"Authorization": "Bearer s3cret"}) as r:
            assert r.status == 200
        async with http.get(f"{base}/health/live") as r:
            assert r.status == 200


async def test_gpu_endpoint_without_a_gpu(client: Redis, redis_url: str, namespace: str) -> None:
    settings = _settings(redis_url, namespace)
    gpus = await build_gpu_runtime(settings, client)
    side = Sidecar(client=client, settings=settings, gpu=gpus)
    async with (
        side.running(),
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{side.port}/v1/gpu") as r,
    ):
        body = await r.json()
    assert r.status == 200
    assert body["status"].startswith("no GPU") and body["devices"] == []
    assert gpus.semaphores == {}
