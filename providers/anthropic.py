"""Anthropic Messages API.

System messages become the ``system`` parameter; structured output is a forced tool call whose
``input_schema`` is the task's JSON Schema (a schema whose root is not an object is wrapped in
``{"value": ...}`` and unwrapped again). ``overloaded`` (HTTP 529, or an ``overloaded_error``
event inside a stream) is retryable. SDK retries are off: the policy layer retries. The SDK
speaks through its aiohttp client, its pool sized to the model's concurrency
(``providers/http.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2

from sop_llm.providers.base import Capabilities, DeltaSink, Generation, GenerationRequest
from sop_llm.providers.errors import (
    BadRequestError,
    ContentFilterError,
    ContextLengthError,
    IncompleteStreamError,
    InternalProviderError,
    ProviderError,
    ProviderTimeoutError,
    error_for_status,
)
from sop_llm.providers.http import pool_limits, timeouts, transport_error
from sop_llm.providers.sanitize import Redaction
from sop_llm.providers.structured import JsonSchema, as_messages, schema_of
from sop_llm.schemas.result import FinishReason, Usage

ANTHROPIC_BASE_URL = "https://api.anthropic.com"
# the Messages API requires max_tokens; used when neither the task nor the spec gives one
DEFAULT_MAX_TOKENS = 1024
_WRAP_KEY = "value"


@dataclass(frozen=True, slots=True)
class AnthropicConfig:
    model_id: str
    api_key: str | None
    base_url: str = ANTHROPIC_BASE_URL
    timeout_s: float = 120.0
    concurrency: int = 16
    connections: int = 16
    """The HTTP pool's size: the most calls this adapter makes at once."""


@dataclass(frozen=True, slots=True)
class _Tool:
    name: str
    schema: JsonSchema
    wrapped: bool


