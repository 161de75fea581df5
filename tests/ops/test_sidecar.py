"""The sidecar over real HTTP: lookups, queue figures, health, the token, hostile requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from redis.asyncio import Redis
from yarl import URL

from sop_llm.ops.gpu_setup import build_gpu_runtime
from sop_llm.ops.settings import Settings
from sop_llm.ops.sidecar import Sidecar
from sop_llm.streams.keys import TASK_GROUP, Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import RedisServer, wait_for
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
            assert r.status == 404 and (await r.json())["error"] == "not_found"


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


async def _raw_get(port: int, path: bytes, *headers: bytes) -> tuple[int, dict[str, str], bytes]:
    """One GET with exactly these bytes on the wire: status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = b"".join(h + b"\r\n" for h in headers)
        writer.write(
            b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n" + head + b"Connection: close\r\n\r\n"
        )
        async with asyncio.timeout(5):
            raw = await reader.read()
    finally:
        writer.close()
    top, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    found = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in found.items()}, body


@pytest.mark.parametrize(
    "header",
    [
        None,
        b"Authorization: Bearer \xff\xfe\x80",  # not UTF-8
        b"Authorization: \xc3\x28",
        b"Authorization: Bearer s3cret\xff",
        b"Authorization: Basic s3cret",
        b"Authorization: Bearer",
        b"Authorization: Bearer ",
        b"Authorization: s3cret",
        b"Authorization: Bearer s3cre",
        b"Authorization: Bearer s3cret2",
    ],
)
async def test_any_malformed_authorization_is_401(
    client: Redis, redis_url: str, namespace: str, header: bytes | None
) -> None:
    side = Sidecar(
        client=client, settings=_settings(redis_url, namespace, sidecar_token=SecretStr("s3cret"))
    )
    async with side.running():
        assert side.port is not None
        sent = (header,) if header is not None else ()
        status, headers, body = await _raw_get(side.port, b"/v1/queue", *sent)
        assert status == 401
        assert headers["www-authenticate"] == "Bearer"
        assert json.loads(body)["error"] == "unauthorized"
        # the right token, and a repeated header
        ok = b"Authorization: Bearer s3cret"
        assert (await _raw_get(side.port, b"/v1/queue", ok))[0] == 200
        assert (await _raw_get(side.port, b"/v1/queue", b"authorization: bearer s3cret"))[0] == 200
        assert (await _raw_get(side.port, b"/v1/queue", ok, ok))[0] == 401


async def test_unknown_ids_of_any_characters_are_a_json_404(
    sidecar: str, client: Redis, keys: Keys
) -> None:
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    task_id = await p.submit("echo", "one two three", max_tokens=3, stream=True)
    async with running_worker(client, keys):
        await p.wait(task_id, timeout=10)
    # a key of another type where a status record would be: still no task
    await client.set(keys.task("not-a-hash"), "x")
    port = URL(sidecar).port
    assert port is not None
    ids = [
        f"{task_id}:tokens",  # the token stream's name under an older key layout
        "not-a-hash",
        "a%2Fb",
        "%2F",
        "%C3%A9t%C3%A9",
        "%F0%9F%94%91",
        "%FF%FE",
        "a%00b",
        "x" * 129,
        "y" * 4000,
        "..",
        "",
    ]
    for raw_id in ids:
        for tail in ("", "/stream"):
            status, headers, body = await _raw_get(port, f"/v1/tasks/{raw_id}{tail}".encode())
            assert status == 404, (raw_id, tail, body)
            assert headers["content-type"].startswith("application/json")
            assert json.loads(body)["error"] == "not_found"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sidecar}/v1/tasks/{task_id}") as r:
            assert r.status == 200  # the real task is still found
        async with http.get(f"{sidecar}/no/such/path") as r:
            assert r.status == 404 and (await r.json())["error"] == "not_found"
        async with http.post(f"{sidecar}/v1/queue") as r:
            assert r.status == 405 and (await r.json())["error"] == "method_not_allowed"


_ids = st.text(st.characters(codec="utf-8"), max_size=300)  # any character but a lone surrogate


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    task_id=_ids,
    safe=st.sampled_from(["", ":@!$&'()*+,;=~"]),
    tail=st.sampled_from(["", "/stream"]),
)
async def test_no_id_gets_a_500(sidecar: str, task_id: str, safe: str, tail: str) -> None:
    url = URL(f"{sidecar}/v1/tasks/{quote(task_id, safe=safe)}{tail}", encoded=True)
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 404, (task_id, await r.text())
        assert (await r.json())["error"] == "not_found"


