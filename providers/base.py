"""The ``Provider`` protocol every backend implements, and what it exchanges."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from schemas.errors import ErrorCode, SopError
from schemas.result import FinishReason, Usage
from schemas.task import ChatMessage, ResponseFormat


@dataclass(frozen=True, slots=True)
class Capabilities:
    streaming: bool = True
    structured_output: str | None = None
    needs_gpu_slot: bool = False
    max_concurrency: int = 1


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What a provider is asked; ``None`` parameters mean "the model's default"."""

    model: str
    prompt: str | None = None
    messages: Sequence[ChatMessage] | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: Sequence[str] = ()
    seed: int | None = None
    response_format: ResponseFormat | None = None

    def words_source(self) -> str:
        if self.prompt is not None:
            return self.prompt
        return "\n".join(m.content for m in self.messages or ())


@dataclass(frozen=True, slots=True)
class Generation:
    text: str
    finish_reason: FinishReason
    usage: Usage = field(default_factory=Usage)


DeltaSink = Callable[[str], None]


class Provider(Protocol):
    """A backend. ``generate`` is cancellable (asyncio cancellation stops it between tokens);
    ``on_delta`` receives text as it is produced. Errors raise :class:`ProviderError`."""

    @property
    def name(self) -> str: ...

    @property
    def capabilities(self) -> Capabilities: ...

    async def generate(
        self, request: GenerationRequest, *, on_delta: DeltaSink | None = None
    ) -> Generation: ...


class ProviderError(SopError):
    """A backend failed. ``retryable`` tells the policy layer whether another attempt may help;
    ``retry_after`` is the backend's own hint in seconds, when it gave one."""

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode = ErrorCode.INTERNAL,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.retryable = retryable
        self.retry_after = retry_after
