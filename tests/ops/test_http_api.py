"""The sidecar's HTTP API: submit and cancel, the token on every endpoint, the guard on changes,
bad input as a JSON 4xx, Redis trouble as a 503. Every answer is checked against the document."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from sop_llm.ops.console import OPEN_ROUTES
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import RedisServer, wait_for
from tests.harness import running_worker, stream_entries
from tests.ops.apicheck import DOC, Api, serving

TOKEN = "s3cret-token"


@pytest.fixture
async def api(client: Redis, redis_url: str, namespace: str) -> AsyncIterator[Api]:
    async with serving(client, redis_url, namespace) as found:
        yield found


async def test_a_submitted_task_is_202_with_its_location_and_runs(
    api: Api, client: Redis, keys: Keys
) -> None:
    task = {"model": "echo", "prompt": "over http", "max_tokens": 2, "priority": "high"}
    accepted = await api.call("POST", "/v1/tasks", "/v1/tasks", 202, body=task)
    task_id = accepted["task_id"]
    assert api.last_headers["Location"] == accepted["location"] == f"/v1/tasks/{task_id}"
    record = await api.call("GET", accepted["location"], "/v1/tasks/{task_id}", 200)
    assert record["state"] == "queued" and record["stream"] == keys.tasks("default", "high")
    async with running_worker(client, keys):
        result = await Producer(ProducerConfig(namespace=keys.namespace), client=client).wait(
            task_id, timeout=10
        )
    assert result.text == "over http"


async def test_the_idempotency_key_header(api: Api) -> None:
    task = {"model": "echo", "prompt": "once"}
    first = await api.call(
        "POST", "/v1/tasks", "/v1/tasks", 202, body=task, headers={"Idempotency-Key": "k-1"}
    )
    again = await api.call(
        "POST", "/v1/tasks", "/v1/tasks", 202, body=task, headers={"Idempotency-Key": "k-1"}
    )
    assert again["task_id"] == first["task_id"]
    same_in_body = {**task, "idempotency_key": "k-1"}
    assert (await api.call("POST", "/v1/tasks", "/v1/tasks", 202, body=same_in_body))[
        "task_id"
    ] == first["task_id"]
    other = {"model": "echo", "prompt": "another payload"}
    refused = await api.call(
        "POST", "/v1/tasks", "/v1/tasks", 409, body=other, headers={"Idempotency-Key": "k-1"}
    )
    assert refused["error"] == "idempotency_conflict"
    both = {**task, "idempotency_key": "k-2"}
    refused = await api.call(
        "POST", "/v1/tasks", "/v1/tasks", 409, body=both, headers={"Idempotency-Key": "k-1"}
    )
    assert "differ" in refused["message"]


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "invalid_json"),
        (
            b'{"model": "echo", "prompt": "x", "temperature": NaN}',
            "application/json",
            400,
            "invalid_json",
        ),
        (b"\xff\xfe", "application/json", 400, "invalid_json"),
        (b'{"model": "echo", "prompt": "x"}', "text/plain", 415, "unsupported_media_type"),
        (b'["echo"]', "application/json", 422, "invalid_body"),
        (b'{"prompt": "no model"}', "application/json", 422, "invalid_event"),
        (
            b'{"model": "echo", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}',
            "application/json",
            422,
            "invalid_event",
        ),
        (
            b'{"model": "echo", "prompt": "x", "priority": "urgent"}',
            "application/json",
            422,
            "invalid_event",
        ),
        (
            b'{"model": "echo", "prompt": "x", "pool": "elsewhere"}',
            "application/json",
            422,
            "invalid_event",
        ),
        (
            b'{"model": "echo", "prompt": "x", "webhook_url": "http://127.0.0.1/hook"}',
            "application/json",
            422,
            "invalid_event",
        ),
        (
            b'{"model": "echo", "prompt": "x", "max_tokens": "5"}',
            "application/json",
            422,
            "invalid_event",
        ),
        (
            b'{"model": "echo", "prompt": "' + b"x" * 3000 + b'"}',
            "application/json",
            422,
            "invalid_event",
        ),
        (
            b'{"model": "echo", "prompt": "' + b"x" * 100_000 + b'"}',
            "application/json",
            413,
            "request_entity_too_large",
        ),
    ],
)
async def test_bad_submissions_are_a_json_4xx(
    client: Redis,
    redis_url: str,
    namespace: str,
    raw: bytes,
    content_type: str,
    status: int,
    code: str,
) -> None:
    # a small prompt limit, so that both the prompt's and the body's limits can be reached
    async with serving(client, redis_url, namespace, max_prompt_bytes=2048) as api:
        answer = await api.call(
            "POST",
            "/v1/tasks",
            "/v1/tasks",
            status,
            raw=raw,
            headers={"Content-Type": content_type},
        )
    assert answer["error"] == code, answer
    assert await client.xlen(Keys(namespace).tasks("default", "normal")) == 0


async def test_integral_numbers_are_integers(api: Api, client: Redis, keys: Keys) -> None:
    """JSON Schema, and so the document, counts ``4.0`` as an integer: so does the API."""
    body = b'{"model": "echo", "prompt": "x", "max_tokens": 4.0, "seed": 1e2}'
    accepted = await api.call(
        "POST",
        "/v1/tasks",
        "/v1/tasks",
        202,
        raw=body,
        headers={"Content-Type": "application/json"},
    )
    [entry] = await stream_entries(client, keys.tasks("default", "normal"))
    published = json.loads(entry.data or b"")
    assert published["task_id"] == accepted["task_id"]
    assert published["max_tokens"] == 4 and published["seed"] == 100


async def test_cancel(api: Api, client: Redis, keys: Keys) -> None:
    queued = (
        await api.call("POST", "/v1/tasks", "/v1/tasks", 202, body={"model": "echo", "prompt": "x"})
    )["task_id"]
    path, template = f"/v1/tasks/{queued}", "/v1/tasks/{task_id}"
    assert (await api.call("DELETE", path, template, 200))["outcome"] == "cancelled"
    assert (await api.call("DELETE", path, template, 409))["outcome"] == "finished"
    assert (await api.call("GET", path, template, 200))["state"] == "cancelled"
    for unknown in ("never-submitted", "bad%20id", "x" * 200):
        assert (await api.call("DELETE", f"/v1/tasks/{unknown}", template, 404))[
            "error"
        ] == "not_found"
    slow = {"model": "echo", "prompt": "a b c", "max_tokens": 200, "stream": True}
    running = (await api.call("POST", "/v1/tasks", "/v1/tasks", 202, body=slow))["task_id"]
    async with running_worker(client, keys, tokens_per_s=20, shutdown_grace_s=1):
        producer = Producer(ProducerConfig(namespace=keys.namespace), client=client)

        async def started() -> bool:
            record = await producer.status(running)
            return record is not None and record.state == "running"

        await wait_for(started, 10)
        answer = await api.call("DELETE", f"/v1/tasks/{running}", template, 202)
        assert answer["outcome"] == "requested"
        result = await producer.wait(running, timeout=10)
    assert result.state == "cancelled"


def _operations() -> list[tuple[str, str]]:
    return [
        (method.upper(), path)
        for path, item in DOC["paths"].items()
        for method in item
        if path not in {"/health/live", *OPEN_ROUTES}
    ]


def _concrete(path: str) -> str:
    return path.replace("{task_id}", "some-task").replace("{name}", "echo")


async def test_every_endpoint_but_the_page_and_liveness_needs_the_token(
    client: Redis, redis_url: str, namespace: str
) -> None:
    async with serving(client, redis_url, namespace, token=TOKEN) as api:
        for method, path in _operations():
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                async with api.http.request(
                    method, api.base + _concrete(path), headers=headers, json={}
                ) as r:
                    assert r.status == 401, (method, path, headers)
                    assert r.headers["WWW-Authenticate"] == "Bearer"
                    assert (await r.json())["error"] == "unauthorized"
            async with api.http.request(
                method,
                api.base + _concrete(path),
                headers={"Authorization": f"Bearer {TOKEN}"},
                json={},
            ) as r:
                assert r.status != 401, (method, path)
        for path in ("/", "/console/console.js", "/docs", "/docs/swagger-ui.css"):
            async with api.http.get(api.base + path) as r:
                assert r.status == 200, path
        # the token gets the console's data and actions
        await api.call("GET", "/v1/overview", "/v1/overview", 200, headers=_bearer())
        await api.call(
            "POST",
            "/v1/tasks",
            "/v1/tasks",
            202,
            body={"model": "echo", "prompt": "x"},
            headers=_bearer(),
        )


def _bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


async def test_changes_from_another_origin_are_refused(api: Api, client: Redis, keys: Keys) -> None:
    task = {"model": "echo", "prompt": "x"}
    for origin in ("http://evil.example", "http://127.0.0.1:1", "null"):
        refused = await api.call(
            "POST", "/v1/tasks", "/v1/tasks", 403, body=task, headers={"Origin": origin}
        )
        assert refused["error"] == "forbidden"
    assert await client.xlen(keys.tasks("default", "normal")) == 0
    await api.call("POST", "/v1/tasks", "/v1/tasks", 202, body=task, headers={"Origin": api.base})
    # reading is not a change: a GET from anywhere is answered (as it always was)
    await api.call("GET", "/v1/queue", "/v1/queue", 200, headers={"Origin": "http://evil.example"})


@pytest.mark.parametrize(
    ("token", "host", "status"),
    [
        (None, "sidecar.example:8080", 403),  # a name could be re-pointed at this host
        (None, "localhost:8080", 202),
        (None, "[::1]:8080", 202),
        (None, "10.1.2.3:8080", 202),
        (TOKEN, "sidecar.example:8080", 202),  # with a token, a host name is fine
    ],
)
async def test_without_a_token_changes_need_an_address(
    client: Redis, redis_url: str, namespace: str, token: str | None, host: str, status: int
) -> None:
    async with serving(client, redis_url, namespace, token=token) as api:
        await api.call(
            "POST",
            "/v1/tasks",
            "/v1/tasks",
            status,
            body={"model": "echo", "prompt": "x"},
            headers={"Host": host},
        )


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/v1/results?count=0", "/v1/results"),
        ("/v1/results?count=501", "/v1/results"),
        ("/v1/results?count=ten", "/v1/results"),
        ("/v1/results?count=%D9%A3", "/v1/results"),  # an Arabic-Indic digit is no integer here
        ("/v1/results?state=running", "/v1/results"),
        ("/v1/results?count=1&count=2", "/v1/results"),
        ("/v1/results?model=" + "m" * 300, "/v1/results"),
        ("/v1/dead?reason=bogus", "/v1/dead"),
        ("/v1/inflight?limit=-1", "/v1/inflight"),
        ("/v1/webhooks/dead?count=1001", "/v1/webhooks/dead"),
    ],
)
async def test_bad_query_parameters_are_a_400(api: Api, path: str, template: str) -> None:
    assert (await api.call("GET", path, template, 400))["error"] == "invalid_parameter"


async def test_redis_trouble_is_a_503(private_redis: RedisServer, namespace: str) -> None:
    client = Redis.from_url(private_redis.url, socket_timeout=1, socket_connect_timeout=1)
    try:
        async with serving(client, private_redis.url, namespace) as api:
            private_redis.stop()
            calls: list[tuple[str, str, Any]] = [
                ("GET", "/v1/overview", None),
                ("GET", "/v1/inflight", None),
                ("GET", "/v1/results", None),
                ("GET", "/v1/dead", None),
                ("GET", "/v1/webhooks/dead", None),
                ("GET", "/v1/models", None),
                ("GET", "/v1/queue", None),
                ("POST", "/v1/tasks", {"model": "echo", "prompt": "x"}),
                ("POST", "/v1/dead/requeue", {"all": True}),
                ("POST", "/v1/models", {"name": "m", "provider": "echo"}),
            ]
            for method, path, body in calls:
                answer = await api.call(method, path, path, 503, body=body)
                assert answer["error"] == "unavailable", (path, answer)
            async with api.http.get(api.base + "/health/live") as r:
                assert r.status == 200
    finally:
        await client.aclose()


async def test_a_token_stream_opens_for_a_submitted_task(
    api: Api, client: Redis, keys: Keys
) -> None:
    task = {"model": "echo", "prompt": "one two three", "max_tokens": 3, "stream": True}
    task_id = (await api.call("POST", "/v1/tasks", "/v1/tasks", 202, body=task))["task_id"]
    async with running_worker(client, keys):
        timeout = aiohttp.ClientTimeout(total=10)
        async with api.http.get(f"{api.base}/v1/tasks/{task_id}/stream", timeout=timeout) as r:
            body = await asyncio.wait_for(r.text(), 10)
    assert "event: delta" in body and "event: end" in body
