"""The built-in ``echo`` provider: deterministic output with no model at all.

It answers with exactly ``max_tokens`` tokens (default 16): the prompt's words in order,
cycling when they run out, at ``tokens_per_s`` tokens per second (0: no delay, and then it is
the same path as any model).
"""

from __future__ import annotations

import asyncio
import itertools
import time

from sop_llm.providers.base import Capabilities, DeltaSink, Generation, GenerationRequest
from sop_llm.schemas.result import Usage

DEFAULT_MAX_TOKENS = 16


class EchoProvider:
    def __init__(self, *, tokens_per_s: float = 0.0, slots: int = 64) -> None:
        if tokens_per_s < 0:
            raise ValueError("tokens_per_s must be >= 0")
        self._tokens_per_s = tokens_per_s
        self._capabilities = Capabilities(streaming=True, max_concurrency=slots)

    @property
    def name(self) -> str:
        return "echo"

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    async def generate(
        self, request: GenerationRequest, *, on_delta: DeltaSink | None = None
    ) -> Generation:
        words, tokens = _tokens(request)
        spent = request.spent
        spent.input_tokens += len(words)
        if self._tokens_per_s > 0 or on_delta is not None:
            start = time.monotonic()
            for i, token in enumerate(tokens):
                if self._tokens_per_s > 0:
                    # pace against the start time so per-token sleep overhead does not add up
                    delay = start + (i + 1) / self._tokens_per_s - time.monotonic()
                    await asyncio.sleep(max(0.0, delay))
                spent.output_tokens += 1
                if on_delta is not None:
                    on_delta(token if i == 0 else " " + token)
        else:
            spent.output_tokens += len(tokens)
        return _generation(words, tokens)


def _tokens(request: GenerationRequest) -> tuple[list[str], list[str]]:
    words = request.words_source().split()
    wanted = request.max_tokens or DEFAULT_MAX_TOKENS
    if len(words) >= wanted:
        return words, words[:wanted]
    return words, list(itertools.islice(itertools.cycle(words), wanted)) if words else []


def _generation(words: list[str], tokens: list[str]) -> Generation:
    return Generation(
        text=" ".join(tokens),
        finish_reason="length",
        usage=Usage(input_tokens=len(words), output_tokens=len(tokens)),
    )
