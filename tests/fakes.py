"""Fakes implementing our own protocols (no mocks)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from sop_llm.providers.base import Capabilities, DeltaSink, Generation, GenerationRequest
from sop_llm.schemas.result import Usage


class ScriptedProvider:
    """Fails or succeeds as scripted: ``outcomes`` is consumed one per call; an exception is
    raised, a string is generated (one token per word, ``per_token_s`` apart)."""

    def __init__(
        self,
        outcomes: list[BaseException | str] | Callable[[int], BaseException | str],
        *,
        per_token_s: float = 0.0,
        slots: int = 8,
        reserved: int = 0,
    ) -> None:
        self._outcomes = outcomes
        self._per_token_s = per_token_s
        self._capabilities = Capabilities(max_concurrency=slots, reserved=reserved)
        self.calls: list[float] = []
        self.requests: list[GenerationRequest] = []

    @property
    def name(self) -> str:
        return "scripted"

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    async def generate(
        self, request: GenerationRequest, *, on_delta: DeltaSink | None = None
    ) -> Generation:
        n = len(self.calls)
        self.calls.append(time.monotonic())
        self.requests.append(request)
        outcome = (
            self._outcomes(n)
            if callable(self._outcomes)
            else self._outcomes[min(n, len(self._outcomes) - 1)]
        )
        if isinstance(outcome, BaseException):
            raise outcome
        words = outcome.split()
        for i, word in enumerate(words):
            if self._per_token_s:
                await asyncio.sleep(self._per_token_s)
            request.spent.output_tokens += 1  # counted as it goes, as providers do
            if on_delta is not None:
                on_delta(word if i == 0 else " " + word)
        return Generation(text=outcome, finish_reason="stop", usage=Usage(output_tokens=len(words)))
