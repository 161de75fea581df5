"""The remote adapters' HTTP transport (providers/http.py), through the official SDKs against
a local server: a pool as large as the model's concurrency, every connection kept alive, and
a server that hangs up reported as such."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from sop_llm.providers.base import GenerationRequest
from sop_llm.providers.errors import ProviderError
from sop_llm.providers.factory import build_provider
from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.models import ModelSpec
from tests.providers.wire import FakeServer, Reply, an_message, oa_completion

# past the 100 connections the SDKs' default httpx client keeps alive
CALLS = 130
WIRE: dict[str, tuple[str, Any]] = {
    "openai": ("/v1", oa_completion("ok")),
    "anthropic": ("", an_message([{"type": "text", "text": "ok"}])),
}


def spec(server: FakeServer, provider: str, **fields: Any) -> ModelSpec:
    return ModelSpec(
        name="m",
        provider=provider,
        model_id="x",
        base_url=server.url + WIRE[provider][0],
        timeout_s=10.0,
        **fields,
    )


def all_at_once(barrier: asyncio.Barrier, body: Any) -> Reply:
    """A reply given only once ``barrier``'s every party has arrived: only as many calls at
    once as the pool allows would never get there."""

    async def reply(request: web.Request) -> web.StreamResponse:
        await barrier.wait()
        return web.json_response(body)

    return reply


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_the_pool_holds_the_models_concurrency_and_keeps_it_alive(
    server: FakeServer, provider: str
) -> None:
    p = build_provider(spec(server, provider, concurrency=CALLS), env={})
    try:
        for wave in range(2):
            barrier = asyncio.Barrier(CALLS)
            server.script(*(all_at_once(barrier, WIRE[provider][1]) for _ in range(CALLS)))
            async with asyncio.timeout(20):
                gens = await asyncio.gather(
                    *(
                        p.generate(GenerationRequest(model="m", prompt=f"{wave}-{i}"))
                        for i in range(CALLS)
                    )
                )
            assert {g.text for g in gens} == {"ok"}
    finally:
        await p.aclose()
    first, second = server.seen[:CALLS], server.seen[CALLS:]
    assert len({s.peer for s in first}) == CALLS
    # the second wave went out on the first wave's connections: none was closed and reopened
    assert {s.peer for s in second} == {s.peer for s in first}


async def hang_up(request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.close()
    return web.Response()


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_server_that_hangs_up_is_a_retryable_connection_failure(
    server: FakeServer, provider: str
) -> None:
    server.script(hang_up)
    p = build_provider(spec(server, provider), env={})
    with pytest.raises(ProviderError) as info:
        await p.generate(GenerationRequest(model="m", prompt="hi"))
    await p.aclose()
    err = info.value
    # not "no reply within the timeout": the server went away at once
    assert err.code == ErrorCode.INTERNAL and err.retryable
    assert "connection failed" in err.message and "disconnected" in err.message.lower()
