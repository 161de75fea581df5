"""A backend bound to its model spec: defaults, overridable parameters, structured output.

Every provider the factory builds is wrapped in :class:`ConfiguredProvider`, so each adapter
only has to make one call with fully resolved parameters. The wrapper:

* refuses (``bad_request``) a task parameter the spec does not let tasks override;
* fills parameters the task left out from the spec's ``defaults``;
* refuses a response format the backend cannot honour (a raw grammar on a backend without
  grammars) and a JSON Schema that is not one;
* validates structured output against the schema, with one repair attempt
  (``providers/structured.py``).
"""

from __future__ import annotations

from dataclasses import replace

from sop_llm.providers.base import (
    Capabilities,
    Closeable,
    DeltaSink,
    Generation,
    GenerationRequest,
    Provider,
)
from sop_llm.providers.errors import BadRequestError, InternalProviderError
from sop_llm.providers.structured import check_schema, generate_validated, schema_of
from sop_llm.schemas.models import ModelSpec


class ConfiguredProvider:
    """``inner`` with ``spec``'s defaults and rules applied to every request."""

    def __init__(self, *, inner: Provider, spec: ModelSpec) -> None:
        self._inner = inner
        self._spec = spec
        self._closed = False
        caps = inner.capabilities
        self._capabilities = Capabilities(
            streaming=caps.streaming,
            structured_output=caps.structured_output,
            needs_gpu_slot=caps.needs_gpu_slot or spec.gpu_slots is not None,
            max_concurrency=spec.concurrency or caps.max_concurrency,
            reserved=caps.reserved,
        )

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def inner(self) -> Provider:
        return self._inner

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """The request as the backend will see it. Raises :class:`BadRequestError`."""
        allowed = set(self._spec.overridable)
        given = {
            "temperature": request.temperature is not None,
            "top_p": request.top_p is not None,
            "max_tokens": request.max_tokens is not None,
            "stop": bool(request.stop),
            "seed": request.seed is not None,
            "response_format": request.response_format is not None,
        }
        refused = sorted(k for k, present in given.items() if present and k not in allowed)
        if refused:
            raise BadRequestError(
                f"model {self._spec.name!r} does not let a task set: {', '.join(refused)}"
            )
        d = self._spec.defaults
        resolved = replace(
            request,
            temperature=request.temperature if request.temperature is not None else d.temperature,
            top_p=request.top_p if request.top_p is not None else d.top_p,
            max_tokens=request.max_tokens if request.max_tokens is not None else d.max_tokens,
            stop=tuple(request.stop) if request.stop else tuple(d.stop or ()),
            seed=request.seed if request.seed is not None else d.seed,
        )
        fmt = resolved.response_format
        if (
            fmt is not None
            and fmt.type == "grammar"
            and (self._capabilities.structured_output != "grammar")
        ):
            raise BadRequestError(
                f"model {self._spec.name!r} does not accept GBNF grammars "
                "(response_format type 'grammar')"
            )
        if fmt is not None and fmt.type == "text":
            resolved = replace(resolved, response_format=None)
        return resolved

    async def generate(
        self, request: GenerationRequest, *, on_delta: DeltaSink | None = None
    ) -> Generation:
        if self._closed:
            # a task that resolved this binding just before a reload swapped it out
            raise InternalProviderError(
                f"model {self._spec.name!r} was reloaded while the task waited; try again"
            )
        resolved = self.resolve(request)
        schema = schema_of(resolved.response_format)
        if schema is None:
            return await self._inner.generate(resolved, on_delta=on_delta)
        check_schema(schema)

        async def attempt(req: GenerationRequest, sink: DeltaSink | None) -> Generation:
            return await self._inner.generate(req, on_delta=sink)

        return await generate_validated(attempt, resolved, schema, on_delta=on_delta)

    async def aclose(self) -> None:
        self._closed = True
        if isinstance(self._inner, Closeable):
            await self._inner.aclose()
