"""The llama.cpp adapter's chat templates, turn ends, prompt chunks and grammar token
references, on the tiny random-weight GGUF model (the real-model checks: test_gemma.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_cpp")

from sop_llm.handlers.policy import Fail, RetryPolicy
from sop_llm.providers.base import GenerationRequest
from sop_llm.providers.configured import ConfiguredProvider
from sop_llm.providers.errors import ProviderError
from sop_llm.providers.factory import build_provider
from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.models import ModelSpec
from sop_llm.schemas.task import ChatMessage, ResponseFormat


@pytest.fixture
async def tiny(tiny_gguf: Path) -> AsyncIterator[ConfiguredProvider]:
    provider = tiny_with(tiny_gguf)
    yield provider
    await provider.aclose()


def req(**kw: Any) -> GenerationRequest:
    kw.setdefault("prompt", "Hello world")
    return GenerationRequest(model="tiny", **kw)


@pytest.fixture(scope="module")
def tiny_gguf_without_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with no ``tokenizer.chat_template`` in its file."""
    gguf = pytest.importorskip("gguf")
    from tests.providers.tinygguf import write_tiny_gguf

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf.GGUFWriter, "add_chat_template", lambda self, value: None)
        return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "no-template.gguf")


def tiny_with(path: Path, **kw: Any) -> ConfiguredProvider:
    spec = ModelSpec(
        name="tiny", provider="llama_cpp", path=str(path), context_window=1024, n_threads=1, **kw
    )
    return build_provider(spec, env={})


CHAT = [ChatMessage(role="user", content="U")]


async def test_a_chat_task_without_a_template_fails_naming_the_setting(
    tiny_gguf_without_template: Path,
) -> None:
    provider = tiny_with(tiny_gguf_without_template)
    try:
        # a plain prompt needs no template
        gen = await provider.generate(req(max_tokens=3, seed=1))
        assert gen.usage.input_tokens == 13 and (gen.usage.output_tokens or 0) >= 1
        with pytest.raises(ProviderError) as info:
            await provider.generate(req(prompt=None, messages=CHAT, max_tokens=3))
    finally:
        await provider.aclose()
    err = info.value
    assert err.code == ErrorCode.BAD_REQUEST and not err.retryable
    assert (
        "has no chat template" in err.message and "chat_template in the model spec" in err.message
    )
    # the task ends failed with that message: no retry, no dead letter
    decision = RetryPolicy().decide(err, attempts=1, max_attempts=5)
    assert decision == Fail(ErrorCode.BAD_REQUEST, err.message, dead_letter=False)


# ends each turn with a control token llama.cpp does not count as end-of-generation
TURN_END_IM_START = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_start|>{% endfor %}"
    "[assistant] "
)


async def test_a_spec_template_overrides_the_files_and_its_turn_end_stops(tiny_gguf: Path) -> None:
    provider = tiny_with(tiny_gguf, chat_template=TURN_END_IM_START)
    # the model is made to write its turn's end, then more: generation stops at the end
    fmt = ResponseFormat(type="grammar", grammar='root ::= "ab" <|im_start|> "cd"')
    try:
        gen = await provider.generate(
            req(prompt=None, messages=CHAT, max_tokens=10, response_format=fmt)
        )
        plain = await provider.generate(req(max_tokens=10, response_format=fmt))
    finally:
        await provider.aclose()
    assert gen.text == "ab" and gen.finish_reason == "stop" and gen.usage.output_tokens == 2
    # <s> "[user] U" <|im_start|> "[assistant] ": one token per character but the controls
    assert gen.usage.input_tokens == 1 + 8 + 1 + 12
    assert plain.text == "ab" and plain.finish_reason == "stop"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{% for m in messages %}{{ m.content }", "does not compile"),
        ("{{ raise_exception('roles must alternate') }}", "chat template failed: roles must"),
    ],
)
async def test_a_broken_template_fails_chat_tasks_only(
    tiny_gguf: Path, template: str, expected: str
) -> None:
    provider = tiny_with(tiny_gguf, chat_template=template)
    try:
        gen = await provider.generate(req(max_tokens=3, seed=1))
        assert (gen.usage.output_tokens or 0) >= 1
        with pytest.raises(ProviderError) as info:
            await provider.generate(req(prompt=None, messages=CHAT, max_tokens=3))
    finally:
        await provider.aclose()
    assert info.value.code == ErrorCode.BAD_REQUEST and not info.value.retryable
    assert expected in info.value.message


