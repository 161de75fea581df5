"""Continuous batching (``parallel = N``) on the tiny random-weight GGUF model."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

pytest.importorskip("llama_cpp")

from sop_llm.providers.base import GenerationRequest
from sop_llm.providers.configured import ConfiguredProvider
from sop_llm.providers.factory import build_provider
from sop_llm.providers.llama_batch import LlamaBatchProvider
from sop_llm.schemas.models import ModelSpec
from sop_llm.schemas.task import JsonSchemaSpec, ResponseFormat

PROMPTS = (
    "Hello world",
    "The capital of France is",
    "Rain " * 40,  # over one 64-token prompt chunk
    "1, 2, 3,",
)
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def spec(path: Path, parallel: int, **kw: Any) -> ModelSpec:
    return ModelSpec(
        name="tiny", provider="llama_cpp", path=str(path), context_window=1024, n_threads=1,
        parallel=parallel, **kw,
    )  # fmt: skip


@pytest.fixture
async def pair(tiny_gguf: Path) -> AsyncIterator[tuple[ConfiguredProvider, ConfiguredProvider]]:
    one = build_provider(spec(tiny_gguf, 1), env={})
    four = build_provider(spec(tiny_gguf, 4), env={})
    yield one, four
    await one.aclose()
    await four.aclose()


def req(prompt: str, **kw: Any) -> GenerationRequest:
    return GenerationRequest(model="tiny", prompt=prompt, **kw)


def test_parallel_is_the_models_concurrency_and_gpu_slots(tiny_gguf: Path) -> None:
    provider = build_provider(spec(tiny_gguf, 4), env={})
    assert isinstance(provider.inner, LlamaBatchProvider)
    assert provider.capabilities.max_concurrency == 4 and provider.capabilities.needs_gpu_slot
    assert provider.capabilities.reserved == 1  # a spare sequence for high tasks
    assert spec(tiny_gguf, 4, concurrency=4, gpu_slots=4).parallel == 4
    with pytest.raises(ValidationError, match="concurrency must equal parallel"):
        spec(tiny_gguf, 4, concurrency=2)
    with pytest.raises(ValidationError, match="gpu_slots must equal parallel"):
        spec(tiny_gguf, 2, gpu_slots=1)
    with pytest.raises(ValidationError, match="only for provider 'llama_cpp'"):
        ModelSpec(name="e", provider="echo", parallel=2)


async def test_each_sequence_gives_the_text_it_gives_alone(
    pair: tuple[ConfiguredProvider, ConfiguredProvider],
) -> None:
    one, four = pair
    alone = [await one.generate(req(p, max_tokens=20, temperature=0)) for p in PROMPTS]
    together = await asyncio.gather(
        *(four.generate(req(p, max_tokens=20, temperature=0)) for p in PROMPTS)
    )
    assert [g.text for g in together] == [g.text for g in alone]
    assert [g.usage for g in together] == [g.usage for g in alone]
    assert [g.finish_reason for g in together] == [g.finish_reason for g in alone]
    # a seed too: the same sampler chain as the one-at-a-time path
    seeded = [req(p, max_tokens=16, temperature=1.0, seed=7) for p in PROMPTS]
    alone = [await one.generate(r) for r in seeded]
    together = await asyncio.gather(*(four.generate(r) for r in seeded))
    assert [g.text for g in together] == [g.text for g in alone]


async def test_a_sequence_joins_the_running_batch(
    pair: tuple[ConfiguredProvider, ConfiguredProvider],
) -> None:
    one, four = pair
    long = req("Hello world", max_tokens=200, temperature=0)
    first = asyncio.create_task(four.generate(long))
    await asyncio.sleep(0.01)
    late = await four.generate(req("1, 2, 3,", max_tokens=10, temperature=0))
    assert not first.done()  # it joined, it did not wait for the long one
    assert late.text == (await one.generate(req("1, 2, 3,", max_tokens=10, temperature=0))).text
    assert (await first).text == (await one.generate(long)).text


async def test_the_reserved_sequence_runs_beside_a_full_batch(
    pair: tuple[ConfiguredProvider, ConfiguredProvider],
) -> None:
    """parallel = 4 holds a fifth sequence (the worker gives it to high tasks only): five
    generations decode together, each giving the text it gives alone."""
    one, four = pair
    prompts = [*PROMPTS, "Once upon a time"]
    seen: list[list[str]] = [[] for _ in prompts]
    running = [
        asyncio.create_task(
            four.generate(req(p, max_tokens=60, temperature=0), on_delta=seen[i].append)
        )
        for i, p in enumerate(prompts)
    ]
    async with asyncio.timeout(20):
        while not all(seen):
            await asyncio.sleep(0.005)
    assert not any(t.done() for t in running)  # all five had tokens out while none had ended
    alone = [await one.generate(req(p, max_tokens=60, temperature=0)) for p in prompts]
    assert [(await t).text for t in running] == [g.text for g in alone]


async def test_grammar_stop_and_streaming_inside_a_batch(
    pair: tuple[ConfiguredProvider, ConfiguredProvider],
) -> None:
    _, four = pair
    fmt = ResponseFormat(type="json_schema", json_schema=JsonSchemaSpec(name="p", schema_=PERSON))
    deltas: list[str] = []
    shaped, plain, stopped = await asyncio.gather(
        four.generate(req("A person:", max_tokens=64, seed=3, response_format=fmt)),
        four.generate(req("Hello world", max_tokens=24, seed=5), on_delta=deltas.append),
        four.generate(req("Hello world", max_tokens=24, seed=5, stop=["a"])),
    )
    jsonschema.validate(json.loads(shaped.text), PERSON)
    assert "".join(deltas) == plain.text and (plain.usage.output_tokens or 0) >= 1
    assert "a" not in stopped.text


async def test_a_cancelled_sequence_leaves_the_others_alone(
    pair: tuple[ConfiguredProvider, ConfiguredProvider],
) -> None:
    one, four = pair
    endless = req(
        "Hello world",
        max_tokens=900,
        response_format=ResponseFormat(type="grammar", grammar="root ::= [a-z] root"),
    )
    deltas: list[str] = []
    doomed = asyncio.create_task(four.generate(endless, on_delta=deltas.append))
    others = [
        asyncio.create_task(four.generate(req(p, max_tokens=40, temperature=0)))
        for p in PROMPTS[:3]
    ]
    async with asyncio.timeout(10):
        while len(deltas) < 5:
            await asyncio.sleep(0.005)
    cancelled_at = time.monotonic()
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert time.monotonic() - cancelled_at < 2.0
    assert endless.spent.output_tokens == len(deltas) and endless.spent.input_tokens == 13
    alone = [await one.generate(req(p, max_tokens=40, temperature=0)) for p in PROMPTS[:3]]
    assert [(await t).text for t in others] == [g.text for g in alone]
    # its slot is free again: four more run at once
    more = await asyncio.gather(*(four.generate(req(p, max_tokens=3)) for p in PROMPTS))
    assert all((g.usage.output_tokens or 0) >= 1 for g in more)


async def test_unload_waits_for_the_batch_and_loads_again(tiny_gguf: Path) -> None:
    provider = build_provider(spec(tiny_gguf, 2), env={})
    inner = provider.inner
    assert isinstance(inner, LlamaBatchProvider) and not inner.loaded
    running = asyncio.create_task(provider.generate(req("Hello world", max_tokens=30)))
    await asyncio.sleep(0.01)
    await inner.unload()
    assert not inner.loaded
    # its generation ended in the batch before the close (the answer is already set: the task
    # itself may need one more turn of the event loop to see it)
    gen = await asyncio.wait_for(running, timeout=1)
    assert gen.finish_reason in ("length", "stop") and gen.usage.output_tokens
    assert (
        (await provider.generate(req("Hello world", max_tokens=2))).usage.output_tokens or 0
    ) >= 1
    await provider.aclose()