class AnthropicProvider:
    def __init__(
        self,
        *,
        name: str,
        config: AnthropicConfig,
        http_client: httpx2.AsyncClient | None = None,
    ) -> None:
        self._name = name
        self._config = config
        timeout = timeouts(config.timeout_s)
        self._client = anthropic.AsyncAnthropic(
            # explicit key and base URL: the SDK must not fall back to its environment
            api_key=config.api_key or "unused",
            base_url=config.base_url,
            timeout=timeout,
            max_retries=0,
            http_client=http_client
            or anthropic.DefaultAioHttpClient(
                limits=pool_limits(config.connections), timeout=timeout
            ),
            open_telemetry=False,  # spans are ours to make, in ops/
        )
        self._capabilities = Capabilities(
            streaming=True,
            structured_output="tool",
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

    def build_body(self, request: GenerationRequest) -> tuple[dict[str, Any], _Tool | None]:
        """The Messages API parameters for ``request`` (without ``stream``), and the forced
        tool when structured output is asked for."""
        system = [m.content for m in as_messages(request) if m.role == "system"]
        turns = [
            {"role": m.role, "content": m.content}
            for m in as_messages(request)
            if m.role != "system"
        ]
        if not turns:
            raise BadRequestError("anthropic needs at least one user or assistant message")
        body: dict[str, Any] = {
            "model": self._config.model_id,
            "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
            "messages": turns,
        }
        if system:
            body["system"] = "\n\n".join(system)
        if request.stop:
            body["stop_sequences"] = list(request.stop)
        # not in the SDK's typed parameters: sent as they are; 0 stays 0
        sampling = {"temperature": request.temperature, "top_p": request.top_p}
        extra = {k: v for k, v in sampling.items() if v is not None}
        if extra:
            body["extra_body"] = extra
        tool = _tool_for(request)
        if tool is not None:
            body["tools"] = [
                {
                    "name": tool.name,
                    "description": "Give the answer as this tool's input.",
                    "input_schema": dict(tool.schema),
                }
            ]
            body["tool_choice"] = {"type": "tool", "name": tool.name}
        return body, tool

    async def generate(
        self, request: GenerationRequest, *, on_delta: DeltaSink | None = None
    ) -> Generation:
        body, tool = self.build_body(request)
        try:
            if on_delta is None:
                gen = await self._complete(body, tool)
            else:
                gen = await self._stream(body, tool, on_delta)
            request.spent.add(gen.usage)  # the backend reports usage only at the end
            return gen
        except anthropic.AnthropicError as exc:
            raise _translate(exc, self._redaction(request)) from exc
        except (httpx2.HTTPError, ValueError) as exc:  # ValueError: a reply it could not decode
            raise transport_error(exc, name=self._name, redaction=self._redaction(request)) from exc

    def _redaction(self, request: GenerationRequest) -> Redaction:
        """What an error of ``request`` must not repeat: the key, the prompt, the messages."""
        cfg = self._config
        return Redaction.for_request(request, key=cfg.api_key, base_url=cfg.base_url)

    async def _complete(self, body: dict[str, Any], tool: _Tool | None) -> Generation:
        msg = await self._client.messages.create(**body)
        if not isinstance(msg, anthropic.types.Message):  # e.g. an HTML error page with 200
            raise InternalProviderError(f"{self._name}: malformed reply: not a message")
        texts: list[str] = []
        for block in msg.content:
            if block.type == "text":
                texts.append(block.text)
            elif block.type == "tool_use" and tool is not None and block.name == tool.name:
                texts = [json.dumps(block.input, ensure_ascii=False)]
                break
        u = msg.usage
        usage = Usage(input_tokens=_input_tokens(u), output_tokens=u.output_tokens or 0)
        text = "".join(texts)
        return Generation(
            text=_unwrap(text, tool), finish_reason=_finish(msg.stop_reason), usage=usage
        )

    async def _stream(
        self, body: dict[str, Any], tool: _Tool | None, on_delta: DeltaSink
    ) -> Generation:
        parts: list[str] = []
        stop: str | None = None
        input_tokens = output_tokens = 0
        stream = await self._client.messages.create(**body, stream=True)
        async with stream:
            async for event in stream:
                if event.type == "message_start":
                    input_tokens = _input_tokens(event.message.usage)
                    output_tokens = event.message.usage.output_tokens or 0
                elif event.type == "content_block_delta":
                    delta = event.delta
                    text = None
                    if delta.type == "text_delta" and tool is None:
                        text = delta.text
                    elif delta.type == "input_json_delta" and tool is not None:
                        text = delta.partial_json
                    if text:
                        parts.append(text)
                        # a wrapped schema's envelope is not streamed as is: it is unwrapped
                        # at the end, so its partial JSON would mislead
                        if tool is None or not tool.wrapped:
                            on_delta(text)
                elif event.type == "message_delta":
                    stop = event.delta.stop_reason or stop
                    output_tokens = event.usage.output_tokens or output_tokens
        if stop is None:
            raise IncompleteStreamError(
                f"{self._name}: the stream ended without a stop reason after "
                f"{len(parts)} content chunks"
            )
        usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
        return Generation(
            text=_unwrap("".join(parts), tool), finish_reason=_finish(stop), usage=usage
        )


def _tool_for(request: GenerationRequest) -> _Tool | None:
    fmt = request.response_format
    schema = schema_of(fmt)
    if schema is None or fmt is None:
        return None
    name = fmt.json_schema.name if fmt.json_schema is not None else "output"
    if schema.get("type") == "object":
        return _Tool(name=name, schema=schema, wrapped=False)
    wrapped = {"type": "object", "properties": {_WRAP_KEY: schema}, "required": [_WRAP_KEY]}
    return _Tool(name=name, schema=wrapped, wrapped=True)


def _unwrap(text: str, tool: _Tool | None) -> str:
    if tool is None or not tool.wrapped:
        return text
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return text  # left for validation to report
    if isinstance(doc, Mapping) and _WRAP_KEY in doc:
        return json.dumps(doc[_WRAP_KEY], ensure_ascii=False)
    return text


def _input_tokens(usage: Any) -> int:
    total = 0
    for attr in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        value = getattr(usage, attr, None)
        total += value if isinstance(value, int) else 0
    return total


def _finish(reason: str | None) -> FinishReason:
    if reason == "refusal":
        raise ContentFilterError("the model refused to answer")
    if reason == "model_context_window_exceeded":
        raise ContextLengthError("the conversation exceeds the model's context window")
    return "length" if reason == "max_tokens" else "stop"


def _translate(exc: anthropic.AnthropicError, redaction: Redaction) -> ProviderError:
    """One SDK error -> our tree (the only place the SDK's error classes are named). The
    backend's words are sanitised with ``redaction`` (see ``providers/sanitize.py``), which
    also bounds their length."""
    r = redaction
    if isinstance(exc, anthropic.APITimeoutError):
        return ProviderTimeoutError("no reply within the timeout")
    if isinstance(exc, anthropic.APIConnectionError):
        return InternalProviderError(f"connection failed: {exc.message}", redaction=r)
    if isinstance(exc, anthropic.APIStatusError):
        return error_for_status(
            exc.status_code,
            exc.api_message or exc.message,
            headers=dict(exc.response.headers.items()),
            error_type=exc.type,
            redaction=r,
        )
    if isinstance(exc, anthropic.APIResponseValidationError):
        return InternalProviderError(f"malformed reply: {exc.message}", redaction=r)
    if isinstance(exc, anthropic.APIError):
        return InternalProviderError(f"backend error: {exc.message}", redaction=r)
    return InternalProviderError(f"{type(exc).__name__}: {exc}", retryable=False, redaction=r)
