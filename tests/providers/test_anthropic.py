"""The Anthropic adapter, through the official SDK, against a local Messages API server."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from aiohttp import web

from sop_llm.providers.base import DeltaSink, GenerationRequest
from sop_llm.providers.configured import ConfiguredProvider
from sop_llm.providers.errors import ProviderError
from sop_llm.providers.factory import build_provider
from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.models import ModelSpec
from sop_llm.schemas.task import ChatMessage, JsonSchemaSpec, ResponseFormat
from tests.providers.wire import (
    FakeServer,
    Reply,
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


# a key no shape rule would recognise, and a prompt a backend might quote back
PLAIN_KEY = "TopSecretValue-42"
PRIVATE = 'My card is 4417 1234 5678 9113.\nPlease "summarise" my last statement for me.'


def _echoing(shape: str, status: int) -> Reply:
    """An error that repeats the request's credential header and its prompt."""

    async def reply(request: web.Request) -> web.StreamResponse:
        # the SDK sends the key as x-api-key or as Authorization: Bearer, by version
        key = request.headers.get("x-api-key") or request.headers.get("Authorization", "")
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        if shape == "message":
            text = f"invalid x-api-key: {key} for {prompt}"
            return web.json_response(an_error("authentication_error", text), status=status)
        if shape == "body":  # no error message: the SDK shows the whole body as a dict
            echo = {"request": body, "headers": dict(request.headers)}
            return web.json_response(echo, status=status)
        if shape == "stream":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            event = an_error("overloaded_error", f"overloaded; x-api-key={key}; {prompt}")
            await resp.write(f"event: error\ndata: {json.dumps(event)}\n\n".encode())
            await resp.write_eof()
            return resp
        text = f"proxy error {status}\n{prompt}\n{request.headers!r}"
        return web.Response(text=text, status=status, content_type="text/plain")

    return reply


@pytest.mark.parametrize(
    ("shape", "status", "code"),
    [
        ("message", 401, ErrorCode.AUTH),
        ("body", 400, ErrorCode.BAD_REQUEST),
        ("text", 502, ErrorCode.INTERNAL),
        ("stream", 200, ErrorCode.OVERLOADED),
    ],
)
async def test_an_error_that_echoes_the_key_and_the_prompt_keeps_neither(
    server: FakeServer, shape: str, status: int, code: ErrorCode
) -> None:
    server.script(_echoing(shape, status))
    spec = ModelSpec(
        name="claude",
        provider="anthropic",
        model_id="claude-test",
        base_url=server.url,
        api_key_env="ECHO_TEST_KEY",
        timeout_s=5.0,
    )
    p = build_provider(spec, env={"ECHO_TEST_KEY": PLAIN_KEY})
    request = GenerationRequest(
        model="claude", messages=[ChatMessage(role="user", content=PRIVATE)]
    )
    sink: DeltaSink | None = (lambda _: None) if shape == "stream" else None
    err = await failure(p, request, on_delta=sink)
    assert any(PLAIN_KEY in v for v in server.seen[0].headers.values())  # it was sent
    assert err.code == code
    for leaked in (PLAIN_KEY, "4417", "summarise", "last statement"):
        assert leaked not in err.message, err.message
    assert len(err.message) <= 500


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
