"""The ``Provider`` protocol every backend implements, and what it exchanges."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from sop_llm.providers.errors import ProviderError
from sop_llm.schemas.result import FinishReason, Usage
from sop_llm.schemas.task import ChatMessage, ResponseFormat

# how a backend is held to a structured-output request:
#   grammar      - constrained decoding with a GBNF grammar (json_schema, json_object, grammar)
#   json_schema  - the backend's native JSON Schema response format
#   json_object  - the backend's "any JSON object" mode; the schema is shown in the prompt
#   tool         - a forced tool call whose input schema is the task's schema
#   prompt       - nothing but the schema shown in the prompt
# whatever the kind, the output is validated against the schema (providers/structured.py)
StructuredKind = Literal["grammar", "json_schema", "json_object", "tool", "prompt"]


@dataclass(frozen=True, slots=True)
class Capabilities:
    streaming: bool = True
    structured_output: StructuredKind | None = None
    needs_gpu_slot: bool = False
    max_concurrency: int = 1
    reserved: int = 0
    """Generations it runs beyond ``max_concurrency``, kept for tasks of the pool's first
    partition once the others are all in use (a batching model's spare sequence)."""


@dataclass(slots=True)
class Spent:
    """Tokens a request has used so far, counted by the provider as it goes (prompt tokens once
    evaluated, each token produced), so that a generation cut short (cancelled, past its
    deadline, failed) still reports what it used. A repair attempt adds to the same count."""

    input_tokens: int = 0
    output_tokens: int = 0
    input_unknown: bool = False
    """A call's count was not reported (the total is unknown, not the known part)."""
    output_unknown: bool = False

    def add(self, usage: Usage) -> None:
        """Count a whole call's usage (a provider that learns it only at the end)."""
        if usage.input_tokens is None:
            self.input_unknown = True
        else:
            self.input_tokens += usage.input_tokens
        if usage.output_tokens is None:
            self.output_unknown = True
        else:
            self.output_tokens += usage.output_tokens

    def usage(self, *, at_least_output: int = 0) -> Usage | None:
        """As a :class:`Usage`; ``None`` when nothing was counted. ``at_least_output``: the
        deltas seen, for a provider that does not count as it goes."""
        output = max(self.output_tokens, at_least_output)
        unknown = self.input_unknown or self.output_unknown
        if not (self.input_tokens or output or unknown):
            return None
        return Usage(
            input_tokens=None if self.input_unknown else self.input_tokens,
            output_tokens=None if self.output_unknown else output,
        )


@dataclass(slots=True)
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
    spent: Spent = field(default_factory=Spent)
    """Shared by copies (``dataclasses.replace``): a repair attempt counts into it too."""

    def words_source(self) -> str:
        if self.prompt is not None:
            return self.prompt
        return "\n".join(m.content for m in self.messages or ())


@dataclass(slots=True)
class Generation:
    text: str
    finish_reason: FinishReason
    usage: Usage = field(default_factory=Usage)


DeltaSink = Callable[[str], None]


class Provider(Protocol):
    """A backend. ``generate`` is cancellable (asyncio cancellation stops it between tokens;
    when it returns or raises, the backend is idle again); ``on_delta`` receives text as it is
    produced, on the event loop's thread; ``request.spent`` counts the tokens used as they are
    (a cut-short call's usage comes from it). Errors raise :class:`ProviderError` (see
    ``providers/errors.py`` for the tree). :func:`stream` gives the same call as an iterator.
    """

    @property
    def name(self) -> str: ...

    @property
    def capabilities(self) -> Capabilities: ...

    async def generate(
        self, request: GenerationRequest, *, on_delta: DeltaSink | None = None
    ) -> Generation: ...


@runtime_checkable
class Closeable(Protocol):
    """A provider holding resources (HTTP clients, a loaded model) releases them here."""

    async def aclose(self) -> None: ...


@runtime_checkable
class Loadable(Protocol):
    """A provider holding a local model whose weights it loads and frees on demand (llama.cpp).

    ``estimated_bytes``: the device memory the loaded model needs (0 for a CPU-only model);
    the handlers' admission checks it against free VRAM before ``load``. ``generate`` loads the
    model itself when it is not loaded, so a worker without admission still works."""

    def estimated_bytes(self) -> int: ...

    async def load(self) -> None: ...

    async def unload(self) -> None: ...

    @property
    def loaded(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


StreamItem = Delta | Generation


async def stream(provider: Provider, request: GenerationRequest) -> AsyncIterator[StreamItem]:
    """``provider.generate`` as an async iterator: :class:`Delta` items as text arrives, then
    the final :class:`Generation`. Leaving the loop early (``break``, cancellation) cancels the
    generation and waits for it to stop; a :class:`ProviderError` is raised from the iterator.
    """
    queue: asyncio.Queue[Delta] = asyncio.Queue()
    task = asyncio.create_task(
        provider.generate(request, on_delta=lambda text: queue.put_nowait(Delta(text)))
    )
    try:
        while not task.done():
            getter = asyncio.ensure_future(queue.get())
            try:
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                getter.cancel()
            if getter.done() and not getter.cancelled():
                yield getter.result()
        while not queue.empty():
            yield queue.get_nowait()
        yield task.result()  # raises what the provider raised
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


__all__ = [
    "Capabilities",
    "Closeable",
    "Delta",
    "DeltaSink",
    "Generation",
    "GenerationRequest",
    "Loadable",
    "Provider",
    "ProviderError",
    "StreamItem",
    "StructuredKind",
    "stream",
]
