"""Token streaming: Redis stream of deltas, SSE from the sidecar, the SDK iterator."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
from pydantic import SecretStr
from redis.asyncio import Redis

from sop_llm.ops.settings import Settings
from sop_llm.ops.sidecar import Sidecar
from sop_llm.streams.keys import Keys
from sop_llm.streams.producer import Producer, ProducerConfig
from tests.conftest import wait_for
from tests.harness import running_worker


async def _sse(url: str) -> list[tuple[str, dict[str, str]]]:
    events: list[tuple[str, dict[str, str]]] = []
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        name = ""
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


async def test_stream_live_and_late_over_sse_and_sdk(
    client: Redis, keys: Keys, redis_url: str
) -> None:
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    settings = Settings(redis_url=SecretStr(redis_url), namespace=keys.namespace, sidecar_port=0)
    side = Sidecar(client=client, settings=settings)
    async with side.running(), running_worker(client, keys, tokens_per_s=200):
        base = f"http://127.0.0.1:{side.port}"
        task_id = await p.submit("echo", "one two three", max_tokens=60, stream=True)
        await wait_for(lambda: client.exists(keys.task_tokens(task_id)), 5)
        live_sse, sdk = await asyncio.gather(
            _sse(f"{base}/v1/tasks/{task_id}/stream"), _collect(p.stream(task_id))
        )
        result = await p.wait(task_id, timeout=5)
        late_sse = await _sse(f"{base}/v1/tasks/{task_id}/stream")  # after the end: a replay
        async with aiohttp.ClientSession() as http, http.get(f"{base}/v1/tasks/nope/stream") as r:
            assert r.status == 404
    for events in (live_sse, late_sse):
        assert "".join(e["text"] for n, e in events if n == "delta") == result.text
        assert events[-1] == ("end", {"state": "completed", "finish_reason": "length"})
    assert "".join(sdk) == result.text
    # batched: far fewer entries than the 60 tokens
    entries = await client.xlen(keys.task_tokens(task_id))
    assert 2 <= entries < 40, entries
    assert 0 < await client.ttl(keys.task_tokens(task_id)) <= 3600


async def test_task_without_streaming_yields_its_text_once_finished(
    client: Redis, keys: Keys
) -> None:
    p = Producer(ProducerConfig(namespace=keys.namespace), client=client)
    async with running_worker(client, keys):
        task_id = await p.submit("echo", "all at once", max_tokens=3)
        await p.wait(task_id, timeout=5)
        assert await _collect(p.stream(task_id)) == ["all at once"]
    assert await client.exists(keys.task_tokens(task_id)) == 0


async def _collect(stream: AsyncIterator[str]) -> list[str]:
    out = []
    async with asyncio.timeout(10):
        async for text in stream:
            out.append(text)
    return out
