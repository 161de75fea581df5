"""The llama.cpp adapter, running the tiny random-weight GGUF model for real."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

pytest.importorskip("llama_cpp")

from sop_llm.providers.base import Delta, Generation, GenerationRequest, stream
from sop_llm.providers.configured import ConfiguredProvider
from sop_llm.providers.errors import ProviderError
from sop_llm.providers.factory import build_provider
from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.models import ModelSpec
from sop_llm.schemas.task import ChatMessage, JsonSchemaSpec, ResponseFormat

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "score": {"type": "integer", "minimum": -5, "maximum": 5},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "score"],
    "additionalProperties": False,
}


@pytest.fixture
async def tiny(tiny_gguf: Path) -> AsyncIterator[ConfiguredProvider]:
    spec = ModelSpec(
        name="tiny", provider="llama_cpp", path=str(tiny_gguf), context_window=1024, n_threads=1
    )
    provider = build_provider(spec, env={})
    yield provider
    await provider.aclose()


def req(**kw: Any) -> GenerationRequest:
    kw.setdefault("prompt", "Hello world")
    return GenerationRequest(model="tiny", **kw)


async def test_plain_generation_counts_real_tokens(tiny: ConfiguredProvider) -> None:
    assert tiny.capabilities.needs_gpu_slot and tiny.capabilities.max_concurrency == 1
    gen = await tiny.generate(req(max_tokens=12, seed=1))
    assert gen.text and gen.finish_reason in ("length", "stop")
    # "Hello world": BOS, the SPM space marker, 11 characters of a character-level vocabulary
    assert gen.usage.input_tokens == 13
    assert 1 <= (gen.usage.output_tokens or 0) <= 12
    if gen.finish_reason == "length":
        assert gen.usage.output_tokens == 12


async def test_streaming_deltas_add_up_to_the_text(tiny: ConfiguredProvider) -> None:
    deltas: list[str] = []
    gen = await tiny.generate(req(max_tokens=24, seed=5), on_delta=deltas.append)
    assert len(deltas) > 1 and "".join(deltas) == gen.text
    items = [item async for item in stream(tiny, req(max_tokens=24, seed=5))]
    assert isinstance(items[-1], Generation) and items[-1].text == gen.text
    assert "".join(i.text for i in items[:-1] if isinstance(i, Delta)) == gen.text


async def test_a_seed_reproduces_its_output(tiny: ConfiguredProvider) -> None:
    a = await tiny.generate(req(max_tokens=24, seed=42, temperature=1.0))
    b = await tiny.generate(req(max_tokens=24, seed=42, temperature=1.0))
    others = {
        (await tiny.generate(req(max_tokens=24, seed=s, temperature=1.0))).text for s in (1, 2, 3)
    }
    assert a.text == b.text
    assert len(others | {a.text}) > 1  # other seeds give other text


async def test_chat_messages_use_the_files_template(tiny: ConfiguredProvider) -> None:
    messages = [ChatMessage(role="system", content="S"), ChatMessage(role="user", content="U")]
    gen = await tiny.generate(req(prompt=None, messages=messages, max_tokens=4, temperature=0.0))
    # <s> <|im_start|>system\nS<|im_end|>\n <|im_start|>user\nU<|im_end|>\n
    # <|im_start|>assistant\n: control tokens are one token each, the rest one per character
    assert gen.usage.input_tokens == 1 + (1 + 7 + 1 + 1 + 1 + 1) + (1 + 5 + 1 + 1 + 1 + 1) + (
        1 + 10
    )


async def test_stop_sequences_cut_the_text(tiny: ConfiguredProvider) -> None:
    full = await tiny.generate(req(max_tokens=40, temperature=0.0))
    cut_at = next(i for i in range(4, len(full.text)) if full.text[i].isprintable())
    stop = full.text[cut_at : cut_at + 2]
    deltas: list[str] = []
    gen = await tiny.generate(
        req(max_tokens=40, temperature=0.0, stop=(stop,)), on_delta=deltas.append
    )
    assert gen.finish_reason == "stop"
    assert gen.text == full.text[: full.text.find(stop)]
    assert "".join(deltas) == gen.text  # nothing of the stop sequence was streamed


async def test_a_prompt_over_the_context_window(tiny: ConfiguredProvider) -> None:
    with pytest.raises(ProviderError) as info:
        await tiny.generate(req(prompt="x" * 2000))
    assert info.value.code == ErrorCode.CONTEXT_LENGTH and not info.value.retryable


async def test_cancellation_stops_the_thread_between_tokens(tiny_gguf: Path) -> None:
    spec = ModelSpec(
        name="tiny", provider="llama_cpp", path=str(tiny_gguf), context_window=32768, n_threads=1
    )
    provider = build_provider(spec, env={})
    # a grammar that never completes: the model cannot end the generation on its own
    endless = req(
        max_tokens=30000,
        response_format=ResponseFormat(type="grammar", grammar="root ::= [a-z] root"),
    )
    deltas: list[str] = []
    task = asyncio.create_task(provider.generate(endless, on_delta=deltas.append))
    async with asyncio.timeout(10):
        while len(deltas) < 5:
            await asyncio.sleep(0.005)
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - cancelled_at < 2.0
    # generate() returned only once the thread stopped: nothing more arrives
    seen = len(deltas)
    await asyncio.sleep(0.1)
    assert len(deltas) == seen < 30000
    assert not any(
        t.name.startswith("llama-tiny") and t.is_alive() and _busy(t) for t in threading.enumerate()
    )
    # a deadline around the call takes the same path
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await provider.generate(endless)
    # and the model is free again at once
    gen = await provider.generate(req(max_tokens=3, seed=1))
    assert (gen.usage.output_tokens or 0) >= 1
    await provider.aclose()


def _busy(thread: threading.Thread) -> bool:
    # an idle pool thread waits on its work queue; a busy one is inside llama.cpp
    import sys

    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == "_decode":
            return True
        frame = frame.f_back
    return False


def person() -> ResponseFormat:
    return ResponseFormat(
        type="json_schema", json_schema=JsonSchemaSpec(name="person", schema_=PERSON)
    )


async def test_json_schema_output_parses_and_validates(tiny: ConfiguredProvider) -> None:
    for seed in range(8):
        gen = await tiny.generate(
            req(prompt="A person:", max_tokens=96, seed=seed, response_format=person())
        )
        value = json.loads(gen.text)  # strict: no raw control characters
        jsonschema.validate(value, PERSON)
        assert 18 <= value["age"] <= 99 and -5 <= value["score"] <= 5


async def test_the_model_is_shown_the_schema(tiny: ConfiguredProvider) -> None:
    plain = await tiny.generate(req(prompt="A person:", max_tokens=1, seed=0))
    shaped = await tiny.generate(
        req(prompt="A person:", max_tokens=96, seed=0, response_format=person())
    )
    assert (shaped.usage.input_tokens or 0) > (plain.usage.input_tokens or 0) + 100


async def test_a_raw_grammar_constrains_the_output(tiny: ConfiguredProvider) -> None:
    fmt = ResponseFormat(type="grammar", grammar='root ::= ("yes" | "no") "!"')
    for seed in range(4):
        gen = await tiny.generate(req(max_tokens=8, seed=seed, response_format=fmt))
        assert gen.text in ("yes!", "no!") and gen.finish_reason == "stop"


async def test_a_grammar_that_does_not_parse_is_a_bad_request(tiny: ConfiguredProvider) -> None:
    fmt = ResponseFormat(type="grammar", grammar="root ::= (unclosed")
    with pytest.raises(ProviderError) as info:
        await tiny.generate(req(max_tokens=8, response_format=fmt))
    assert info.value.code == ErrorCode.BAD_REQUEST


async def test_building_reads_the_header_and_loading_is_on_demand(tiny_gguf: Path) -> None:
    from sop_llm.providers.base import Loadable
    from sop_llm.providers.llama_cpp import LlamaCppProvider

    spec = ModelSpec(
        name="tiny", provider="llama_cpp", path=str(tiny_gguf), context_window=1024,
        n_threads=1, n_gpu_layers=-1,
    )  # fmt: skip
    provider = build_provider(spec, env={})
    inner = provider.inner
    assert isinstance(inner, LlamaCppProvider) and isinstance(inner, Loadable)
    assert not inner.loaded  # nothing but the header was read
    # all layers offloaded: the file's bytes plus an f16 KV cache of 2 layers, n_embd_kv 64
    size = await asyncio.to_thread(os.path.getsize, tiny_gguf)
    assert inner.estimated_bytes() == size + 2 * 1024 * 64 * 2 * 2
    await inner.load()
    assert inner.loaded
    await inner.unload()
    assert not inner.loaded
    gen = await provider.generate(req(max_tokens=3, seed=1))  # loads lazily
    assert inner.loaded and (gen.usage.output_tokens or 0) >= 1
    await provider.aclose()
    assert not inner.loaded


async def test_a_cpu_model_needs_no_device_memory(tiny: ConfiguredProvider) -> None:
    from sop_llm.providers.llama_cpp import LlamaCppProvider

    assert isinstance(tiny.inner, LlamaCppProvider) and tiny.inner.estimated_bytes() == 0


def test_a_missing_or_broken_file_is_refused_when_built(tmp_path: Path) -> None:
    from sop_llm.providers.factory import ModelConfigError

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    for path in (tmp_path / "missing.gguf", broken):
        spec = ModelSpec(name="bad", provider="llama_cpp", path=str(path))
        with pytest.raises(ModelConfigError, match="cannot load"):
            build_provider(spec, env={})