async def test_prompts_are_evaluated_in_fixed_chunks_and_only_whole_ones_are_reused(
    tiny: ConfiguredProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sop_llm.providers.llama_cpp import LlamaCppProvider

    inner = tiny.inner
    assert isinstance(inner, LlamaCppProvider)
    await inner.load()
    assert inner._model is not None
    llm = inner._model.llm
    evaluated: list[tuple[int, int]] = []  # (offset, length) of each batch
    real_eval = llm.eval

    def eval_(tokens: Sequence[int]) -> None:
        evaluated.append((llm.n_tokens, len(tokens)))
        real_eval(tokens)

    monkeypatch.setattr(llm, "eval", eval_)
    shared = "Hello world, the JSON name of a tag is true and false " * 3
    a, b = shared + "in the world", shared + "of a name"
    tokens_a, tokens_b = (llm.tokenize(t.encode(), add_bos=True) for t in (a, b))
    common = next(i for i, (x, y) in enumerate(zip(tokens_a, tokens_b, strict=False)) if x != y)
    greedy, seeded = {"temperature": 0.0}, {"temperature": 1.0, "seed": 9}
    texts: list[str] = []
    for prompt, kw in [
        (a, greedy),
        (b, greedy),
        (a, greedy),
        (a, seeded),
        (b, seeded),
        (a, seeded),
    ]:
        evaluated.clear()
        gen = await tiny.generate(req(prompt=prompt, max_tokens=6, **kw))
        texts.append(gen.text)
        n = gen.usage.input_tokens
        assert n is not None and n > 2 * 64
        prompt_batches = [e for e in evaluated if e[0] < n - 1]
        # chunks of 64 at offsets 0, 64, 128, ...; then the last prompt token on its own
        assert all(offset % 64 == 0 and size <= 64 for offset, size in prompt_batches)
        assert prompt_batches[-1][0] + prompt_batches[-1][1] == n - 1
        assert evaluated[len(prompt_batches)] == (n - 1, 1)
        if len(texts) > 1:  # whole chunks of the shared prefix come from the cache
            assert prompt_batches[0][0] == common // 64 * 64 >= 64
    assert texts[0] == texts[2] and texts[3] == texts[5]


@pytest.mark.parametrize(
    "grammar",
    ['root ::= "ab" <|im_end|>', 'root ::= "ab" <[4]>', 'root ::= "a" ( <[99999]> | "b" )'],
)
async def test_a_grammar_requiring_an_unmatchable_token_is_refused(
    tiny: ConfiguredProvider, grammar: str
) -> None:
    # <|im_end|> (4) ends generation: llama.cpp lets it through only where the grammar is
    # complete, and aborts the process when its grammar leaves no token to pick
    fmt = ResponseFormat(type="grammar", grammar=grammar)
    with pytest.raises(ProviderError) as info:
        await tiny.generate(req(max_tokens=4, response_format=fmt))
    assert info.value.code == ErrorCode.BAD_REQUEST and "no output can match" in info.value.message


async def test_token_references_that_can_be_matched_are_kept(tiny: ConfiguredProvider) -> None:
    grammar = '# a comment may name <|im_end|>\nroot ::= "<|im_end|>" [<>] "x" !<|im_end|> "y"'
    fmt = ResponseFormat(type="grammar", grammar=grammar)
    gen = await tiny.generate(req(max_tokens=16, seed=1, response_format=fmt))
    assert gen.text.startswith("<|im_end|>") and gen.text.endswith("y")
