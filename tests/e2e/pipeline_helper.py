"""The whole pipeline for provider tests: specs -> registry -> a real worker, a real sidecar.

``pipeline(...)`` builds the registry from :class:`~schemas.models.ModelSpec` values with
``providers.loader.load_registry`` (the same path a worker takes from its models file), runs a
worker over it and a sidecar beside it, and hands back a producer bound to the test's namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import SecretStr
from redis.asyncio import Redis

from sop_llm.handlers.tasks import Worker
from sop_llm.ops.settings import Settings
from sop_llm.ops.sidecar import Sidecar
from sop_llm.providers.loader import load_registry
from sop_llm.providers.registry import ModelRegistry
from sop_llm.schemas.models import ModelSpec
from sop_llm.schemas.result import TaskResult
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.harness import results, running_worker
from tests.providers.wire import Reply

ENV: Mapping[str, str] = {"E2E_OPENAI_KEY": "sk-e2e-openai", "E2E_ANTHROPIC_KEY": "sk-e2e-ant"}


@dataclass(frozen=True, slots=True)
class Pipeline:
    producer: Producer
    worker: Worker
    registry: ModelRegistry
    sidecar_url: str


@contextlib.asynccontextmanager
async def pipeline(
    client: Redis,
    keys: Keys,
    redis_url: str,
    specs: Sequence[ModelSpec],
    **worker_config: Any,
) -> AsyncIterator[Pipeline]:
    """A worker serving ``specs`` (and a sidecar) in ``keys``' namespace until the block ends."""
    registry, loader = await load_registry(specs, env=ENV)
    settings = Settings(redis_url=SecretStr(redis_url), namespace=keys.namespace, sidecar_port=0)
    side = Sidecar(client=client, settings=settings)
    producer = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with (
        loader,  # closes the providers after the worker has stopped
        side.running(),
        running_worker(client, keys, registry=registry, **worker_config) as worker,
    ):
        yield Pipeline(producer, worker, registry, f"http://127.0.0.1:{side.port}")


async def result_of(client: Redis, keys: Keys, task_id: str, timeout: float = 10.0) -> TaskResult:
    """``task_id``'s entry on the shared ``results`` stream (read there, not from the status
    record), waiting up to ``timeout`` s for it."""
    async with asyncio.timeout(timeout):
        while True:
            found = [r for r in await results(client, keys) if r.task_id == task_id]
            if found:
                assert len(found) == 1, f"{len(found)} results for {task_id}"
                return found[0]
            await asyncio.sleep(0.02)


async def sse_events(url: str, timeout: float = 10.0) -> list[tuple[str, dict[str, Any]]]:
    """Every ``(event, data)`` of a server-sent-events response, read to its end."""
    events: list[tuple[str, dict[str, Any]]] = []
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as http, http.get(url) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/event-stream")
        name = ""
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def by_mode(*, plain: Reply, streamed: Reply) -> Reply:
    """``streamed`` when the request asks for a stream (``"stream": true``), else ``plain``:
    a backend that answers whichever way it is asked (the worker streams every call, so it
    can keep the partial text of a cancelled generation)."""

    async def reply(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else {}
        wants_stream = isinstance(body, dict) and body.get("stream") is True
        return await (streamed if wants_stream else plain)(request)

    return reply


def timed(reply: Reply, hits: list[float]) -> Reply:
    """``reply``, noting the monotonic time at which the server got the request."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        hits.append(time.monotonic())
        return await reply(request)

    return wrapped


def hanging(release: asyncio.Event) -> Reply:
    """A reply that never comes (until ``release`` is set): a backend that accepted the
    connection and went silent."""

    async def reply(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"error": {"message": "released"}}, status=503)

    return reply
