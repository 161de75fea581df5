"""The OpenAI adapters, through the official SDK, against a local Chat Completions server."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from aiohttp import web

from sop_llm.providers.base import DeltaSink, GenerationRequest
from sop_llm.providers.configured import ConfiguredProvider
from sop_llm.providers.errors import ProviderError
from sop_llm.providers.factory import ModelConfigError, build_provider
from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.models import ModelSpec
from sop_llm.schemas.task import ChatMessage, JsonSchemaSpec, ResponseFormat
from tests.providers.wire import (
    FakeServer,
    Reply,
    json_reply,
    oa_chunks,
    oa_completion,
    oa_error,
    raw_reply,
    slow_reply,
    sse_reply,
)

ENV = {"TEST_OPENAI_KEY": "sk-test-123"}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def provider(server: FakeServer, **spec: Any) -> ConfiguredProvider:
    fields: dict[str, Any] = {
        "name": "gpt",
        "provider": "openai",
        "model_id": "gpt-test",
        "base_url": f"{server.url}/v1",
        "api_key_env": "TEST_OPENAI_KEY",
        "timeout_s": 5.0,
    }
    fields.update(spec)
    return build_provider(ModelSpec.model_validate(fields), env=ENV)


def person_format() -> ResponseFormat:
    return ResponseFormat(
        type="json_schema", json_schema=JsonSchemaSpec(name="person", schema_=PERSON)
    )


async def failure(p: ConfiguredProvider, request: GenerationRequest, **kw: Any) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await p.generate(request, **kw)
    return info.value


async def test_completion_text_usage_and_parameters(server: FakeServer) -> None:
    server.script(json_reply(oa_completion("Hello there", prompt_tokens=7, completion_tokens=2)))
    p = provider(server)
    gen = await p.generate(
        GenerationRequest(model="gpt", prompt="Hi", temperature=0.0, max_tokens=10, seed=3)
    )
    await p.aclose()
    assert (gen.text, gen.finish_reason) == ("Hello there", "stop")
    assert (gen.usage.input_tokens, gen.usage.output_tokens) == (7, 2)
    seen = server.seen[0]
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == "Bearer sk-test-123"
    body = seen.body
    assert body["model"] == "gpt-test"
    assert body["messages"] == [{"role": "user", "content": "Hi"}]
    # temperature 0 is a real value: it reaches the server as 0, not dropped as falsy
    assert body["temperature"] == 0
    assert body["max_completion_tokens"] == 10 and "max_tokens" not in body
    assert body["seed"] == 3
    assert "top_p" not in body and "stream" not in body


async def test_streaming_deltas_and_usage(server: FakeServer) -> None:
    server.script(sse_reply(oa_chunks(["Hel", "lo", " world"], usage=(4, 3)), done=True))
    p = provider(server)
    deltas: list[str] = []
    gen = await p.generate(GenerationRequest(model="gpt", prompt="Hi"), on_delta=deltas.append)
    await p.aclose()
    assert deltas == ["Hel", "lo", " world"]
    assert gen.text == "Hello world" and gen.finish_reason == "stop"
    assert (gen.usage.input_tokens, gen.usage.output_tokens) == (4, 3)
    body = server.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


async def test_spec_defaults_fill_what_the_task_left_out(server: FakeServer) -> None:
    server.script(json_reply(oa_completion("x")), json_reply(oa_completion("x")))
    p = provider(server, defaults={"temperature": 0.7, "max_tokens": 50, "stop": ["END"]})
    await p.generate(GenerationRequest(model="gpt", prompt="a"))
    await p.generate(GenerationRequest(model="gpt", prompt="a", temperature=0.0, stop=("X",)))
    await p.aclose()
    first, second = server.bodies
    assert (first["temperature"], first["max_completion_tokens"], first["stop"]) == (
        0.7,
        50,
        ["END"],
    )
    assert (second["temperature"], second["stop"]) == (0, ["X"])


async def test_a_parameter_the_spec_locks_is_refused(server: FakeServer) -> None:
    p = provider(server, overridable=["max_tokens"])
    err = await failure(p, GenerationRequest(model="gpt", prompt="a", temperature=0.5))
    await p.aclose()
    assert err.code == ErrorCode.BAD_REQUEST and not err.retryable
    assert "temperature" in err.message
    assert server.seen == []


async def test_rate_limited_with_retry_after_is_retryable_and_not_retried_by_the_sdk(
    server: FakeServer,
) -> None:
    server.script(
        json_reply(
            oa_error("slow down", type_="rate_limit_error"),
            status=429,
            headers={"Retry-After": "7"},
        )
    )
    p = provider(server)
    err = await failure(p, GenerationRequest(model="gpt", prompt="a"))
    await p.aclose()
    assert err.code == ErrorCode.RATE_LIMITED and err.retryable
    assert err.retry_after == 7.0
    assert len(server.seen) == 1  # SDK retries are off: one layer retries, ours


async def test_retry_after_ms_and_http_date(server: FakeServer) -> None:
    server.script(
        json_reply(oa_error("busy"), status=503, headers={"retry-after-ms": "1500"}),
        json_reply(
            oa_error("busy"), status=429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}
        ),
    )
    p = provider(server)
    first = await failure(p, GenerationRequest(model="gpt", prompt="a"))
    second = await failure(p, GenerationRequest(model="gpt", prompt="a"))
    await p.aclose()
    assert first.code == ErrorCode.OVERLOADED and first.retryable and first.retry_after == 1.5
    assert second.code == ErrorCode.RATE_LIMITED and second.retry_after == 0.0  # in the past


@pytest.mark.parametrize(
    ("status", "error", "code", "retryable"),
    [
        (500, oa_error("boom", type_="server_error"), ErrorCode.INTERNAL, True),
        (401, oa_error("bad key", type_="authentication_error"), ErrorCode.AUTH, False),
        (404, oa_error("no such model", code="model_not_found"), ErrorCode.MODEL_NOT_FOUND, False),
        (
            400,
            oa_error("maximum context length is 8192 tokens", code="context_length_exceeded"),
            ErrorCode.CONTEXT_LENGTH,
            False,
        ),
        (400, oa_error("bad parameter"), ErrorCode.BAD_REQUEST, False),
    ],
)
async def test_http_errors_map_to_our_codes(
    server: FakeServer, status: int, error: Any, code: ErrorCode, retryable: bool
) -> None:
    server.script(json_reply(error, status=status))
    p = provider(server)
    err = await failure(p, GenerationRequest(model="gpt", prompt="a"))
    await p.aclose()
    assert (err.code, err.retryable, err.status) == (code, retryable, status)
    assert "sk-test-123" not in err.message
    assert len(server.seen) == 1


async def test_malformed_body_is_a_retryable_internal_error(server: FakeServer) -> None:
    server.script(raw_reply("{not json", status=200))
    p = provider(server)
    err = await failure(p, GenerationRequest(model="gpt", prompt="a"))
    await p.aclose()
    assert err.code == ErrorCode.INTERNAL and err.retryable


async def test_slow_reply_past_the_timeout(server: FakeServer) -> None:
    server.script(slow_reply(5.0, json_reply(oa_completion("late"))))
    p = provider(server, timeout_s=0.3)
    started = time.monotonic()
    err = await failure(p, GenerationRequest(model="gpt", prompt="a"))
    await p.aclose()
    assert err.code == ErrorCode.TIMEOUT and err.retryable
    assert not isinstance(err, TimeoutError)  # a backend timeout is not the task's deadline
    assert time.monotonic() - started < 4.0


async def test_stream_cut_before_the_end_is_retryable(server: FakeServer) -> None:
    events = oa_chunks(["a", "b"])[:2]  # role chunk and one piece, then the line drops
    server.script(sse_reply(events, cut=True))
    p = provider(server)
    err = await failure(p, GenerationRequest(model="gpt", prompt="a"), on_delta=lambda _: None)
    await p.aclose()
    assert err.code == ErrorCode.INTERNAL and err.retryable


async def test_content_filter_finish_is_an_error(server: FakeServer) -> None:
    server.script(json_reply(oa_completion("", finish="content_filter")))
    p = provider(server)
    err = await failure(p, GenerationRequest(model="gpt", prompt="a"))
    await p.aclose()
    assert err.code == ErrorCode.CONTENT_FILTER and not err.retryable


async def test_json_schema_response_format_and_validation(server: FakeServer) -> None:
    server.script(json_reply(oa_completion('{"name": "Ada", "age": 36}')))
    p = provider(server)
    gen = await p.generate(
        GenerationRequest(model="gpt", prompt="who?", response_format=person_format())
    )
    await p.aclose()
    assert gen.text == '{"name": "Ada", "age": 36}'
    rf = server.bodies[0]["response_format"]
    assert rf == {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }


async def test_invalid_output_gets_one_repair_with_the_error_fed_back(server: FakeServer) -> None:
    server.script(
        json_reply(
            oa_completion('{"name": "Ada", "age": 300}', prompt_tokens=5, completion_tokens=9)
        ),
        json_reply(
            oa_completion('{"name": "Ada", "age": 36}', prompt_tokens=30, completion_tokens=9)
        ),
    )
    p = provider(server)
    gen = await p.generate(
        GenerationRequest(model="gpt", prompt="who?", response_format=person_format())
    )
    await p.aclose()
    assert gen.text == '{"name": "Ada", "age": 36}'
    assert (gen.usage.input_tokens, gen.usage.output_tokens) == (35, 18)
    repair = server.bodies[1]["messages"]
    assert repair[-2] == {"role": "assistant", "content": '{"name": "Ada", "age": 300}'}
    assert repair[-1]["role"] == "user" and "at age" in repair[-1]["content"]
    assert "300 is greater than the maximum of 120" in repair[-1]["content"]


async def test_invalid_twice_raises_schema_invalid_with_the_raw_text(server: FakeServer) -> None:
    server.script(
        json_reply(oa_completion("not json at all")),
        json_reply(oa_completion('{"name": "Ada"}')),
    )
    p = provider(server)
    err = await failure(
        p, GenerationRequest(model="gpt", prompt="who?", response_format=person_format())
    )
    await p.aclose()
    assert err.code == ErrorCode.SCHEMA_INVALID and not err.retryable
    assert err.raw_text == '{"name": "Ada"}'
    assert "'age' is a required property" in err.message
    assert len(server.seen) == 2


async def test_an_invalid_schema_is_a_bad_request(server: FakeServer) -> None:
    fmt = ResponseFormat(type="json_schema", json_schema=JsonSchemaSpec(schema_={"type": "objekt"}))
    p = provider(server)
    err = await failure(p, GenerationRequest(model="gpt", prompt="a", response_format=fmt))
    await p.aclose()
    assert err.code == ErrorCode.BAD_REQUEST and server.seen == []


async def test_a_raw_grammar_is_refused_by_openai(server: FakeServer) -> None:
    fmt = ResponseFormat(type="grammar", grammar='root ::= "yes" | "no"')
    p = provider(server)
    err = await failure(p, GenerationRequest(model="gpt", prompt="a", response_format=fmt))
    await p.aclose()
    assert err.code == ErrorCode.BAD_REQUEST


def compatible(server: FakeServer, mode: str | None) -> ConfiguredProvider:
    spec: dict[str, Any] = {
        "name": "local",
        "provider": "openai_compatible",
        "model_id": "qwen",
        "base_url": f"{server.url}/v1",
        "gpu_slots": 4,
    }
    if mode is not None:
        spec["structured_output"] = mode
    return build_provider(ModelSpec.model_validate(spec), env={})


async def test_compatible_grammar_mode_sends_gbnf_in_the_body(server: FakeServer) -> None:
    server.script(json_reply(oa_completion('{"name": "Bo", "age": 7}')))
    p = compatible(server, "grammar")
    assert p.capabilities.needs_gpu_slot and p.capabilities.max_concurrency == 4
    gen = await p.generate(
        GenerationRequest(
            model="local",
            messages=[ChatMessage(role="user", content="who?")],
            max_tokens=64,
            response_format=person_format(),
        )
    )
    await p.aclose()
    assert gen.text == '{"name": "Bo", "age": 7}'
    body = server.bodies[0]
    assert body["max_tokens"] == 64 and "max_completion_tokens" not in body
    assert body["grammar"].startswith("root ::= ")
    assert "response_format" not in body
    # the model is shown the schema too
    assert (
        body["messages"][0]["role"] == "system"
        and '"maximum":120' in body["messages"][0]["content"]
    )
    assert server.seen[0].headers["authorization"] == "Bearer unused"


async def test_compatible_raw_grammar_passes_through(server: FakeServer) -> None:
    server.script(json_reply(oa_completion("yes")))
    p = compatible(server, "grammar")
    fmt = ResponseFormat(type="grammar", grammar='root ::= "yes" | "no"')
    gen = await p.generate(GenerationRequest(model="local", prompt="?", response_format=fmt))
    await p.aclose()
    assert gen.text == "yes" and server.bodies[0]["grammar"] == 'root ::= "yes" | "no"'


async def test_compatible_json_object_mode_shows_the_schema(server: FakeServer) -> None:
    server.script(json_reply(oa_completion('```json\n{"name": "Bo", "age": 7}\n```')))
    p = compatible(server, "json_object")
    gen = await p.generate(
        GenerationRequest(model="local", prompt="who?", response_format=person_format())
    )
    await p.aclose()
    assert gen.text == '{"name": "Bo", "age": 7}'  # the fence is taken off
    body = server.bodies[0]
    assert body["response_format"] == {"type": "json_object"}
    assert "JSON Schema" in body["messages"][0]["content"]


async def test_cancelling_a_stream_stops_the_request(server: FakeServer) -> None:
    server.script(sse_reply(oa_chunks(["tok"] * 200), delay=0.05, done=True))
    p = provider(server)
    deltas: list[str] = []
    task = asyncio.create_task(
        p.generate(GenerationRequest(model="gpt", prompt="a"), on_delta=deltas.append)
    )
    async with asyncio.timeout(5):
        while len(deltas) < 3:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await p.aclose()
    assert len(deltas) < 200


# a key no shape rule would recognise, and a prompt a backend might quote back
PLAIN_KEY = "TopSecretValue-42"
PRIVATE = 'My card is 4417 1234 5678 9113.\nPlease "summarise" my last statement for me.'


def _echoing(shape: str, status: int) -> Reply:
    """An error that repeats the request's Authorization header, its key and its prompt."""

    async def reply(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        if shape == "message":
            text = f"Refused. Authorization: {auth}; key {auth.removeprefix('Bearer ')}: {prompt}"
            return web.json_response(oa_error(text), status=status)
        if shape == "body":  # no error message: the whole body becomes the message
            echo = {"detail": {"request": body, "headers": dict(request.headers)}}
            return web.json_response(echo, status=status)
        if shape == "stream":  # an error event inside a stream
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            event = {"error": {"message": f"stream failed for {auth}: {prompt}"}}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
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
        ("stream", 200, ErrorCode.INTERNAL),
    ],
)
async def test_an_error_that_echoes_the_key_and_the_prompt_keeps_neither(
    server: FakeServer, shape: str, status: int, code: ErrorCode
) -> None:
    server.script(_echoing(shape, status))
    spec = ModelSpec(
        name="gpt",
        provider="openai",
        model_id="gpt-test",
        base_url=f"{server.url}/v1",
        api_key_env="ECHO_TEST_KEY",
        timeout_s=5.0,
    )
    p = build_provider(spec, env={"ECHO_TEST_KEY": PLAIN_KEY})
    messages = [ChatMessage(role="user", content=PRIVATE)]
    sink: DeltaSink | None = (lambda _: None) if shape == "stream" else None
    err = await failure(p, GenerationRequest(model="gpt", messages=messages), on_delta=sink)
    await p.aclose()
    assert server.seen[0].headers["authorization"] == f"Bearer {PLAIN_KEY}"  # it was sent
    assert err.code == code
    for leaked in (PLAIN_KEY, "4417", "summarise", "last statement"):
        assert leaked not in err.message, err.message
    assert len(err.message) <= 500


def test_a_missing_key_names_the_variable_not_a_value() -> None:
    spec = ModelSpec(
        name="gpt", provider="openai", model_id="gpt-test", api_key_env="NOT_SET_ANYWHERE"
    )
    with pytest.raises(ModelConfigError, match="NOT_SET_ANYWHERE is not set"):
        build_provider(spec, env={})
