"""The OpenAPI document: current on disk, well formed, and true to what the sidecar answers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from jsonschema import Draft202012Validator
from pydantic import SecretStr
from redis.asyncio import Redis

from sop_llm.gpu.admission import Admission, AdmissionConfig
from sop_llm.gpu.semaphore import Device, GpuSemaphore, SemaphoreConfig
from sop_llm.gpu.snapshot import gpu_snapshot
from sop_llm.ops.asyncapi import asyncapi_document
from sop_llm.ops.gpu_setup import device_keys
from sop_llm.ops.openapi import openapi_document, render
from sop_llm.ops.settings import Settings
from sop_llm.ops.sidecar import Sidecar
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import ROOT
from tests.gpu.fakes import GIB, FakeGpu
from tests.harness import running_worker
from tests.ops.docschema import refs, resolve, validate

# documented, served once ops/sidecar.py wires them; until then only their documents are checked
_NOT_YET_SERVED: set[str] = set()


def _doc() -> dict[str, Any]:
    return openapi_document()


def _response_schema(doc: dict[str, Any], path: str, status: int) -> str:
    """The pointer of the JSON schema documented for ``GET path`` answering ``status``."""
    pointer = f"#/paths/{path.replace('/', '~1')}/get/responses/{status}"
    response = resolve(doc, pointer)
    if "$ref" in response:
        pointer = response["$ref"]
    return f"{pointer}/content/application~1json/schema"


async def _check(
    http: aiohttp.ClientSession, base: str, path: str, template: str, status: int
) -> Any:
    """GET ``path``; its status is ``status`` and its JSON body is what the document says."""
    doc = _doc()
    assert str(status) in doc["paths"][template]["get"]["responses"], f"{template} {status}"
    async with http.get(base + path) as r:
        assert r.status == status, await r.text()
        assert r.content_type == "application/json"
        body = await r.json()
    validate(doc, _response_schema(doc, template, status), body)
    return body


def _settings(redis_url: str, namespace: str, **kw: object) -> Settings:
    return Settings(redis_url=SecretStr(redis_url), namespace=namespace, sidecar_port=0, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def sidecar(client: Redis, redis_url: str, namespace: str) -> AsyncIterator[Sidecar]:
    side = Sidecar(client=client, settings=_settings(redis_url, namespace))
    async with side.running():
        yield side


def _served(side: Sidecar) -> set[str]:
    return {
        route.resource.canonical
        for route in side.app().router.routes()
        if route.method == "GET" and route.resource is not None
    }


def _served_operations(side: Sidecar) -> set[tuple[str, str]]:
    return {
        (route.method.lower(), route.resource.canonical)
        for route in side.app().router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


# the console's files hold no data: served without the token, like the liveness probe
_OPEN_PATHS = {"/health/live", "/", "/console/{name}", "/docs", "/docs/{name}"}


def test_openapi_doc_is_current() -> None:
    current = (ROOT / "docs" / "openapi.json").read_text()
    assert current == render(), "regenerate: python -m sop_llm.ops.openapi docs/openapi.json"


def test_document_structure() -> None:
    doc = _doc()
    assert doc["openapi"] == "3.1.0"
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    assert doc["security"] == [{"bearerAuth": []}, {}]  # the token is optional
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    for path, item in doc["paths"].items():
        assert set(item) <= {"get", "post", "delete"}, path
        for op in item.values():
            if path in _OPEN_PATHS:
                assert op["security"] == [] and "401" not in op["responses"]
            else:
                assert "security" not in op and "401" in op["responses"], path
            for param in op.get("parameters", []):
                param = resolve(doc, param["$ref"]) if "$ref" in param else param
                if param["in"] == "path":
                    assert "{" + param["name"] + "}" in path
    for ref in set(refs(doc)):
        resolve(doc, ref)
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


async def test_every_served_route_is_documented(sidecar: Sidecar) -> None:
    served, documented = _served(sidecar), set(_doc()["paths"])
    assert served <= documented, f"undocumented: {served - documented}"
    operations = {(m, p) for p, item in _doc()["paths"].items() for m in item}
    served_ops = _served_operations(sidecar)
    assert served_ops <= operations, f"undocumented: {served_ops - operations}"
    assert {p for _, p in operations - served_ops} <= _NOT_YET_SERVED


async def test_answers_match_the_document(sidecar: Sidecar, client: Redis, keys: Keys) -> None:
    base = f"http://127.0.0.1:{sidecar.port}"
    served = _served(sidecar)
    producer = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    task_id = await producer.submit("echo", "one two three", max_tokens=3, stream=True)
    async with aiohttp.ClientSession() as http:
        await _check(http, base, f"/v1/tasks/{task_id}", "/v1/tasks/{task_id}", 200)
        await _check(http, base, "/v1/queue", "/v1/queue", 200)  # no groups yet
        ready = await _check(http, base, "/health/ready", "/health/ready", 503)
        assert ready["problems"]
        async with running_worker(client, keys):
            await producer.wait(task_id, timeout=10)
            await _check(http, base, "/health/ready", "/health/ready", 200)
        record = await _check(http, base, f"/v1/tasks/{task_id}", "/v1/tasks/{task_id}", 200)
        assert record["result"]["text"] == "one two three"
        queue = await _check(http, base, "/v1/queue", "/v1/queue", 200)
        assert all(row["group"] for row in queue["partitions"])
        await _check(http, base, "/v1/tasks/nope", "/v1/tasks/{task_id}", 404)
        await _check(http, base, "/v1/tasks/bad%20id", "/v1/tasks/{task_id}", 404)
        await _check(http, base, "/health/live", "/health/live", 200)
        async with http.get(f"{base}/metrics") as r:
            assert r.status == 200 and r.content_type == "text/plain"
            assert "sop_queue_depth" in await r.text()
        if "/v1/gpu" in served:
            await _check(http, base, "/v1/gpu", "/v1/gpu", 200)
        if "/asyncapi.json" in served:
            body = await _check(http, base, "/asyncapi.json", "/asyncapi.json", 200)
            assert body == asyncapi_document(keys.namespace)
        if "/openapi.json" in served:
            assert await _check(http, base, "/openapi.json", "/openapi.json", 200) == _doc()
        await _check_stream(http, f"{base}/v1/tasks/{task_id}/stream")


async def _check_stream(http: aiohttp.ClientSession, url: str) -> None:
    """The documented event stream: delta events, then one end event, then the end."""
    doc = _doc()
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        raw = await r.text()
    events: list[tuple[str, Any]] = []
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):  # a line starting with ':' is a comment
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
        if "data" in fields:
            events.append((fields.get("event", "message"), json.loads(fields["data"])))
    kinds = [kind for kind, _ in events]
    assert kinds and kinds[-1] == "end" and set(kinds[:-1]) == {"delta"}
    for kind, data in events:
        name = "TokenEnd" if kind == "end" else "TokenDelta"
        validate(doc, f"#/components/schemas/{name}", data)


async def test_the_token_guards_everything_but_liveness(
    client: Redis, redis_url: str, namespace: str
) -> None:
    side = Sidecar(client=client, settings=_settings(redis_url, namespace, sidecar_token="s3"))
    async with side.running(), aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{side.port}"
        await _check(http, base, "/v1/queue", "/v1/queue", 401)
        await _check(http, base, "/health/ready", "/health/ready", 401)
        await _check(http, base, "/health/live", "/health/live", 200)
        async with http.get(f"{base}/v1/queue", headers={"Authorization": "Bearer s3"}) as r:
            assert r.status == 200


async def test_the_gpu_snapshot_matches_the_document(client: Redis, keys: Keys) -> None:
    gpu = FakeGpu(total=[16 * GIB], sizes={"qwen": 4 * GIB})
    admission = Admission(reader=gpu, loader=gpu, config=AdmissionConfig())
    sem = GpuSemaphore(
        client=client,
        keys=device_keys(keys, "host-a", 0),
        device=Device("host-a", 0),
        config=SemaphoreConfig(permits=1, lease_ms=5000, poll_s=0.05),
    )
    async with (
        sem.slot(priority=0, holder_id="worker-1:t1", timeout=5),
        admission.use("qwen", need_bytes=4 * GIB),
    ):
        snap = await gpu_snapshot(reader=gpu, admission=admission, semaphores=[sem])
    assert snap["devices"] and snap["models"] and snap["semaphores"] and snap["errors"] == []
    validate(_doc(), "#/components/schemas/GpuSnapshot", json.loads(json.dumps(snap)))
    assert set(snap) == set(_doc()["components"]["schemas"]["GpuSnapshot"]["properties"])
