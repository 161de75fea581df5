"""OpenAI Chat Completions, and any server that speaks it (vLLM, llama-server, Ollama).

One adapter for both: ``openai`` talks to the spec's ``base_url`` or api.openai.com and asks for
structured output with the ``json_schema`` response format; ``openai_compatible`` talks to the
spec's ``base_url`` with whichever mechanism the spec declares (``json_schema``,
``json_object`` with the schema in the prompt, a GBNF ``grammar`` field, or the prompt alone).
SDK retries are off: the policy layer retries, honouring ``retry_after``.

The SDK speaks through its aiohttp client (``providers/http.py``), and the body, built here as
plain JSON, goes out through the SDK's generic ``post`` with the SDK's own reply types:
``chat.completions.create`` would walk every parameter through its type-driven transform, which
leaves such a body as it is and costs about a quarter of the SDK's CPU per call.

What an OpenAI-compatible server gets wrong is reported as such: a stream that ends without a
finish reason is an :class:`~providers.errors.IncompleteStreamError`; an error that blames the
structured-output request (llama-cpp-python's server answers a ``json_schema`` response format
with HTTP 500) is a ``bad_request`` naming ``structured_output``; a stream that carries no
usage counts each content chunk as one output token (these servers send a token per chunk;
the prompt's tokens stay unknown, counted as 0).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx2
import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from sop_llm.providers.base import (
    Capabilities,
    DeltaSink,
    Generation,
    GenerationRequest,
    StructuredKind,
)
from sop_llm.providers.errors import (
    BadRequestError,
    ContentFilterError,
    IncompleteStreamError,
    InternalProviderError,
    ProviderError,
    ProviderTimeoutError,
    error_for_status,
)
from sop_llm.providers.grammar import schema_to_gbnf
from sop_llm.providers.http import hung_up, pool_limits, timeouts, transport_error
from sop_llm.providers.sanitize import Redaction
from sop_llm.providers.structured import as_messages, schema_of, with_instruction
from sop_llm.schemas.result import FinishReason, Usage

OPENAI_BASE_URL = "https://api.openai.com/v1"
CHAT_PATH = "/chat/completions"
# words of an error reply that blame the structured-output part of the request
_STRUCTURED_HINTS = ("response_format", "json_schema", "json_object", "grammar")


@dataclass(frozen=True, slots=True)
class OpenAIConfig:
    model_id: str
    api_key: str | None
    base_url: str = OPENAI_BASE_URL
    timeout_s: float = 120.0
    structured: StructuredKind = "json_schema"
    # api.openai.com wants max_completion_tokens; many compatible servers know only max_tokens
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_completion_tokens"
    concurrency: int = 16
    connections: int = 16
    """The HTTP pool's size: the most calls this adapter makes at once (the model's
    concurrency)."""
    compatible: bool = False
    """An ``openai_compatible`` server: its spec chooses ``structured``."""


class OpenAIProvider:
    """A Chat Completions backend. ``http_client`` is for tests and custom transports."""

    def __init__(
        self, *, name: str, config: OpenAIConfig, http_client: httpx2.AsyncClient | None = None
    ) -> None:
        self._name = name
        self._config = config
        timeout = timeouts(config.timeout_s)
        self._client = openai.AsyncOpenAI(
            # a keyless local server still needs a value: None would make the SDK read the
            # environment, and the key must only ever come from the spec
            api_key=config.api_key or "unused",
            base_url=config.base_url,
            timeout=timeout,
            max_retries=0,
            http_client=http_client
            or openai.DefaultAioHttpClient(limits=pool_limits(config.connections), timeout=timeout),
        )
        self._capabilities = Capabilities(
            streaming=True,
            structured_output=config.structured,
            needs_gpu_slot=False,
            max_concurrency=config.concurrency,
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    async def aclose(self) -> None:
        await self._client.close()

    def build_body(self, request: GenerationRequest) -> dict[str, Any]:
        """The Chat Completions request body for ``request`` (without ``stream``)."""
        cfg = self._config
        fmt = request.response_format
        schema = schema_of(fmt)
        extra: dict[str, Any] = {}
        response_format: dict[str, Any] | None = None
        if fmt is not None and fmt.type == "grammar":
            extra["grammar"] = fmt.grammar
        elif schema is not None and fmt is not None:
            if cfg.structured == "json_schema" and fmt.json_schema is not None:
                spec = fmt.json_schema
                response_format = {
                    "type": "json_schema",
                    "json_schema": {
                        "name": spec.name,
                        "schema": spec.schema_,
                        "strict": spec.strict,
                    },
                }
            else:
                request = with_instruction(request, schema)
                if cfg.structured in ("json_object", "json_schema"):
                    response_format = {"type": "json_object"}
                elif cfg.structured == "grammar":
                    extra["grammar"] = schema_to_gbnf(schema)
        body: dict[str, Any] = {
            "model": cfg.model_id,
            "messages": [{"role": m.role, "content": m.content} for m in as_messages(request)],
        }
        # None means "the backend's default"; 0 is a real value and is sent as 0
        optional = {
            "temperature": request.temperature,
            "top_p": request.top_p,
            cfg.max_tokens_field: request.max_tokens,
            "seed": request.seed,
            "stop": list(request.stop) or None,
            "response_format": response_format,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        body.update(extra)  # a server's own fields (llama.cpp's ``grammar``)
        return body

    async def generate(
        self, request: GenerationRequest, *, on_delta: DeltaSink | None = None
    ) -> Generation:
        body = self.build_body(request)
        try:
            if on_delta is None:
                gen = await self._complete(body, request)
            else:
                gen = await self._stream(body, on_delta)
            request.spent.add(gen.usage)  # the backend reports usage only at the end
            return gen
        except openai.OpenAIError as exc:
            raise self._error(exc, body, request) from exc
        except (httpx2.HTTPError, ValueError) as exc:  # ValueError: json.JSONDecodeError
            raise transport_error(exc, name=self._name, redaction=self._redaction(request)) from exc

    def _redaction(self, request: GenerationRequest) -> Redaction:
        """What an error of ``request`` must not repeat: the key, the prompt, the messages."""
        cfg = self._config
        return Redaction.for_request(request, key=cfg.api_key, base_url=cfg.base_url)

    def _error(
        self, exc: openai.OpenAIError, body: Mapping[str, Any], request: GenerationRequest
    ) -> ProviderError:
        """``exc`` in our tree; an error that blames the structured-output part of a request
        that asked for it is the spec's doing, not the server's: a ``bad_request``."""
        err = _translate(exc, self._redaction(request))
        structured = "response_format" in body or "grammar" in body
        blamed = any(hint in err.message.lower() for hint in _STRUCTURED_HINTS)
        if not (structured and blamed and type(err) in (BadRequestError, InternalProviderError)):
            return err
        # the server cannot do what the spec asks of it: every retry would fail alike
        mode = self._config.structured
        setting = f"structured_output = {'none' if mode == 'prompt' else mode}"
        advice = "; declare a mode it supports (docs/servers.md)" if self._config.compatible else ""
        return BadRequestError(
            f"{self._name}: the server refused the structured-output request ({setting})"
            f"{advice}: {err.message}",
            status=err.status,
        )

    async def _complete(self, body: dict[str, Any], request: GenerationRequest) -> Generation:
        resp = await self._client.post(CHAT_PATH, body=body, cast_to=ChatCompletion)
        if not isinstance(resp, ChatCompletion):  # e.g. an HTML page
            raise InternalProviderError(f"{self._name}: malformed reply: not a chat completion")
        if not resp.choices:
            raise InternalProviderError(f"{self._name}: reply has no choices")
        choice = resp.choices[0]
        if choice.message.refusal:
            raise ContentFilterError(
                f"{self._name}: refused: {choice.message.refusal}",
                redaction=self._redaction(request),
            )
        usage = _usage(resp.usage)
        return Generation(
            text=choice.message.content or "",
            finish_reason=_finish(choice.finish_reason, self._name),
            usage=usage,
        )

    async def _stream(self, body: dict[str, Any], on_delta: DeltaSink) -> Generation:
        parts: list[str] = []
        finish: str | None = None
        usage: Usage | None = None
        stream = await self._client.post(
            CHAT_PATH,
            body={**body, "stream": True, "stream_options": {"include_usage": True}},
            cast_to=ChatCompletion,
            stream=True,
            stream_cls=openai.AsyncStream[ChatCompletionChunk],
        )
        async with stream:
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = _usage(chunk.usage)
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    text = choice.delta.content if choice.delta else None
                    if text:
                        parts.append(text)
                        on_delta(text)
                    if choice.finish_reason is not None:
                        finish = choice.finish_reason
        if finish is None:
            raise IncompleteStreamError(
                f"{self._name}: the stream ended without a finish reason after "
                f"{len(parts)} content chunks: the server cut it short (llama-cpp-python's "
                "server does so while another request waits: declare concurrency 1 for it)"
            )
        if usage is None or (parts and not usage.output_tokens):
            # the server reports no usage in streams: count a token per content chunk; the
            # prompt's count stays unknown (no tokenizer for a remote model here)
            usage = Usage(
                input_tokens=usage.input_tokens if usage else None, output_tokens=len(parts)
            )
        return Generation(
            text="".join(parts), finish_reason=_finish(finish, self._name), usage=usage
        )


def _usage(usage: openai.types.CompletionUsage | None) -> Usage:
    """The reply's counts; one the server left out is unknown (``None``), not 0."""
    if usage is None:
        return Usage(input_tokens=None, output_tokens=None)
    return Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens)