async def _sidecar_links(client: Redis, name: str) -> list[dict[str, str]]:
    """The Redis connections of the sidecar's client (named ``name``)."""
    return [link for link in await client.client_list() if link.get("name") == name]


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_reader_that_goes_away_is_an_ordinary_end(
    client: Redis,
    redis_url: str,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
    streaming: bool,
) -> None:
    caplog.set_level(logging.DEBUG)
    name = f"sidecar-{uuid.uuid4().hex[:8]}"
    own = Redis.from_url(redis_url, client_name=name, socket_timeout=15)
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    # queued (no worker): the stream waits; or running, deltas flowing at 20 tokens/s
    task_id = await p.submit("echo", "a b c", max_tokens=400, stream=True)
    side = Sidecar(client=own, settings=_settings(redis_url, keys.namespace))
    try:
        async with (
            side.running(),
            running_worker(client, keys, tokens_per_s=20, shutdown_grace_s=0.1)
            if streaming
            else _nothing(),
        ):
            assert side.port is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", side.port)
            try:
                writer.write(f"GET /v1/tasks/{task_id}/stream HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                async with asyncio.timeout(10):
                    head = await reader.readuntil(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
                    if streaming:
                        assert b"event: delta" in await reader.readuntil(b"\n\n")
                    else:  # the handler waits in a blocking read for the first token
                        await wait_for(lambda: _polling(client, name), 5)
            finally:
                writer.close()
            # the handler stops rather than polling Redis for a reader that is gone
            await wait_for(lambda: _quiet(client, name), 10)
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{side.port}/health/live") as r,
            ):
                assert r.status == 200
    finally:
        await own.aclose()
    # (the worker's own shutdown warning about the unfinished task is not the sidecar's)
    loud = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith(("aiohttp", "ops"))
    ]
    assert loud == [], [(r.name, r.getMessage()) for r in loud]


async def _polling(client: Redis, name: str) -> bool:
    """A connection named ``name`` is in a blocking read."""
    return any("b" in link.get("flags", "") for link in await _sidecar_links(client, name))


async def _quiet(client: Redis, name: str) -> bool:
    """No connection named ``name`` has been used for 3 s (a polling handler re-reads every
    second), or none is left."""
    return all(int(link.get("idle", "0")) >= 3 for link in await _sidecar_links(client, name))


@contextlib.asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


async def test_ready_tells_a_frozen_redis_and_a_stuck_worker_apart_within_250_ms(
    private_redis: RedisServer, namespace: str
) -> None:
    """A frozen (not killed) Redis: /health/ready says so within about 250 ms, and names the
    worker as started but unable to reach Redis, never "not started"."""
    client = Redis.from_url(private_redis.url, socket_timeout=2, socket_connect_timeout=1)
    keys = Keys(namespace)
    try:
        async with running_worker(client, keys, block_ms=200) as worker:
            side = Sidecar(
                client=client, settings=_settings(private_redis.url, namespace), worker=worker
            )
            async with side.running(), aiohttp.ClientSession() as http:
                base = f"http://127.0.0.1:{side.port}"
                async with http.get(f"{base}/health/ready") as r:
                    assert r.status == 200, await r.text()
                assert private_redis.proc is not None
                private_redis.proc.send_signal(signal.SIGSTOP)  # frozen, not dead
                try:
                    started = time.monotonic()
                    async with http.get(f"{base}/health/ready") as r:
                        body = await r.json()
                    took = time.monotonic() - started
                    assert r.status == 503
                    assert any("did not answer within 250 ms" in p for p in body["problems"])
                    assert took < 0.5, took
                    await wait_for(lambda: not worker.ready, 10)
                    async with http.get(f"{base}/health/ready") as r:
                        problems = (await r.json())["problems"]
                    assert "worker not started" not in problems
                    assert "worker cannot reach redis" in problems
                finally:
                    private_redis.proc.send_signal(signal.SIGCONT)

                async def ready_again() -> bool:
                    async with http.get(f"{base}/health/ready") as r:
                        return r.status == 200

                await wait_for(ready_again, 20)
    finally:
        await client.aclose()


async def test_ready_names_a_stalled_worker_before_its_socket_timeout_and_recovers_at_once(
    private_redis: RedisServer, namespace: str
) -> None:
    """A frozen Redis with a long socket timeout (15 s): the worker's blocked read does not come
    back, and /health/ready names the stalled worker within 3 s; once Redis resumes, it is
    ready again within 1 s."""
    client = Redis.from_url(private_redis.url, socket_timeout=15, socket_connect_timeout=1)
    keys = Keys(namespace)
    try:
        async with running_worker(client, keys, block_ms=200) as worker:
            side = Sidecar(
                client=client, settings=_settings(private_redis.url, namespace), worker=worker
            )
            async with side.running(), aiohttp.ClientSession() as http:
                base = f"http://127.0.0.1:{side.port}"

                async def problems() -> list[str]:
                    async with http.get(f"{base}/health/ready") as r:
                        return [] if r.status == 200 else list((await r.json())["problems"])

                await wait_for(lambda: worker.ready, 10)
                assert await problems() == []
                assert private_redis.proc is not None
                private_redis.proc.send_signal(signal.SIGSTOP)
                try:
                    frozen = time.monotonic()

                    async def stalled() -> str | None:
                        found = [p for p in await problems() if p.startswith("worker stalled: ")]
                        return found[0] if found else None

                    reason = await wait_for(stalled, 3)
                    assert time.monotonic() - frozen < 3.0
                    assert "has waited" in reason and "on redis" in reason, reason
                finally:
                    private_redis.proc.send_signal(signal.SIGCONT)
                resumed = time.monotonic()

                async def ready() -> bool:
                    return await problems() == []

                await wait_for(ready, 5)
                assert time.monotonic() - resumed < 1.0
                assert worker.stalled() is None
    finally:
        await client.aclose()
