"""The Anthropic adapter, through the official SDK, against a local Messages API server."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from providers.base import GenerationRequest
from providers.configured import ConfiguredProvider
from providers.errors import ProviderError
from providers.factory import build_provider
from schemas.errors import ErrorCode
from schemas.models import ModelSpec
from schemas.task import ChatMessage, JsonSchemaSpec, ResponseFormat
from tests.providers.wire import (
    FakeServer,
    an_error,
    an_events,
    an_message,
    json_reply,
    raw_reply,
    slow_reply,
    sse_reply,
)

ENV = {"TEST_ANTHROPIC_KEY": "sk-ant-test"}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
}
CHAT = [
    ChatMessage(role="system", content="Be brief."),
    ChatMessage(role="user", content="Hi"),
    ChatMessage(role="assistant", content="Hello."),
    ChatMessage(role="system", content="Answer in English."),
    ChatMessage(role="user", content="Who are you?"),
]


def provider(server: FakeServer, **spec: Any) -> ConfiguredProvider:
    fields: dict[str, Any] = {
        "name": "claude",
        "provider": "anthropic",
        "model_id": "claude-test",
        "base_url": server.url,
        "api_key_env": "TEST_ANTHROPIC_KEY",
        "timeout_s": 5.0,
    }
    fields.update(spec)
    return build_provider(ModelSpec.model_validate(fields), env=ENV)


async def failure(p: ConfiguredProvider, request: GenerationRequest, **kw: Any) -> ProviderError:
    try:
        with pytest.raises(ProviderError) as info:
            await p.generate(request, **kw)
    finally:
        await p.aclose()
    return info.value


async def test_system_messages_become_the_system_prompt(server: FakeServer) -> None:
    server.script(
        json_reply(an_message([{"type": "text", "text": "I am a model."}], usage=(12, 5)))
    )
    p = provider(server)
    gen = await p.generate(GenerationRequest(model="claude", messages=CHAT, temperature=0.0))
    await p.aclose()
    assert (gen.text, gen.finish_reason) == ("I am a model.", "stop")
    assert (gen.usage.input_tokens, gen.usage.output_tokens) == (12, 5)
    seen = server.seen[0]
    assert seen.path == "/v1/messages"
    # the key from the spec's env var reaches the server (this SDK sends it as a bearer token)
    auth = seen.headers.get("x-api-key") or seen.headers.get("authorization", "")
    assert auth.endswith("sk-ant-test")
    body = seen.body
    assert body["model"] == "claude-test"
    assert body["system"] == "Be brief.\n\nAnswer in English."
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["temperature"] == 0  # 0 reaches the server as 0
    assert body["max_tokens"] == 1024  # required by the API: the default when none is given


async def test_streaming_text_and_usage(server: FakeServer) -> None:
    server.script(sse_reply(an_events([("text", ["Hel", "lo"])], usage=(9, 4))))
    p = provider(server)
    deltas: list[str] = []
    gen = await p.generate(
        GenerationRequest(model="claude", prompt="Hi", max_tokens=20, stop=("END",)),
        on_delta=deltas.append,
    )
    await p.aclose()
    assert deltas == ["Hel", "lo"] and gen.text == "Hello"
    assert (gen.usage.input_tokens, gen.usage.output_tokens) == (9, 4)
    body = server.bodies[0]
    assert body["stream"] is True and body["max_tokens"] == 20
    assert body["stop_sequences"] == ["END"]
    assert "temperature" not in body


async def test_max_tokens_stop_is_length(server: FakeServer) -> None:
    server.script(json_reply(an_message([{"type": "text", "text": "cut"}], stop="max_tokens")))
    p = provider(server)
    gen = await p.generate(GenerationRequest(model="claude", prompt="Hi"))
    await p.aclose()
    assert gen.finish_reason == "length"


async def test_overloaded_529_is_retryable(server: FakeServer) -> None:
    server.script(
        json_reply(
            an_error("overloaded_error", "Overloaded"), status=529, headers={"retry-after": "3"}
        )
    )
    err = await failure(provider(server), GenerationRequest(model="claude", prompt="Hi"))
    assert err.code == ErrorCode.OVERLOADED and err.retryable and err.retry_after == 3.0
    assert len(server.seen) == 1  # SDK retries are off


async def test_overloaded_inside_a_stream_is_retryable(server: FakeServer) -> None:
    events = an_events([("text", ["a"])])[:3]
    events.append(("error", an_error("overloaded_error", "Overloaded")))
    server.script(sse_reply(events))
    err = await failure(
        provider(server), GenerationRequest(model="claude", prompt="Hi"), on_delta=lambda _: None
    )
    assert err.code == ErrorCode.OVERLOADED and err.retryable


@pytest.mark.parametrize(
    ("status", "kind", "code", "retryable"),
    [
        (429, "rate_limit_error", ErrorCode.RATE_LIMITED, True),
        (500, "api_error", ErrorCode.INTERNAL, True),
        (401, "authentication_error", ErrorCode.AUTH, False),
        (404, "not_found_error", ErrorCode.MODEL_NOT_FOUND, False),
        (400, "invalid_request_error", ErrorCode.BAD_REQUEST, False),
    ],
)
async def test_http_errors_map_to_our_codes(
    server: FakeServer, status: int, kind: str, code: ErrorCode, retryable: bool
) -> None:
    server.script(json_reply(an_error(kind, "nope"), status=status, headers={"Retry-After": "2"}))
    err = await failure(provider(server), GenerationRequest(model="claude", prompt="Hi"))
    assert (err.code, err.retryable, err.status) == (code, retryable, status)
    assert err.retry_after == 2.0
    assert "sk-ant-test" not in err.message


async def test_prompt_too_long_is_context_length(server: FakeServer) -> None:
    server.script(
        json_reply(
            an_error("invalid_request_error", "prompt is too long: 300000 tokens"), status=400
        )
    )
    err = await failure(provider(server), GenerationRequest(model="claude", prompt="Hi"))
    assert err.code == ErrorCode.CONTEXT_LENGTH


async def test_refusal_is_content_filter(server: FakeServer) -> None:
    server.script(json_reply(an_message([{"type": "text", "text": ""}], stop="refusal")))
    err = await failure(provider(server), GenerationRequest(model="claude", prompt="Hi"))
    assert err.code == ErrorCode.CONTENT_FILTER


async def test_malformed_body_and_slow_reply(server: FakeServer) -> None:
    server.script(raw_reply("<html>gateway</html>", status=200, content_type="text/html"))
    err = await failure(provider(server), GenerationRequest(model="claude", prompt="Hi"))
    assert err.code == ErrorCode.INTERNAL and err.retryable
    server.script(slow_reply(5.0, json_reply(an_message([]))))
    started = time.monotonic()
    err = await failure(
        provider(server, timeout_s=0.3), GenerationRequest(model="claude", prompt="Hi")
    )
    assert err.code == ErrorCode.TIMEOUT and err.retryable
    assert time.monotonic() - started < 4.0


def person() -> ResponseFormat:
    return ResponseFormat(
        type="json_schema", json_schema=JsonSchemaSpec(name="person", schema_=PERSON)
    )


async def test_structured_output_is_a_forced_tool_call(server: FakeServer) -> None:
    tool_use = {
        "type": "tool_use",
        "id": "toolu_1",
        "name": "person",
        "input": {"name": "Ada", "age": 36},
    }
    server.script(json_reply(an_message([tool_use], stop="tool_use")))
    p = provider(server)
    gen = await p.generate(
        GenerationRequest(model="claude", prompt="who?", response_format=person())
    )
    await p.aclose()
    assert json.loads(gen.text) == {"name": "Ada", "age": 36} and gen.finish_reason == "stop"
    body = server.bodies[0]
    assert body["tools"][0]["name"] == "person"
    assert body["tools"][0]["input_schema"] == PERSON
    assert body["tool_choice"] == {"type": "tool", "name": "person"}


async def test_streamed_tool_input_and_repair(server: FakeServer) -> None:
    server.script(
        sse_reply(an_events([("tool", ['{"name": "Ada", ', '"age": 300}'])], tool_name="person")),
        # the repair attempt does not stream
        json_reply(
            an_message(
                [
                    {
                        "type": "tool_use",
                        "id": "t",
                        "name": "person",
                        "input": {"name": "Ada", "age": 36},
                    }
                ],
                stop="tool_use",
            )
        ),
    )
    p = provider(server)
    deltas: list[str] = []
    gen = await p.generate(
        GenerationRequest(model="claude", prompt="who?", response_format=person()),
        on_delta=deltas.append,
    )
    await p.aclose()
    assert json.loads(gen.text) == {"name": "Ada", "age": 36}
    assert deltas == ['{"name": "Ada", ', '"age": 300}']  # only the first attempt streams
    repair = server.bodies[1]["messages"]
    assert repair[-1]["role"] == "user" and "maximum of 120" in repair[-1]["content"]


async def test_a_non_object_schema_is_wrapped_and_unwrapped(server: FakeServer) -> None:
    fmt = ResponseFormat(
        type="json_schema",
        json_schema=JsonSchemaSpec(schema_={"type": "array", "items": {"type": "integer"}}),
    )
    tool_use = {"type": "tool_use", "id": "t", "name": "output", "input": {"value": [1, 2]}}
    server.script(json_reply(an_message([tool_use], stop="tool_use")))
    p = provider(server)
    gen = await p.generate(GenerationRequest(model="claude", prompt="n?", response_format=fmt))
    await p.aclose()
    assert json.loads(gen.text) == [1, 2]
    schema = server.bodies[0]["tools"][0]["input_schema"]
    assert schema["type"] == "object" and schema["properties"]["value"]["type"] == "array"