def _finish(reason: str | None, name: str) -> FinishReason:
    if reason == "content_filter":
        raise ContentFilterError(f"{name}: output stopped by the content filter")
    return "length" if reason == "length" else "stop"


def _headers(exc: openai.APIStatusError) -> Mapping[str, str]:
    return dict(exc.response.headers.items())


def _translate(exc: openai.OpenAIError, redaction: Redaction) -> ProviderError:
    """One SDK error -> our tree (the only place the SDK's error classes are named). The
    backend's words are sanitised with ``redaction`` (see ``providers/sanitize.py``)."""
    r = redaction
    if isinstance(exc, openai.APITimeoutError):
        dropped = hung_up(exc)
        if dropped is not None:
            return InternalProviderError(f"connection failed: {dropped}", redaction=r)
        return ProviderTimeoutError("no reply within the timeout")
    if isinstance(exc, openai.APIConnectionError):
        return InternalProviderError(f"connection failed: {exc.message}", redaction=r)
    if isinstance(exc, openai.APIStatusError):
        kind = " ".join(str(x) for x in (exc.type, exc.code) if x)
        return error_for_status(
            exc.status_code,
            _message(exc),
            headers=_headers(exc),
            error_type=kind or None,
            redaction=r,
        )
    if isinstance(exc, openai.ContentFilterFinishReasonError):
        return ContentFilterError(str(exc), redaction=r)
    if isinstance(exc, openai.APIResponseValidationError):
        return InternalProviderError(f"malformed reply: {exc.message}", redaction=r)
    if isinstance(exc, openai.APIError):  # e.g. an error event inside a stream
        return InternalProviderError(f"backend error: {exc.message}", redaction=r)
    return InternalProviderError(f"{type(exc).__name__}: {exc}", retryable=False, redaction=r)


def _message(exc: openai.APIStatusError) -> str:
    """The body's error message, else the whole body (never cut here: a cut could halve a
    secret and hide it from the sanitiser, which bounds the length itself)."""
    body = exc.body
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, Mapping) and isinstance(err.get("message"), str):
            return str(err["message"])
    if isinstance(body, str) and body:
        return body
    return json.dumps(body) if body is not None else exc.message
