"""Fakes implementing our own protocols (no mocks)."""

from __future__ import annotations

import time
from collections.abc import Callable

from sop_llm.providers.base import Capabilities, GenerationRequest
from sop_llm.testing import ScriptedModel

Outcomes = list[BaseException | str] | Callable[[int], BaseException | str]


class ScriptedProvider(ScriptedModel):
    """The public :class:`~sop_llm.testing.ScriptedModel`, scripted per call: ``outcomes`` is
    consumed one per call (the last one repeats) or called with the call's index; an exception
    is raised, a string is generated (one token per word, ``per_token_s`` apart). ``calls``: the
    time of each call."""

    def __init__(
        self,
        outcomes: Outcomes,
        *,
        per_token_s: float = 0.0,
        slots: int = 8,
        reserved: int = 0,
    ) -> None:
        super().__init__(self._next, concurrency=slots, per_token_s=per_token_s)
        self._outcomes = outcomes
        self._capabilities = Capabilities(max_concurrency=slots, reserved=reserved)
        self.calls: list[float] = []

    def _next(self, request: GenerationRequest) -> BaseException | str:
        n = len(self.calls)
        self.calls.append(time.monotonic())
        if callable(self._outcomes):
            return self._outcomes(n)
        return self._outcomes[min(n, len(self._outcomes) - 1)]
