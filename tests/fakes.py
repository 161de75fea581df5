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
    ) -> None:
        self._outcomes = outcomes
        self._per_token_s = per_token_s
        self._capabilities = Capabilities(max_concurrency=slots)
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
            if on_delta is not None:
                on_delta(word if i == 0 else " " + word)
        return Generation(text=outcome, finish_reason="stop", usage=Usage(output_tokens=len(words)))


class InstantProvider(ScriptedProvider):
    """A :class:`ScriptedProvider` that is also instant: ``answers`` scripts ``answer`` the way
    ``outcomes`` scripts ``generate`` (an exception is raised, a string is the answer)."""

    def __init__(
        self,
        answers: list[BaseException | str],
        outcomes: list[BaseException | str] | None = None,
        *,
        slots: int = 8,
    ) -> None:
        super().__init__(outcomes or ["from generate"], slots=slots)
        self._answers = answers
        self._capabilities = Capabilities(max_concurrency=slots, instant=True)
        self.answered: list[GenerationRequest] = []

    def answer(self, request: GenerationRequest) -> Generation:
        outcome = self._answers[min(len(self.answered), len(self._answers) - 1)]
        self.answered.append(request)
        if isinstance(outcome, BaseException):
            raise outcome
        words = outcome.split()
        return Generation(text=outcome, finish_reason="stop", usage=Usage(output_tokens=len(words)))
